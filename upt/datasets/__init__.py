"""Data sources: an image folder, or a data set of CoOp's benchmark in CoOp's layout.

`load_data(path)` finds out which (a `split_zhou_<Name>.json` in the folder, ImageNet's
`classnames.txt` with `images/train`, else an image folder); `load_data(root, "eurosat")` reads a
data set of the catalogue from `root/eurosat` (or from `root` itself).
"""

from __future__ import annotations

from pathlib import Path

from ..data import scan_image_folder
from ..errors import DataError
from . import readers
from .catalogue import DATASETS, FEW_SHOT_DATASETS, IMAGENET_VARIANTS, CoOpDataset, Layout, by_split_file, dataset
from .source import DataSource, few_shot_split, from_folder
from .templates import resolve_templates

__all__ = [
    "DATASETS", "FEW_SHOT_DATASETS", "IMAGENET_VARIANTS", "CoOpDataset", "DataSource", "dataset", "dataset_folder",
    "expected_path", "few_shot_split", "load_data", "resolve_templates",
]


def load_data(path: str | Path, dataset_name: str | None = None, class_names: list[str] | None = None,
              class_folders: list[str] | None = None) -> DataSource:
    """The data at `path`. `class_names` picks and orders an image folder's classes (by folder or
    display name, or in `class_folders`: see `scan_image_folder`); a CoOp data set's are its own."""
    path = Path(path)
    if dataset_name is not None:
        spec = dataset(dataset_name)
        folder = dataset_folder(spec, path)
        if folder is None:
            raise DataError(f"No {spec.name} data set at {path}: expected {expected_path(spec, path)} "
                            f"(CoOp's layout, see its DATASETS.md).")
        return readers.read(spec, folder)
    if not path.is_dir():
        raise DataError(f"{path} is not a folder.")
    splits = sorted(path.glob("split_zhou_*.json"))
    if len(splits) > 1:
        raise DataError(f"{path} holds several split files ({', '.join(p.name for p in splits)}); keep one.")
    if splits:
        spec = by_split_file(splits[0].name)
        if spec is not None:
            return readers.read(spec, path)
        name = splits[0].stem.removeprefix("split_zhou_")  # a data set of one's own: paths under the folder
        return readers.read_split_file(splits[0], path, name, None)
    imagenet = DATASETS["imagenet"]
    if dataset_folder(imagenet, path) == path:
        return readers.read(imagenet, path)
    return from_folder(scan_image_folder(path, class_names, class_folders))


def dataset_folder(spec: CoOpDataset, root: str | Path) -> Path | None:
    """`root/<folder>` (CoOp's DATASET.ROOT holding every data set), or `root` itself, whichever
    holds the data set; None if neither does."""
    root = Path(root)
    for candidate in (root / spec.folder, root):
        if (candidate / _marker(spec)).exists():
            return candidate
    return None


def expected_path(spec: CoOpDataset, root: str | Path) -> Path:
    """What `dataset_folder` looks for under `root`: the split file, ImageNet's images/train, …"""
    return Path(root) / spec.folder / _marker(spec)


def _marker(spec: CoOpDataset) -> str:
    return {
        Layout.SPLIT: spec.split_file,
        Layout.IMAGENET: f"{spec.images}/train",
        Layout.AIRCRAFT: "variants.txt",
        Layout.IMAGENET_BY_INDEX: spec.images,
        Layout.IMAGENET_BY_WNID: spec.images,
    }[spec.layout]
