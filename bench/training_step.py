"""One training step per method (forward, backward, SGD step of the prompts), as `upt train` runs it:
float16 autocast with a gradient scaler on CUDA, float32 on CPU. ViT-B-16 with random weights.

Prints the median step time and images/s per method at one batch size.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from _timing import machine
from upt.backbone import random_backbone
from upt.errors import ConfigError
from upt.methods import METHODS, ZERO_SHOT, PromptConfig, PromptedCLIP


def step_seconds(model: PromptedCLIP, images: torch.Tensor, labels: torch.Tensor, repeats: int) -> float:
    device = images.device
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.002, momentum=0.9)
    times = []
    for index in range(repeats + 1):  # the first step warms up kernels and allocator
        if amp:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if amp:
            torch.cuda.synchronize()
        if index:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=",".join(m for m in METHODS if m != ZERO_SHOT))
    args = parser.parse_args()
    backbone = random_backbone(args.model)
    size = backbone.image.size
    images = torch.randn(args.batch, 3, size, size, device=backbone.device)
    labels = torch.randint(0, args.classes, (args.batch,), device=backbone.device)
    names = list(IMAGENET_CLASSNAMES[: args.classes])
    print(f"# training step, {args.model} (random weights), batch {args.batch}, {args.classes} classes, {machine()}")
    for method in args.methods.split(","):
        try:
            model = PromptedCLIP(backbone, names, PromptConfig(method)).train()
        except ConfigError as error:  # cache models (Tip-Adapter) and `auto` are not one prompt model
            print(f"{method:12s} not timed: {error}")
            continue
        seconds = step_seconds(model, images, labels, args.repeats)
        print(f"{method:12s} {1000 * seconds:9.1f} ms per step  {args.batch / seconds:8.1f} images/s")


if __name__ == "__main__":
    main()
