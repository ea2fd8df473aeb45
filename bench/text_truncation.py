"""Text encoding cut after the longest prompt vs. open_clip's full 77-position pass.

100 ImageNet class names in "a photo of a {}." on ViT-B-16 (random weights: the cost and the equality
of the features do not depend on the weights' values). Prints both times and their ratio.
"""

from __future__ import annotations

import argparse

import open_clip
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from _timing import machine, median_seconds
from upt.encoders import encode_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clip = open_clip.create_model(args.model, pretrained=None).eval().to(device)
    tokens = open_clip.get_tokenizer(args.model)(
        [f"a photo of a {name}." for name in IMAGENET_CLASSNAMES[: args.classes]]).to(device)
    with torch.no_grad():
        difference = (encode_text(clip, tokens) - clip.encode_text(tokens)).abs().max().item()
    full = median_seconds(lambda: clip.encode_text(tokens), args.repeats)
    cut = median_seconds(lambda: encode_text(clip, tokens), args.repeats)
    longest = int(tokens.argmax(dim=-1).max()) + 1
    print(f"# {args.model}, {args.classes} class prompts, {machine()}")
    print(f"positions encoded: {longest} instead of {tokens.shape[1]}")
    print(f"max |feature difference|: {difference:.2e}")
    print(f"open_clip encode_text (77 positions): {1000 * full:8.1f} ms")
    print(f"upt encode_text (cut at longest):     {1000 * cut:8.1f} ms")
    print(f"speed-up: {full / cut:.2f}x")


if __name__ == "__main__":
    main()
