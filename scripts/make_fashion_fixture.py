"""Extract the small Fashion-MNIST fixtures in tests/fixtures from Debian's package.

Run once (`apt-get install dataset-fashion-mnist`, then `python scripts/make_fashion_fixture.py`);
the PNGs it writes are committed, so tests never need the package. Three sets of the same test-split
images (file order, deterministic), in ImageFolder layout with `train/` and `test/`:

- fashion_mnist: the images as they are;
- fashion_mnist_visual_shift: each image rotated (fashion_mnist.visual_shift);
- fashion_mnist_text_shift: the images as they are, the class folders named with near-synonyms that
  no pretraining caption of the tiny CLIP contains (fashion_mnist.TEXT_SHIFT_NAMES).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from fashion_mnist import LABELS, TEXT_SHIFT_NAMES, read_split, visual_shift

CLASSES = ["trouser", "pullover", "sneaker", "bag"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures"))
    parser.add_argument("--train-per-class", type=int, default=16)
    parser.add_argument("--test-per-class", type=int, default=10)
    args = parser.parse_args()
    images, labels = read_split("test")
    sets = {
        "fashion_mnist": (lambda image, index: image, lambda name: name),
        "fashion_mnist_visual_shift": (visual_shift, lambda name: name),
        "fashion_mnist_text_shift": (lambda image, index: image, TEXT_SHIFT_NAMES.__getitem__),
    }
    for name in CLASSES:
        indices = np.flatnonzero(labels == LABELS.index(name))  # file order: deterministic
        splits = {"train": indices[: args.train_per_class],
                  "test": indices[args.train_per_class: args.train_per_class + args.test_per_class]}
        for set_name, (shift_image, rename) in sets.items():
            for split, chosen in splits.items():
                folder = args.out / set_name / split / rename(name)
                folder.mkdir(parents=True, exist_ok=True)
                for index in chosen:
                    image = shift_image(images[index], int(index))
                    Image.fromarray(image, mode="L").save(folder / f"{index:05d}.png", optimize=True)


if __name__ == "__main__":
    main()
