# API image (`upt serve --no-worker`, `upt migrate`, `upt keys`): slim Python with CPU torch.
# The API runs the image encoder for /classify; training happens on the GPU workers.
# Build from the repository root: docker build -f docker/api.Dockerfile .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    UPT_DATA_DIR=/data HF_HOME=/models UPT_HOST=0.0.0.0 UPT_PORT=8000

WORKDIR /app
COPY constraints.txt ./
# CPU builds of the pinned torch/torchvision (versions from constraints.txt, the one place they live).
RUN pip install --index-url https://download.pytorch.org/whl/cpu \
        "torch==$(sed -n 's/^torch==//p' constraints.txt)" \
        "torchvision==$(sed -n 's/^torchvision==//p' constraints.txt)"
COPY pyproject.toml README.md ./
COPY upt ./upt
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations
COPY alembic.ini ./
# uid/gid 1000, as in the worker image: both write to the shared data and models volumes.
RUN pip install -c constraints.txt ".[service]" && groupadd --gid 1000 upt && useradd --create-home --uid 1000 --gid 1000 upt \
    && mkdir -p /data /models && chown upt:upt /data /models
USER upt

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=5 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=4)"
CMD ["upt", "serve", "--no-worker"]
