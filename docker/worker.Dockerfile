# GPU worker image (`upt worker`): CUDA runtime and the CUDA build of the pinned torch.
# One worker process per GPU; scale by running more of them against the same Redis and PostgreSQL.
# Build from the repository root: docker build -f docker/worker.Dockerfile .
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    UPT_DATA_DIR=/data HF_HOME=/models VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY constraints.txt ./
RUN pip install -c constraints.txt torch torchvision
COPY pyproject.toml README.md ./
COPY upt ./upt
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations
COPY alembic.ini ./
# The same uid/gid (1000) as the API image: both write to the shared data and models volumes.
# Ubuntu's image ships a user `ubuntu` with that uid, so it goes first.
RUN pip install -c constraints.txt ".[service]" && (userdel --remove ubuntu 2>/dev/null || true) \
    && groupadd --gid 1000 upt && useradd --create-home --uid 1000 --gid 1000 upt \
    && mkdir -p /data /models && chown upt:upt /data /models
USER upt

# Healthy while the worker answers a Celery ping through the broker.
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD python -m worker --ping || exit 1
CMD ["upt", "worker"]
