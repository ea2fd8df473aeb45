"""One data set as training code sees it: class names, its splits and its own template."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..data import MAX_VALIDATION_PER_CLASS, FewShotSplit, ImageFolder, LabelledImage, sample_few_shot


@dataclass(frozen=True)
class DataSource:
    """`val` is None when the data set has no validation split: it is then held out of `train`.

    `name` is a CoOp data set's name ("eurosat"), or "folder" for an image folder, whose train and test
    are the same images (a folder given to `train` trains; one given to `eval` is evaluated).
    """

    name: str
    root: Path
    class_names: list[str]
    train: list[LabelledImage]
    val: list[LabelledImage] | None
    test: list[LabelledImage]
    template: str | None = None

    def describe(self) -> dict[str, object]:
        return {"dataset": self.name, "classes": len(self.class_names),
                "train": len(self.train), "val": None if self.val is None else len(self.val), "test": len(self.test)}


FOLDER = "folder"


def from_folder(folder: ImageFolder) -> DataSource:
    return DataSource(FOLDER, folder.root, folder.class_names, folder.samples, None, folder.samples)


def few_shot_split(source: DataSource, shots: int | None, seed: int) -> FewShotSplit:
    """K training images per class from the train split and min(K, 4) validation images per class.

    As CoOp's data sets (Dassl's `generate_fewshot_dataset` after `random.seed(seed)`), so that a seed
    draws the same shots as CoOp's runs: classes in the order they first appear in the split, K images
    each by `random.sample` (also when a class has exactly K), then the validation images from the same
    generator. From the val split where the data set has one; ImageNet has none distinct from its test
    set (CoOp validates on its test images), so its validation images are held out of train, outside the
    K shots: no image that chooses anything is a test image. An image folder has one set of images, held
    out as `sample_few_shot` does. `shots=None` takes every image.
    """
    if source.val is None and source.name == FOLDER:
        return sample_few_shot(ImageFolder(source.root, source.class_names, source.train), shots, seed)
    rng = random.Random(seed)
    val_shots = None if shots is None else min(shots, MAX_VALIDATION_PER_CLASS)
    train = _dassl_per_class(source.train, shots, rng)
    if source.val is not None:
        return FewShotSplit(train, _dassl_per_class(source.val, val_shots, rng))
    chosen = {id(sample) for sample in train}
    rest = [sample for sample in source.train if id(sample) not in chosen]
    return FewShotSplit(train, _dassl_per_class(rest, val_shots, rng))


def _dassl_per_class(samples: list[LabelledImage], k: int | None, rng: random.Random) -> list[LabelledImage]:
    groups: dict[int, list[LabelledImage]] = {}  # in order of first appearance, as Dassl's split_dataset_by_label
    for sample in samples:
        groups.setdefault(sample.label, []).append(sample)
    chosen: list[LabelledImage] = []
    for group in groups.values():
        chosen.extend(rng.sample(group, k) if k is not None and len(group) >= k else group)
    return chosen
