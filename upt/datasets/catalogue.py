"""The data sets of CoOp's benchmark, as its `DATASETS.md` lays them out on disk.

`name` is the file name of CoOp's config (`configs/datasets/<name>.yaml`), `title` its
`DATASET.NAME` (which also names the split file, `split_zhou_<title>.json`), `folder` the data set's
folder under the root and `images` its image folder inside that. `template` is CoOp's hand-written
prompt for the data set (its `CUSTOM_TEMPLATES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..errors import DataError


class Layout(str, Enum):
    SPLIT = "split"                  # split_zhou_<title>.json: train/val/test lists of [path, label, class name]
    IMAGENET = "imagenet"            # classnames.txt, images/train/<wnid>, images/val/<wnid>
    AIRCRAFT = "aircraft"            # variants.txt, images_variant_{train,val,test}.txt
    IMAGENET_BY_INDEX = "by-index"   # ImageNet-V2: <images>/<0..999>/, labels are ImageNet's indices
    IMAGENET_BY_WNID = "by-wnid"     # Sketch, -A, -R: <images>/<wnid>/, the classes whose folders exist


@dataclass(frozen=True)
class CoOpDataset:
    name: str
    title: str
    folder: str
    images: str
    layout: Layout
    template: str
    trains: bool = True  # False: an evaluation set (ImageNet's variants, for an ImageNet artifact)

    @property
    def split_file(self) -> str:
        return f"split_zhou_{self.title}.json"

    @property
    def ensemble_adds_template(self) -> bool:
        """CoOp's prompt ensemble adds the data set's own template, except for ImageNet (whose is
        "a photo of a {}.")."""
        return self.title != "ImageNet"


_PHOTO = "a photo of a {}."

DATASETS: dict[str, CoOpDataset] = {d.name: d for d in (
    CoOpDataset("imagenet", "ImageNet", "imagenet", "images", Layout.IMAGENET, _PHOTO),
    CoOpDataset("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories", Layout.SPLIT, _PHOTO),
    CoOpDataset("oxford_pets", "OxfordPets", "oxford_pets", "images", Layout.SPLIT, "a photo of a {}, a type of pet."),
    CoOpDataset("stanford_cars", "StanfordCars", "stanford_cars", "", Layout.SPLIT, _PHOTO),
    CoOpDataset("oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg", Layout.SPLIT,
                "a photo of a {}, a type of flower."),
    CoOpDataset("food101", "Food101", "food-101", "images", Layout.SPLIT, "a photo of {}, a type of food."),
    CoOpDataset("fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", "images", Layout.AIRCRAFT,
                "a photo of a {}, a type of aircraft."),
    CoOpDataset("sun397", "SUN397", "sun397", "SUN397", Layout.SPLIT, _PHOTO),
    CoOpDataset("dtd", "DescribableTextures", "dtd", "images", Layout.SPLIT, "{} texture."),
    CoOpDataset("eurosat", "EuroSAT", "eurosat", "2750", Layout.SPLIT, "a centered satellite photo of {}."),
    CoOpDataset("ucf101", "UCF101", "ucf101", "UCF-101-midframes", Layout.SPLIT, "a photo of a person doing {}."),
    CoOpDataset("imagenetv2", "ImageNetV2", "imagenetv2", "imagenetv2-matched-frequency-format-val",
                Layout.IMAGENET_BY_INDEX, _PHOTO, trains=False),
    CoOpDataset("imagenet_sketch", "ImageNetSketch", "imagenet-sketch", "images", Layout.IMAGENET_BY_WNID, _PHOTO,
                trains=False),
    CoOpDataset("imagenet_a", "ImageNetA", "imagenet-adversarial", "imagenet-a", Layout.IMAGENET_BY_WNID, _PHOTO,
                trains=False),
    CoOpDataset("imagenet_r", "ImageNetR", "imagenet-rendition", "imagenet-r", Layout.IMAGENET_BY_WNID, _PHOTO,
                trains=False),
)}

# The 11 data sets of the paper's few-shot experiments (its Figure 4 and Table 2), in its order.
FEW_SHOT_DATASETS: tuple[str, ...] = (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
    "sun397", "dtd", "eurosat", "ucf101",
)
# Domain generalisation (the paper's Table 1): trained on ImageNet, evaluated on these.
IMAGENET_VARIANTS: tuple[str, ...] = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def dataset(name: str) -> CoOpDataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"Unknown data set {name!r}; CoOp's are: {', '.join(DATASETS)}.") from None


def by_split_file(file_name: str) -> CoOpDataset | None:
    return next((d for d in DATASETS.values() if d.layout is Layout.SPLIT and d.split_file == file_name), None)
