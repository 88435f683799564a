# artnet on the Ray image of the Ray version artnet pins; the image every node of cluster.yaml runs.
#   make image IMAGE=<registry>/artnet:0.1.0     (docker build + docker push)
#   docker run --gpus all -e AWS_ENDPOINT_URL -e MLFLOW_TRACKING_URI <registry>/artnet:0.1.0 \
#       python jobs/train.py s3://bucket/catalog --use-gpu
FROM rayproject/ray:2.60.0-py311-gpu

# TensorFlow with its own CUDA and cuDNN (the nvidia-* wheels of its `and-cuda` extra), at the version the tests
# ran with (tests/test_deploy.py compares). A newer TensorFlow over whatever CUDA the base image ships saw no GPU
# when the two disagreed; this one needs only the host's NVIDIA driver (CUDA 12: 525 or newer). TensorFlow's
# libraries find the wheels through their RUNPATH, ahead of the base image's CUDA (on the loader's default path,
# not in LD_LIBRARY_PATH). Its own layer, before artnet's code, so a code change does not download the CUDA wheels
# (several GB) again.
RUN pip install --no-cache-dir "tensorflow[and-cuda]==2.21.0"

WORKDIR /home/ray/artnet
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users artnet ./artnet
COPY --chown=ray:users jobs ./jobs
# The TensorFlow above already satisfies artnet's `tensorflow>=...`, so pip keeps it.
RUN pip install --no-cache-dir ".[search]"
# The image's own check, on a node that runs it: `python -m artnet.doctor --use-gpu --s3 s3://bucket/prefix` says
# whether TensorFlow sees the GPUs (and why not), what precision it would train in, and whether S3, MLflow and
# Ray answer (exit 2 with the fix when one does not).
# artnet.console.NODE_ENV, for the raylet `ray start` runs on every node (decode workers kept between epochs)
ENV RAY_idle_worker_killing_time_threshold_ms=60000

CMD ["artnet", "--help"]
