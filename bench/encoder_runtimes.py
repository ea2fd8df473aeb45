"""Which image encoder serves fastest while keeping the predictions: the defaults' evidence.

1. Agreement with PyTorch fp32 on real images, with the tiny backbone pretrained on Fashion-MNIST
   (upt/weights, the only CLIP here that knows anything): top-1 agreement, the largest |Δlogit| and
   the accuracy of each runtime and precision, for three tasks over the committed fixture's four
   classes: zero-shot, and UPT and VPT-deep trained on the fixture's 64 training images. Images:
   the fixture's 40 held-out test images, each in 10 random crops/flips (400 views), and, where
   Debian's Fashion-MNIST is at hand (`--fashion-mnist`, `apt-get install dataset-fashion-mnist`),
   every test-split image of the four classes that is not in the fixture (3,896 images, none trained on).
   int8 is calibrated on the fixture's training images (each as the eval transform sees it and in
   random crops/flips: `--calibration-views`), never on the images it is measured on.
2. Speed on ViT-B-16 (random weights; the cost does not depend on the values): each runtime and
   precision against raw PyTorch fp32 `encode_image`, same batch, as ratios: each round times the
   raw pass and then every encoder once, and each ratio is against the raw pass of its own round
   (the median over the rounds, with the lowest and highest).

Run on a quiet machine if you can; the script says how many threads torch uses.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image

from _timing import interleaved_ratios, machine
from upt.backbone import load_backbone, random_backbone
from upt.compiled import OpenVinoImageEncoder, cpu_has_bf16, nncf_available, openvino_available
from upt.data import eval_transform, scan_image_folder
from upt.predict import Predictor
from upt.serving import TorchImageEncoder
from upt.tiny import PRETRAINED_TINY, TINY_MODEL
from upt.training import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "fashion_mnist"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
COMBOS = (("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "fp16"), ("openvino", "int8"), ("pytorch", "bf16"))


@dataclass(frozen=True)
class Images:
    name: str
    images: torch.Tensor  # preprocessed, (n, 3, size, size)
    labels: torch.Tensor  # indices into the fixture's class names


def available(combos: str) -> list[tuple[str, str]]:
    chosen = [tuple(c.split(":")) for c in combos.split(",")]
    unknown = [c for c in chosen if c not in COMBOS]
    if unknown:
        raise SystemExit(f"unknown runtime:precision {unknown}; choose from {COMBOS}")
    return [(runtime, precision) for runtime, precision in chosen
            if (runtime != "openvino" or openvino_available()) and (precision != "int8" or nncf_available())]


def encoder(backbone, runtime: str, precision: str, cache: Path, calibration: torch.Tensor):
    if runtime == "openvino":
        return OpenVinoImageEncoder(backbone, precision, cache, calibration=calibration)
    return TorchImageEncoder(backbone, precision)


def calibration_images(backbone, views: int) -> torch.Tensor:
    """int8's calibration set: the fixture's training images, each through the eval transform and in
    `views - 1` random crops and flips (real images, none of those the agreement is measured on)."""
    torch.manual_seed(1)
    plain = eval_transform(backbone.image)
    augment = T.Compose([T.RandomResizedCrop(backbone.image.size, scale=(0.5, 1.0)), T.RandomHorizontalFlip(),
                         T.ToTensor(), T.Normalize(backbone.image.mean, backbone.image.std)])
    batch = []
    for sample in scan_image_folder(FIXTURE / "train").samples:
        with Image.open(sample.path) as image:
            rgb = image.convert("RGB")
            batch.append(plain(rgb))
            batch.extend(augment(rgb) for _ in range(views - 1))
    return torch.stack(batch)


def held_out_views(backbone, views: int) -> Images:
    """The fixture's held-out test images, each in `views` random crops and flips."""
    torch.manual_seed(0)
    augment = T.Compose([T.RandomResizedCrop(backbone.image.size, scale=(0.5, 1.0)), T.RandomHorizontalFlip(),
                         T.ToTensor(), T.Normalize(backbone.image.mean, backbone.image.std)])
    batch, labels = [], []
    for sample in scan_image_folder(FIXTURE / "test").samples:
        with Image.open(sample.path) as image:
            rgb = image.convert("RGB")
            batch.extend(augment(rgb) for _ in range(views))
            labels.extend([sample.label] * views)
    return Images(f"{len(batch)} views of the fixture's {len(batch) // views} test images",
                  torch.stack(batch), torch.tensor(labels))


def rest_of_test_split(backbone, source: Path) -> Images | None:
    """Debian's Fashion-MNIST test split, the fixture's classes, less the fixture's own images (their
    file names are their indices in the split), through the eval transform."""
    if not (source / "t10k-images-idx3-ubyte.gz").is_file():
        print(f"  ({source} has no Fashion-MNIST: agreement on the fixture's images only)")
        return None
    sys.path.insert(0, str(ROOT / "scripts"))
    from fashion_mnist import LABELS, read_split  # the developer scripts' reader of the IDX files

    images, labels = read_split("test", source)
    fixture = {int(p.stem) for p in FIXTURE.rglob("*.png")}
    class_names = scan_image_folder(FIXTURE / "test").class_names
    transform = eval_transform(backbone.image)
    batch, chosen = [], []
    for index, label in enumerate(labels.tolist()):
        name = LABELS[label]
        if name in class_names and index not in fixture:
            batch.append(transform(Image.fromarray(images[index], mode="L").convert("RGB")))
            chosen.append(class_names.index(name))
    return Images(f"{len(batch)} other test-split images of the fixture's classes", torch.stack(batch),
                  torch.tensor(chosen))


def agreement_tasks(tiny, args, work: Path) -> list[tuple[str, Predictor]]:
    class_names = scan_image_folder(FIXTURE / "test").class_names
    tasks = [("zero-shot", Predictor.zero_shot(tiny, class_names))]
    for method in ("upt", "vpt-deep"):
        config = TrainConfig.of(method, shots=16, epochs=args.epochs, lr=0.05, batch_size=16, seed=1)
        result = train(tiny, FIXTURE / "train", config, work / method)
        tasks.append((method, Predictor.from_artifact(tiny, result.artifact_dir)))
    return tasks


def agreement(args, work: Path) -> None:
    tiny = load_backbone(TINY_MODEL, str(PRETRAINED_TINY), "cpu")
    sets = [held_out_views(tiny, args.views), rest_of_test_split(tiny, args.fashion_mnist)]
    sets = [s for s in sets if s is not None]
    combos = available(args.combos)
    calibration = calibration_images(tiny, args.calibration_views)
    encoders = {combo: encoder(tiny, *combo, work / "ov", calibration) for combo in combos}
    print(f"## agreement with PyTorch fp32: tiny backbone pretrained on Fashion-MNIST ({PRETRAINED_TINY.name}), "
          f"real Fashion-MNIST test images; int8 calibrated on {len(calibration)} views of the fixture's "
          f"training images")
    for method, predictor in agreement_tasks(tiny, args, work):
        prompts = predictor.visual_prompts
        for images in sets:
            reference = predictor.head(TorchImageEncoder(tiny)(images.images, prompts))
            truth = images.labels
            print(f"  {method:9s} on {images.name}: pytorch fp32 accuracy "
                  f"{(reference.argmax(-1) == truth).float().mean().item():.2%}")
            for combo in combos:
                served = predictor.head(encoders[combo](images.images, prompts))
                agree = (served.argmax(-1) == reference.argmax(-1)).float().mean().item()
                print(f"    {combo[0]:8s} {combo[1]}: top-1 agreement {agree:.2%}, max |Δlogit| "
                      f"{(served - reference).abs().max().item():.2e}, accuracy "
                      f"{(served.argmax(-1) == truth).float().mean().item():.2%}")
        sys.stdout.flush()


def speed(args, work: Path) -> None:
    backbone = random_backbone(args.model, "cpu")
    size = backbone.image.size
    images = torch.randn(args.batch, 3, size, size)
    prompts = torch.randn(1, 4, backbone.vision_width) * 0.02  # a UPT/VPT-shallow task's 4 visual tokens
    print(f"## {args.model}, batch {args.batch}, 4 visual prompts, {machine()}, bf16 units: "
          f"{cpu_has_bf16() if openvino_available() else 'n/a'}")
    calibration = calibration_images(backbone, 1)[: args.speed_calibration]  # the speed needs no more
    reference = TorchImageEncoder(backbone)(images, prompts)
    served = {}
    for runtime, precision in [("pytorch", "fp32")] + available(args.combos):
        start = time.perf_counter()
        name = f"{runtime} {precision}"
        served[name] = encoder(backbone, runtime, precision, work / "ov", calibration)
        error = (served[name](images, prompts) - reference).abs().max().item()
        print(f"  {name:13s}: built in {time.perf_counter() - start:.0f} s, max |feature - fp32| {error:.1e}")
    sys.stdout.flush()
    raw, ratios = interleaved_ratios(lambda: backbone.clip.encode_image(images),
                                     {name: (lambda e=e: e(images, prompts)) for name, e in served.items()},
                                     args.repeats)
    print(f"  raw PyTorch fp32 encode_image: {1000 * raw:8.1f} ms (1.00x); each ratio is against the raw pass "
          f"of its own round: median of {args.repeats} rounds (lowest-highest)")
    for name, ratio in ratios.items():
        print(f"  {name:13s}: {1000 * ratio.seconds:8.1f} ms  {ratio.median:5.2f}x raw throughput "
              f"({ratio.low:.2f}-{ratio.high:.2f})")
    if {"openvino fp32", "openvino int8"} <= ratios.keys():
        print(f"  openvino int8 vs openvino fp32: "
              f"{ratios['openvino fp32'].seconds / ratios['openvino int8'].seconds:.2f}x throughput")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--views", type=int, default=10)
    parser.add_argument("--fashion-mnist", type=Path, default=DEBIAN_FASHION_MNIST,
                        help="folder of Fashion-MNIST's IDX files (Debian's dataset-fashion-mnist)")
    parser.add_argument("--combos", default=",".join(f"{r}:{p}" for r, p in COMBOS),
                        help="runtime:precision pairs compared with PyTorch fp32")
    parser.add_argument("--calibration-views", type=int, default=4, help="int8 calibration views per training image")
    parser.add_argument("--speed-calibration", type=int, default=32, help="int8 calibration images for the speed")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-agreement", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_agreement:
            agreement(args, Path(tmp))
            sys.stdout.flush()
        if not args.skip_speed:
            speed(args, Path(tmp))


if __name__ == "__main__":
    main()
