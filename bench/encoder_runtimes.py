"""Which image encoder serves fastest while keeping the predictions: the defaults' evidence.

1. Top-1 agreement with PyTorch fp32, on trained artifacts: UPT and VPT-deep trained on the committed
   Fashion-MNIST fixture with the tiny backbone (random weights: the only CLIP we have), evaluated on
   the 40 held-out test images, each in 10 random crops/flips (400 images never trained on).
2. Speed on ViT-B-16 (random weights; the cost does not depend on the values): each runtime and
   precision against raw PyTorch fp32 `encode_image`, same batch, same run, as ratios.

Run on a quiet machine if you can; the script says how many threads torch uses.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image

from _timing import machine, median_seconds
from upt.backbone import load_backbone, random_backbone
from upt.compiled import OpenVinoImageEncoder, cpu_has_bf16, openvino_available
from upt.data import scan_image_folder
from upt.predict import Predictor
from upt.serving import TorchImageEncoder
from upt.tiny import TINY_MODEL, write_tiny_checkpoint
from upt.training import TrainConfig, train

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "fashion_mnist"
COMBOS = (("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "fp16"), ("pytorch", "bf16"))


def encoder(backbone, runtime: str, precision: str, cache: Path):
    if runtime == "openvino":
        return OpenVinoImageEncoder(backbone, precision, cache)
    return TorchImageEncoder(backbone, precision)


def held_out_views(backbone, views: int) -> torch.Tensor:
    """The held-out test images, each in `views` random crops and flips, as the eval transform sees them."""
    torch.manual_seed(0)
    augment = T.Compose([T.RandomResizedCrop(backbone.image.size, scale=(0.5, 1.0)), T.RandomHorizontalFlip(),
                         T.ToTensor(), T.Normalize(backbone.image.mean, backbone.image.std)])
    samples = scan_image_folder(FIXTURE / "test").samples
    batch = []
    for sample in samples:
        with Image.open(sample.path) as image:
            rgb = image.convert("RGB")
            batch.extend(augment(rgb) for _ in range(views))
    return torch.stack(batch)


def agreement(args, work: Path) -> None:
    tiny = load_backbone(TINY_MODEL, str(write_tiny_checkpoint(work / "tiny.pt")), "cpu")
    images = held_out_views(tiny, args.views)
    print(f"## top-1 agreement with PyTorch fp32: trained tiny artifacts, {len(images)} held-out views")
    for method in ("upt", "vpt-deep"):
        config = TrainConfig(method, shots=16, epochs=args.epochs, lr=0.05, batch_size=16, seed=1)
        result = train(tiny, FIXTURE / "train", config, work / method)
        predictor = Predictor.from_artifact(tiny, result.artifact_dir)
        reference = predictor.head(TorchImageEncoder(tiny)(images, predictor.visual_prompts)).argmax(-1)
        accuracy = result.metrics["val_accuracy"]
        line = [f"{method:9s} (validation accuracy {accuracy:.1%})"]
        for runtime, precision in COMBOS:
            if runtime == "openvino" and not openvino_available():
                continue
            served = predictor.head(encoder(tiny, runtime, precision, work / "ov")(images, predictor.visual_prompts))
            line.append(f"{runtime} {precision}: {(served.argmax(-1) == reference).float().mean().item():.2%}")
        print("  " + " | ".join(line))


def speed(args, work: Path) -> None:
    backbone = random_backbone(args.model, "cpu")
    size = backbone.image.size
    images = torch.randn(args.batch, 3, size, size)
    prompts = torch.randn(1, 4, backbone.vision_width) * 0.02  # a UPT/VPT-shallow task's 4 visual tokens
    print(f"## {args.model}, batch {args.batch}, 4 visual prompts, {machine()}, bf16 units: "
          f"{cpu_has_bf16() if openvino_available() else 'n/a'}")
    raw = median_seconds(lambda: backbone.clip.encode_image(images), args.repeats)
    reference = TorchImageEncoder(backbone)(images, prompts)
    print(f"  raw PyTorch fp32 encode_image: {1000 * raw:8.1f} ms (1.00x)")
    for runtime, precision in (("pytorch", "fp32"),) + COMBOS:
        if runtime == "openvino" and not openvino_available():
            continue
        start = time.perf_counter()
        served = encoder(backbone, runtime, precision, work / "ov")
        ready = time.perf_counter() - start
        seconds = median_seconds(lambda: served(images, prompts), args.repeats)
        error = (served(images, prompts) - reference).abs().max().item()
        print(f"  {runtime:8s} {precision}: {1000 * seconds:8.1f} ms  {raw / seconds:5.2f}x raw throughput  "
              f"max |feature - fp32| {error:.1e}  (built in {ready:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--views", type=int, default=10)
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
