"""Debian's Fashion-MNIST (`apt-get install dataset-fashion-mnist`) and the two shifts made from it.

One home for what the developer scripts share: reading the IDX files, the class names, the captions
the tiny CLIP is pretrained on (and those it never sees), and the two deterministic shifts of the
test split that mirror the paper's two variances:

- visual shift: every image rotated by an angle drawn from the image's own index (45-315 degrees),
  so the same class looks many ways (high intra-class visual variance). Inverting the images as well
  was tried and dropped: the model maps every inverted image to nearly the same feature, which lowers
  the accuracy but also the intra-class variance, the opposite of the shift wanted here;
- text shift: the images unchanged, the classes renamed with near-synonyms that appear in no
  pretraining caption, so the text encoder knows nothing specific about them (their class features
  crowd together: low inter-class text variance).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
LABELS = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]

# Captions of the pretraining: every template with every class name. "a photo of a {}." is the
# project's zero-shot template, so the in-domain zero-shot uses words the model was trained on.
PRETRAIN_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "art of the {}.",
    "a {}.",
)
# Never in a pretraining caption: for measuring the text shift of an unseen phrasing.
HELD_OUT_TEMPLATES = (
    "a catalogue shot showing one {}.",
    "someone is selling this {} online.",
)
# Near-synonyms for the text shift; none of these words occurs in a pretraining caption.
TEXT_SHIFT_NAMES = {
    "t-shirt": "tee",
    "trouser": "slacks",
    "pullover": "jumper",
    "dress": "gown",
    "coat": "overcoat",
    "sandal": "flip-flop",
    "shirt": "blouse",
    "sneaker": "trainer",
    "bag": "purse",
    "ankle boot": "bootee",
}
VISUAL_SHIFT_ANGLES = (45.0, 315.0)  # rotation drawn uniformly in this range, per image


def read_split(split: str, source: Path = SOURCE) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 28 x 28 uint8, labels N) of `train` or `test` (t10k), in file order."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_file, labels_file = source / f"{prefix}-images-idx3-ubyte.gz", source / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_file.is_file():
        raise SystemExit(f"{images_file} is missing: apt-get install dataset-fashion-mnist")
    images = _read_idx(images_file, header=16).reshape(-1, 28, 28)
    return images, _read_idx(labels_file, header=8)


def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def visual_shift(image: np.ndarray, index: int) -> np.ndarray:
    """Rotated about its centre by an angle fixed by the image's index in its split (black corners)."""
    angle = np.random.default_rng(index).uniform(*VISUAL_SHIFT_ANGLES)
    return np.asarray(Image.fromarray(image, mode="L").rotate(angle, resample=Image.BILINEAR, fillcolor=0))
