"""How soon a task's instant stage (training-free Tip-Adapter, built by the API) is ready, with the
cache encoded by each serving image encoder against the backbone's PyTorch fp32 tower.

The instant stage is `train(..., tip-adapter)` with the API's serving encoder as `cache_encoder`
(service/instant.py): it encodes `--views` augmented views of every shot and the validation images;
the zero-shot classifier, the final evaluation and the variance analysis stay in PyTorch. Measured in
one process, one build after the other, on the committed Fashion-MNIST fixture (4 classes) and
ViT-B-16 with random weights (the cost does not depend on the values). Prints each build's seconds,
its ratio to the PyTorch build, and how far its cache keys are from the PyTorch build's.

Then what a /classify sees meanwhile: a build with the first precision again, while a client thread
sends one image every 0.5 s through the same encoder. Once as before `service.shared_encoder` (the
cache's passes of up to 64 images take the compiled encoder's lock like any pass), once as the API
does now (`service.shared_encoder`: slices of 8 images that yield to /classify). Prints each
image's wait (median, max) and the build's seconds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from _timing import machine

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "fashion_mnist" / "train"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--views", type=int, default=10, help="UPT_INSTANT_AUGMENT_VIEWS (default 10)")
    parser.add_argument("--precisions", default="bf16,fp32", help="OpenVINO precisions to compare")
    args = parser.parse_args()

    from service.shared_encoder import SharedImageEncoder
    from upt.artifact import load_artifact
    from upt.backbone import random_backbone
    from upt.serving import build_image_encoder
    from upt.training import TrainConfig, train

    backbone = random_backbone(args.model)
    config = TrainConfig.of("tip-adapter", shots=args.shots, augment_views=args.views)
    print(f"# instant stage of {args.model} (random weights), {args.shots} shots x 4 classes, {args.views} views, "
          f"{machine()}")
    with tempfile.TemporaryDirectory(prefix="upt-instant-") as tmp:
        def build(name: str, cache_encoder) -> tuple[float, torch.Tensor]:
            start = time.perf_counter()
            result = train(backbone, FIXTURE, config, Path(tmp) / name, cache_encoder=cache_encoder)
            seconds = time.perf_counter() - start
            return seconds, load_artifact(result.artifact_dir).tensors["cache_keys"]

        reference_s, reference_keys = build("pytorch", None)
        print(f"PyTorch fp32 tower (before): {reference_s:.1f} s")
        encoders = []
        for precision in args.precisions.split(","):
            encoder, note = build_image_encoder(backbone, "openvino", precision)
            encoders.append(encoder)
            seconds, keys = build(precision, lambda images: encoder(images, None, normalize=False))
            cosine = float(torch.nn.functional.cosine_similarity(keys, reference_keys).min())
            print(f"{encoder.describe()}{f' ({note})' if note else ''}: {seconds:.1f} s = {reference_s / seconds:.2f}x "
                  f"sooner; keys max |diff| {float((keys - reference_keys).abs().max()):.1e}, min cosine {cosine:.6f}")

        encoder = encoders[0]  # the first precision's, compiled above
        shared = SharedImageEncoder(encoder)
        image = torch.randn(1, 3, backbone.image.size, backbone.image.size)
        for index, (name, classify, cache_encoder) in enumerate((
                ("one lock, passes of up to 64 images (before)", lambda: encoder(image, None),
                 lambda images: encoder(images, None, normalize=False)),
                (f"/classify first, slices of {shared.background_slice} images (now)", lambda: shared(image, None),
                 lambda images: shared.background(images, normalize=False)))):
            waits, seconds = _classify_during(lambda: build(f"during-{index}", cache_encoder)[0], classify)
            print(f"/classify of one image during a build, {name}: wait median {1000 * statistics.median(waits):.0f} ms, "
                  f"max {1000 * max(waits):.0f} ms over {len(waits)} requests; build {seconds:.1f} s")


def _classify_during(run_build, classify, every_s: float = 0.5) -> tuple[list[float], float]:
    """Each `classify()`'s seconds, called every `every_s` while `run_build()` runs, and the build's seconds."""
    classify()  # warm
    done, waits = threading.Event(), []

    def client() -> None:
        while not done.is_set():
            start = time.perf_counter()
            classify()
            waits.append(time.perf_counter() - start)
            done.wait(every_s)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        seconds = run_build()
    finally:
        done.set()
        thread.join()
    return waits, seconds


if __name__ == "__main__":
    main()
