"""The Fashion-MNIST fixture laid out as data sets of CoOp's benchmark (symbolic links, no copies)."""

from __future__ import annotations

import os
from pathlib import Path

FASHION = Path(__file__).parents[1] / "fixtures" / "fashion_mnist"
DISPLAY = ["handbag", "pullover sweater", "sneaker shoe", "pair of trousers"]  # the split file's names
FOLDERS = ["bag", "pullover", "sneaker", "trouser"]


def coop_root(root: Path, folder: str, images: str, split_file: str) -> Path:
    """The Fashion-MNIST fixture posing as one of CoOp's data sets under `root`."""
    (root / folder).mkdir(parents=True)
    os.symlink(FASHION, root / folder / images) if images else None
    (root / folder / split_file).write_text((FASHION / "split_zhou_FashionMNIST.json").read_text())
    return root


def imagenet_root(root: Path) -> Path:
    """ImageNet and three of its variants in CoOp's layout, made of the fixture's four classes."""
    wnids = ["n04", "n02", "n03", "n01"]  # not in the classes' alphabetical order, as real wnids are not
    names = dict(zip(wnids, ["pair of trousers", "pullover sweater", "sneaker shoe", "handbag"]))
    by_wnid = dict(zip(wnids, ["trouser", "pullover", "sneaker", "bag"]))
    classnames = "".join(f"{w} {names[w]}\n" for w in sorted(wnids))
    for split, source in (("train", "train"), ("val", "test")):
        for wnid, folder in by_wnid.items():
            (root / "imagenet/images" / split).mkdir(parents=True, exist_ok=True)
            os.symlink(FASHION / source / folder, root / "imagenet/images" / split / wnid)
    (root / "imagenet/classnames.txt").write_text(classnames)
    for variant, images in (("imagenet-adversarial", "imagenet-a"), ("imagenet-rendition", "imagenet-r")):
        (root / variant / images).mkdir(parents=True)
        for wnid in ("n03", "n01"):  # a subset of the classes, as -A and -R hold 200 of the 1000
            os.symlink(FASHION / "test" / by_wnid[wnid], root / variant / images / wnid)
        (root / variant / images / "README.txt").write_text("not a class\n")
    (root / "imagenet-sketch/images").mkdir(parents=True)
    for wnid in wnids:
        os.symlink(FASHION / "test" / by_wnid[wnid], root / "imagenet-sketch/images" / wnid)
    v2 = root / "imagenetv2/imagenetv2-matched-frequency-format-val"
    v2.mkdir(parents=True)
    (root / "imagenetv2/classnames.txt").write_text(classnames)
    for label, wnid in enumerate(sorted(wnids)):
        os.symlink(FASHION / "test" / by_wnid[wnid], v2 / str(label))
    return root
