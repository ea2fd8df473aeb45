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


def from_folder(folder: ImageFolder) -> DataSource:
    return DataSource("folder", folder.root, folder.class_names, folder.samples, None, folder.samples)


def few_shot_split(source: DataSource, shots: int | None, seed: int) -> FewShotSplit:
    """K training images per class from the train split and min(K, 4) validation images per class.

    As CoOp: with a val split, validation comes from it (never from train, so K images really train);
    without one (an image folder) it is held out of the class's images (`sample_few_shot`).
    `shots=None` takes every image of both splits.
    """
    if source.val is None:
        return sample_few_shot(ImageFolder(source.root, source.class_names, source.train), shots, seed)
    rng = random.Random(seed)
    val_shots = None if shots is None else min(shots, MAX_VALIDATION_PER_CLASS)
    return FewShotSplit(_per_class(source.train, len(source.class_names), shots, rng),
                        _per_class(source.val, len(source.class_names), val_shots, rng))


def _per_class(samples: list[LabelledImage], n_classes: int, k: int | None, rng: random.Random) -> list[LabelledImage]:
    groups: list[list[LabelledImage]] = [[] for _ in range(n_classes)]
    for sample in samples:
        groups[sample.label].append(sample)
    chosen: list[LabelledImage] = []
    for group in groups:
        chosen.extend(group if k is None or len(group) <= k else rng.sample(group, k))
    return chosen
