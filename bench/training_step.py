"""One training step per method (forward, backward, SGD step of the prompts), as `upt train` runs it:
float16 autocast with a gradient scaler on CUDA, float32 on CPU. ViT-B-16 with random weights.

Prints the median step time and images/s per method at one batch size. Tip-Adapter learns no prompts,
so its costs are those of `upt train` for the cache methods (upt/methods/tip_adapter.py):
- building the cache: one augmented view of the batch through the frozen image encoder (no gradient),
  repeated `augment_views` times per training image, then the α/β grid search on validation features;
- Tip-Adapter-F: one AdamW step of the cache keys over a batch of cached features (the encoder never
  runs per step).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from _timing import machine
from upt.backbone import Backbone, random_backbone
from upt.encoders import encode_image
from upt.errors import ConfigError
from upt.methods import CACHE_METHODS, METHODS, REGISTRY, ZERO_SHOT, PromptConfig, PromptedCLIP, template_classifier
from upt.methods.config import DEFAULT_TEMPLATE
from upt.methods.lora import LoraCLIP, LoraOptions
from upt.methods.tip_adapter import CacheOptions, build_keys, fine_tune_keys, leave_one_out_search, one_hot_values

SHOTS = 16  # the cache of a 16-shot task, α/β searched on its shots


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn` after one warm-up call (kernels, allocator), synchronising CUDA around each."""
    times = []
    for index in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_seconds(model: PromptedCLIP, images: torch.Tensor, labels: torch.Tensor, repeats: int) -> float:
    device = images.device
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.002, momentum=0.9)

    def step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return timed(step, device, repeats)  # the first step warms up kernels and allocator


def cache_build(backbone: Backbone, images: torch.Tensor, classifier: torch.Tensor, repeats: int) -> None:
    """Tip-Adapter: one cache view of the batch (as `encode_views` encodes it) and the α/β search."""
    options = CacheOptions()
    device, batch, classes = images.device, len(images), len(classifier)

    @torch.no_grad()
    def one_view():
        encode_image(backbone.clip, images, None, normalize=False).float()

    view_s = timed(one_view, device, repeats)
    cached = SHOTS * classes * options.augment_views
    views = torch.randn(options.augment_views, SHOTS * classes, classifier.shape[1], device=device)
    labels = torch.arange(SHOTS * classes, device=device) % classes
    keys, values = build_keys(views), one_hot_values(labels, classes)
    search_s = timed(lambda: leave_one_out_search(labels, keys, values, classifier, backbone.logit_scale, options),
                     device, repeats)
    print(f"{'tip-adapter':12s} {1000 * view_s:9.1f} ms per cache view of {batch}  {batch / view_s:8.1f} images/s"
          f"  (a {SHOTS}-shot cache of {classes} classes x {options.augment_views} views = {cached} encodes: "
          f"~{cached / batch * view_s:.1f} s); α/β leave-one-out search ({options.beta_steps}x{options.alpha_steps} "
          f"grid, {len(labels)} shots): {1000 * search_s:.1f} ms")


def key_step(backbone: Backbone, classifier: torch.Tensor, repeats: int) -> None:
    """Tip-Adapter-F: one epoch over exactly one batch of cached features is one AdamW step of the keys."""
    options = CacheOptions(epochs=1)
    device, classes, width = classifier.device, len(classifier), classifier.shape[1]
    n = options.batch_size
    views = torch.randn(options.augment_views, n, width, device=device)
    labels = torch.arange(n) % classes
    keys, values = build_keys(views), one_hot_values(labels.to(device), classes)
    seconds = timed(lambda: fine_tune_keys(keys, values, views, labels, classifier, backbone.logit_scale,
                                           options, seed=0), device, repeats)
    print(f"{'tip-adapter-f':12s} {1000 * seconds:9.1f} ms per step   {n / seconds:8.1f} cached features/s "
          f"(batch {n} of cached features, keys {n}x{width}; plus the cache build above)")


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
        if method in CACHE_METHODS:
            classifier = template_classifier(backbone, names, (DEFAULT_TEMPLATE,))
            if not REGISTRY[method].trains:  # Tip-Adapter: the cache build; Tip-Adapter-F: a key step
                cache_build(backbone, images, classifier, args.repeats)
            else:
                key_step(backbone, classifier, args.repeats)
            continue
        try:
            if REGISTRY[method].learns_adapters:  # CLIP-LoRA: both towers with their adapters, every step
                model = LoraCLIP(backbone, names, LoraOptions(), (DEFAULT_TEMPLATE,)).train()
            else:
                model = PromptedCLIP(backbone, names, PromptConfig(method)).train()
        except ConfigError as error:  # `auto` is not one prompt model
            print(f"{method:12s} not timed: {error}")
            continue
        seconds = step_seconds(model, images, labels, args.repeats)
        print(f"{method:12s} {1000 * seconds:9.1f} ms per step  {args.batch / seconds:8.1f} images/s")


if __name__ == "__main__":
    main()
