"""Readers of CoOp's on-disk layouts (its `DATASETS.md`), each giving a DataSource."""

from __future__ import annotations

import json
from pathlib import Path

from ..data import CLASSNAMES_FILE, IMAGE_SUFFIXES, LabelledImage, read_classnames
from ..errors import DataError
from .catalogue import CoOpDataset, Layout
from .source import DataSource

SPLITS = ("train", "val", "test")


def read(spec: CoOpDataset, folder: Path) -> DataSource:
    readers = {
        Layout.SPLIT: read_split,
        Layout.IMAGENET: read_imagenet,
        Layout.AIRCRAFT: read_aircraft,
        Layout.IMAGENET_BY_INDEX: read_imagenet_by_index,
        Layout.IMAGENET_BY_WNID: read_imagenet_by_wnid,
    }
    return readers[spec.layout](spec, folder)


def read_split_file(path: Path, image_dir: Path, name: str, template: str | None) -> DataSource:
    """`split_zhou_<Name>.json`: {"train"|"val"|"test": [[image path under image_dir, label, class name], …]}.

    The class names are the split's (CoOp renamed many when it wrote them: EuroSAT's `AnnualCrop` is
    "Annual Crop Land"), never the folder names.
    """
    try:
        split = json.loads(path.read_text())
        rows = {key: [(str(p), int(label), str(cls)) for p, label, cls in split[key]] for key in SPLITS}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path} is not a CoOp split file ({{'train'|'val'|'test': [[path, label, class name]]}}): "
                        f"{error}") from error
    names: dict[int, str] = {}
    for key in SPLITS:
        for _, label, cls in rows[key]:
            if names.setdefault(label, cls) != cls:
                raise DataError(f"{path}: label {label} is called both {names[label]!r} and {cls!r}.")
    if sorted(names) != list(range(len(names))) or len(names) < 2:
        raise DataError(f"{path}: labels must run 0..k-1 over at least two classes, not {sorted(names)[:10]}.")
    samples = {key: [LabelledImage(image_dir / p, label) for p, label, _ in rows[key]] for key in SPLITS}
    return DataSource(name, path.parent, [names[i] for i in range(len(names))],
                      samples["train"], samples["val"], samples["test"], template)


def read_split(spec: CoOpDataset, folder: Path) -> DataSource:
    return read_split_file(folder / spec.split_file, folder / spec.images, spec.name, spec.template)


def read_imagenet(spec: CoOpDataset, folder: Path) -> DataSource:
    """CoOp's ImageNet: labels follow the sorted wnid folders of images/train; images/val is the test
    set. CoOp validates on it too; here it has no validation split, so the validation images are held
    out of train (`few_shot_split`), never taken from the test images."""
    names = read_classnames(_classnames_path(folder))
    wnids = _subfolders(folder / spec.images / "train")
    class_names = [_lookup(names, wnid, folder) for wnid in wnids]
    train = _by_folder(folder / spec.images / "train", wnids)
    test = _by_folder(folder / spec.images / "val", wnids)
    return DataSource(spec.name, folder, class_names, train, None, test, spec.template)


def read_imagenet_by_index(spec: CoOpDataset, folder: Path) -> DataSource:
    """ImageNet-V2: folders 0..999 are ImageNet's labels, in `classnames.txt` order."""
    names = read_classnames(_classnames_path(folder))
    image_dir = folder / spec.images
    samples = []
    for label in range(len(names)):
        samples.extend(LabelledImage(path, label) for path in _images(image_dir / str(label)))
    return DataSource(spec.name, folder, list(names.values()), [], None, samples, spec.template)


def read_imagenet_by_wnid(spec: CoOpDataset, folder: Path) -> DataSource:
    """Sketch, -A and -R: the classes are the wnid folders present, sorted (200 for -A and -R, 1000 for
    Sketch), labelled in that order and named from ImageNet's `classnames.txt`: CoOp's mapping. An
    ImageNet artifact is evaluated on them with its classifier rows for these classes."""
    names = read_classnames(_classnames_path(folder))
    wnids = _subfolders(folder / spec.images)
    class_names = [_lookup(names, wnid, folder) for wnid in wnids]
    return DataSource(spec.name, folder, class_names, [], None, _by_folder(folder / spec.images, wnids),
                      spec.template)


def read_aircraft(spec: CoOpDataset, folder: Path) -> DataSource:
    """FGVC-Aircraft: variants.txt names the classes; images_variant_<split>.txt lines "<id> <variant>"."""
    try:
        class_names = [line.strip() for line in (folder / "variants.txt").read_text().splitlines() if line.strip()]
    except OSError as error:
        raise DataError(f"Cannot read {folder / 'variants.txt'}: {error}") from error
    labels = {name: label for label, name in enumerate(class_names)}
    splits = {}
    for key in SPLITS:
        path = folder / f"images_variant_{key}.txt"
        try:
            lines = [line.strip().split(" ", 1) for line in path.read_text().splitlines() if line.strip()]
        except OSError as error:
            raise DataError(f"Cannot read {path}: {error}") from error
        splits[key] = [LabelledImage(folder / spec.images / f"{image}.jpg", labels[variant]) for image, variant in lines]
    return DataSource(spec.name, folder, class_names, splits["train"], splits["val"], splits["test"], spec.template)


def _classnames_path(folder: Path) -> Path:
    """Each variant's folder holds a copy of ImageNet's classnames.txt (CoOp's DATASETS.md); a sibling
    imagenet/ folder's will do."""
    for candidate in (folder / CLASSNAMES_FILE, folder.parent / "imagenet" / CLASSNAMES_FILE):
        if candidate.is_file():
            return candidate
    raise DataError(f"No {CLASSNAMES_FILE} in {folder} (copy ImageNet's there, as CoOp's DATASETS.md says).")


def _lookup(names: dict[str, str], wnid: str, folder: Path) -> str:
    if wnid not in names:
        raise DataError(f"Folder {wnid!r} of {folder} is not in {CLASSNAMES_FILE}.")
    return names[wnid]


def _subfolders(path: Path) -> list[str]:
    if not path.is_dir():
        raise DataError(f"{path} is missing (see CoOp's DATASETS.md for the layout).")
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(path: Path) -> list[Path]:
    if not path.is_dir():
        raise DataError(f"{path} is missing (see CoOp's DATASETS.md for the layout).")
    return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _by_folder(root: Path, folders: list[str]) -> list[LabelledImage]:
    return [LabelledImage(path, label) for label, name in enumerate(folders) for path in _images(root / name)]
