# artnet on the Ray image (Ray and CUDA preinstalled); the image every node of cluster.yaml runs.
#   make image IMAGE=<registry>/artnet:0.1.0     (docker build + docker push)
#   docker run --gpus all -e AWS_ENDPOINT_URL -e MLFLOW_TRACKING_URI <registry>/artnet:0.1.0 \
#       python jobs/train.py s3://bucket/catalog --use-gpu
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/artnet
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users artnet ./artnet
COPY --chown=ray:users jobs ./jobs
RUN pip install --no-cache-dir ".[search]"
# artnet.console.NODE_ENV, for the raylet `ray start` runs on every node (decode workers kept between epochs)
ENV RAY_idle_worker_killing_time_threshold_ms=60000

CMD ["artnet", "--help"]
