"""Image folders, few-shot sampling and the paper's train/test transforms."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T

from .backbone import ImageSpec
from .errors import DataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
MAX_VALIDATION_PER_CLASS = 4
CLASSNAMES_FILE = "classnames.txt"


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: int


@dataclass(frozen=True)
class ImageFolder:
    """`root/<class name>/<image>`; classes are the sorted folder names unless given."""

    root: Path
    class_names: list[str]
    samples: list[LabelledImage]

    def by_class(self) -> list[list[LabelledImage]]:
        groups: list[list[LabelledImage]] = [[] for _ in self.class_names]
        for sample in self.samples:
            groups[sample.label].append(sample)
        return groups


@dataclass(frozen=True)
class FewShotSplit:
    train: list[LabelledImage]
    val: list[LabelledImage]


def scan_image_folder(root: str | Path, class_names: list[str] | None = None,
                      folders_of_classes: list[str] | None = None) -> ImageFolder:
    """The classes of `root`: its folders, sorted, named by `root/classnames.txt` where there is one
    ("<folder> <display name>" a line, ImageNet's format) and by the folder's name otherwise.
    `class_names` picks and orders classes, each given by its display name or its folder's name;
    `folders_of_classes[i]` is the folder of `class_names[i]` when they differ (the service stores a
    task's images by class index, so that a class name need not be a valid folder name)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; expected {root}/<class name>/<image> (ImageFolder layout).")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    display = _display_names(root, folders)
    by_name = {name: folder for folder, name in display.items()} | {folder: folder for folder in folders}
    names = list(class_names) if class_names is not None else [display[folder] for folder in folders]
    if len(names) < 2:
        raise DataError(f"{root} holds {len(names)} class folder(s); at least two classes are needed.")
    if folders_of_classes is not None:
        class_folders = list(folders_of_classes)
        if len(class_folders) != len(names):
            raise DataError(f"{len(class_folders)} class folders given for {len(names)} classes.")
    else:
        class_folders = [by_name.get(name, name) for name in names]
    missing = [name for name, folder in zip(names, class_folders) if folder not in folders]
    if missing:
        raise DataError(f"No folder for class(es) {', '.join(missing)} under {root}.")
    samples = []
    for label, (name, folder) in enumerate(zip(names, class_folders)):
        files = sorted(p for p in (root / folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"Class {name!r} has no images in {root / folder} (accepted: {', '.join(sorted(IMAGE_SUFFIXES))}).")
        samples.extend(LabelledImage(path, label) for path in files)
    return ImageFolder(root, names, samples)


def read_classnames(path: Path) -> dict[str, str]:
    """`classnames.txt` as ImageNet's in CoOp's layout: one "<folder> <class name>" a line, in label order."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"Cannot read {path}: {error}") from error
    names = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        folder, _, name = line.strip().partition(" ")
        if not name.strip():
            raise DataError(f"{path}:{number}: expected '<folder> <class name>', got {line.strip()!r}.")
        names[folder] = name.strip()
    return names


def _display_names(root: Path, folders: list[str]) -> dict[str, str]:
    path = root / CLASSNAMES_FILE
    names = read_classnames(path) if path.is_file() else {}
    unnamed = [folder for folder in folders if names and folder not in names]
    if unnamed:
        raise DataError(f"{path} names no class for folder(s) {', '.join(unnamed[:5])}.")
    display = {folder: names.get(folder, folder) for folder in folders}
    if len(set(display.values())) != len(display):
        raise DataError(f"{path} gives two folders the same class name.")
    return display


def sample_few_shot(folder: ImageFolder, shots: int | None, seed: int) -> FewShotSplit:
    """K images per class for training and min(K, 4) more for validation, drawn with `seed`.

    Validation never takes more than half of a class, so a class with few images still trains; a
    class of one image has no validation image. `shots=None` trains on everything not held out.
    """
    rng = random.Random(seed)
    train: list[LabelledImage] = []
    val: list[LabelledImage] = []
    for group in folder.by_class():
        group = list(group)
        rng.shuffle(group)
        k = shots if shots is not None else len(group)
        n_val = min(k, MAX_VALIDATION_PER_CLASS, len(group) // 2)
        n_train = min(k, len(group) - n_val)
        train.extend(group[:n_train])
        val.extend(group[n_train: n_train + n_val])
    return FewShotSplit(train, val)


def train_transform(spec: ImageSpec) -> T.Compose:
    """The paper's augmentation: random resized crop (scale 0.08-1), horizontal flip, CLIP normalisation."""
    return T.Compose([
        T.RandomResizedCrop(spec.size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


def eval_transform(spec: ImageSpec) -> T.Compose:
    """Shorter side resized to the input size (bicubic), centre crop: CLIP's test transform."""
    return T.Compose([
        T.Resize(spec.size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(spec.size),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


def read_image_file(path: Path) -> Image.Image:
    """A trusted image file from disk as RGB, or a DataError naming the file (untrusted uploads are the
    service's to decode: it checks their sizes and answers 4xx)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise DataError(f"Cannot read image {path}: {error}") from error


def labelled_batches(samples: list[LabelledImage], transform: T.Compose, batch_size: int,
                     device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Decoded, transformed images and their labels, `batch_size` at a time, in order."""
    for start in range(0, len(samples), batch_size):
        chunk = samples[start: start + batch_size]
        images = torch.stack([transform(read_image_file(sample.path)) for sample in chunk]).to(device)
        yield images, torch.tensor([sample.label for sample in chunk])


class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[LabelledImage], transform: T.Compose):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        return self.transform(read_image_file(sample.path)), sample.label
