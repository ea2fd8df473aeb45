"""Extract the small Fashion-MNIST fixture in tests/fixtures/fashion_mnist from Debian's package.

Run once (`apt-get install dataset-fashion-mnist`, then `python scripts/make_fashion_fixture.py`);
the PNGs it writes are committed, so tests never need the package.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
LABELS = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
CLASSES = ["trouser", "pullover", "sneaker", "bag"]


def read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/fashion_mnist"))
    parser.add_argument("--train-per-class", type=int, default=16)
    parser.add_argument("--test-per-class", type=int, default=10)
    args = parser.parse_args()
    images = read_idx(SOURCE / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = read_idx(SOURCE / "t10k-labels-idx1-ubyte.gz", 8)
    for name in CLASSES:
        indices = np.flatnonzero(labels == LABELS.index(name))  # file order: deterministic
        splits = {"train": indices[: args.train_per_class],
                  "test": indices[args.train_per_class: args.train_per_class + args.test_per_class]}
        for split, chosen in splits.items():
            folder = args.out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in chosen:
                Image.fromarray(images[index], mode="L").save(folder / f"{index:05d}.png", optimize=True)


if __name__ == "__main__":
    main()
