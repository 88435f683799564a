# artnet on the Ray image (Ray and CUDA preinstalled); the same image runs the head and the GPU workers.
#   docker build -t artnet .
#   docker run --gpus all -e AWS_ENDPOINT_URL -e MLFLOW_TRACKING_URI artnet \
#       python jobs/train.py s3://bucket/catalog --use-gpu
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/artnet
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users artnet ./artnet
COPY --chown=ray:users jobs ./jobs
RUN pip install --no-cache-dir -e ".[search]"

CMD ["artnet", "--help"]
