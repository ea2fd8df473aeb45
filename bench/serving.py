"""Serving a tuned artifact: one image-encoder pass plus a matrix product with the cached classifier.

Times, for the same batch on ViT-B-16 (random weights), open_clip's raw `encode_image`, upt's
`Predictor.logits` for a UPT artifact (visual prompts + cached W), and the uncached alternative that
re-encodes the class prompts for every request. Prints the ratios against the raw forward.
"""

from __future__ import annotations

import argparse

import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from _timing import machine, median_seconds
from upt.backbone import random_backbone
from upt.methods import PromptConfig, PromptedCLIP
from upt.predict import Predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    backbone = random_backbone(args.model)
    clip, device = backbone.clip, backbone.device
    model = PromptedCLIP(backbone, list(IMAGENET_CLASSNAMES[: args.classes]), PromptConfig("upt")).eval()
    exported = model.export()
    predictor = Predictor(backbone, model.class_names, exported["classifier"], exported["visual_prompts"])
    size = backbone.image.size
    images = torch.randn(args.batch, 3, size, size, device=device)
    with torch.no_grad():
        assert torch.allclose(predictor.logits(images), model(images), atol=1e-4)
    raw = median_seconds(lambda: clip.encode_image(images), args.repeats)
    served = median_seconds(lambda: predictor.logits(images), args.repeats)
    uncached = median_seconds(lambda: model(images), args.repeats)
    print(f"# {args.model}, batch {args.batch}, {args.classes} classes, UPT artifact, {machine()}")
    print(f"open_clip encode_image:             {1000 * raw:8.1f} ms  (1.00x)")
    print(f"upt Predictor.logits (cached W):    {1000 * served:8.1f} ms  ({served / raw:.2f}x)")
    print(f"re-encoding class prompts per call: {1000 * uncached:8.1f} ms  ({uncached / raw:.2f}x)")


if __name__ == "__main__":
    main()
