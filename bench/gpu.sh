#!/usr/bin/env bash
# The GPU figures in one go, on a CUDA machine where `make install` (or `make test`) already ran:
# installs nothing, downloads nothing (ViT-B-16 with random weights), ends within ten minutes.
#   1. raw PyTorch fp16 encode_image throughput at batch 1, 32 and 256;
#   2. the service path under load: bench/serving_load.py against a real `upt serve` on the GPU
#      (PyTorch fp16, the default there), next to the raw batch-32 figure of the same run;
#   3. one training step per method (float16 autocast, as `upt train` on CUDA).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../.venv/bin/python}
$PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh needs a CUDA device")'

echo "== 1. raw encode_image, fp16 =="
timeout 120 $PY - <<'PY'
import torch
from _timing import machine, median_seconds
from upt.backbone import random_backbone
backbone = random_backbone("ViT-B-16", "cuda")
size = backbone.image.size
print(f"# ViT-B-16 (random weights), {machine()}")
for batch in (1, 32, 256):
    images = torch.randn(batch, 3, size, size, device="cuda")
    def run():
        with torch.autocast("cuda", dtype=torch.float16):
            backbone.clip.encode_image(images)
        torch.cuda.synchronize()
    seconds = median_seconds(run, repeats=10, warmup=3)
    print(f"batch {batch:3d}: {1000 * seconds:8.2f} ms  {batch / seconds:9.1f} images/s")
PY

echo "== 2. the service under load =="
timeout 300 $PY serving_load.py --device cuda --clients 64 --seconds 20 --configs auto:auto

echo "== 3. one training step per method, batch 32 =="
timeout 150 $PY training_step.py --batch 32 --repeats 5
