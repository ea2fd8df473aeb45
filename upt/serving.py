"""Serving many tasks through one image-encoder pass.

A predictor needs from the image encoder either the raw image features (zero-shot, CoOp: tasks that
learn nothing visual) or the features under its own visual prompts (VPT, UPT). Requests are grouped by
what the encoder needs, not by task: every raw-feature request of one backbone shares one pass, and
visual-prompt requests with the same number of prompt tokens share one pass with the prompts given per
sample, whatever their depth (VPT-shallow, VPT-deep and UPT tasks together: each sample's prompts
reach only its own task's layers). Each request's logits are then its own classifier applied to its
rows, the same arithmetic as `Predictor.logits` (tests check the results are equal).

A task with image adapters (CLIP-LoRA) changes the tower's weights, which neither the compiled graphs
nor the other tasks' passes carry: its requests share a PyTorch pass of their own, with its adapters.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from .backbone import Backbone
from .data import IMAGE_SUFFIXES, eval_transform, read_image_file
from .encoders import encode_image
from .errors import DataError
from .predict import Predictor

if TYPE_CHECKING:
    from .compiled import OpenVinoImageEncoder


class ImageEncoder(Protocol):
    """Image features (batch, d) in float32, with visual prompts shared (depth, n, width) or per
    sample (batch, depth, n, width), or none; L2-normalised unless `normalize` is False. `depths`
    (batch,), with per-sample prompts only: how many layers each sample's prompts reach (`encode_image`)."""

    runtime: str

    def describe(self) -> str: ...

    def __call__(self, images: torch.Tensor, prompts: torch.Tensor | None, normalize: bool = True,
                 depths: torch.Tensor | None = None) -> torch.Tensor: ...


RUNTIMES = ("auto", "openvino", "pytorch")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
CALIBRATION_IMAGES = 128  # int8's calibration set: NNCF's default is 300; 128 real images took ~2 min on ViT-B-16


class TorchImageEncoder:
    """The backbone's own PyTorch image tower (fp32: the reference every other runtime is compared
    to), optionally under autocast in bf16/fp16 (what serves on CUDA)."""

    runtime = "pytorch"

    def __init__(self, backbone: Backbone, precision: str = "fp32") -> None:
        if precision != "fp32" and precision not in _AUTOCAST:
            raise ValueError(f"PyTorch serves fp32, bf16 or fp16, not {precision!r}")
        self.backbone = backbone
        self.precision = precision

    def describe(self) -> str:
        return f"pytorch {self.precision} on {self.backbone.device}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: torch.Tensor | None, normalize: bool = True,
                 depths: torch.Tensor | None = None) -> torch.Tensor:
        if self.precision == "fp32":
            return encode_image(self.backbone.clip, images, prompts, normalize=normalize, depths=depths).float()
        with torch.autocast(self.backbone.device.type, dtype=_AUTOCAST[self.precision]):
            return encode_image(self.backbone.clip, images, prompts, normalize=normalize, depths=depths).float()


def build_image_encoder(backbone: Backbone, runtime: str = "auto", precision: str = "auto",
                        cache_dir: str | Path | None = None,
                        calibration: torch.Tensor | None = None) -> tuple[ImageEncoder, str]:
    """The serving image encoder and a note on how it was chosen (empty, or why it fell back).

    auto: on CUDA, PyTorch in fp16; on CPU, OpenVINO where installed: in bf16 where the CPU computes
    bf16 natively (AMX, or AVX-512 BF16), else in fp32 (bench/encoder_runtimes.py: bf16 kept ≥ 99.5 %
    top-1 agreement with PyTorch fp32 on trained artifacts, and ran 2.0x (AVX-512 BF16) to 4.2x
    (AMX) as fast as OpenVINO fp32); PyTorch fp32 without OpenVINO. A failing compilation falls back to PyTorch.

    int8 is only ever chosen by name, never by auto: OpenVINO's graphs quantized by NNCF, calibrated
    on `calibration` (preprocessed real images of the kind served; required). Its agreement with fp32
    depends on the weights and the images, so it is the operator's choice, checked on their own data
    (bench/encoder_runtimes.py). Without NNCF it serves OpenVINO fp32, without OpenVINO PyTorch fp32,
    each with a note.
    """
    from .compiled import OpenVinoImageEncoder, cpu_has_bf16, nncf_available, openvino_available

    if runtime not in RUNTIMES or precision not in PRECISIONS:
        raise ValueError(f"runtime must be one of {RUNTIMES} and precision one of {PRECISIONS}, "
                         f"not {runtime!r} and {precision!r}")
    if precision == "int8" and (runtime == "pytorch" or calibration is None):
        raise ValueError("int8 is served by OpenVINO only, and needs calibration images")
    on_cuda = backbone.device.type == "cuda"
    note = ""
    if runtime == "auto":
        runtime = "openvino" if openvino_available() and not on_cuda else "pytorch"
    elif runtime == "openvino" and (on_cuda or not openvino_available()):
        note = "OpenVINO serves CPUs only" if on_cuda else "OpenVINO is not installed"
        runtime = "pytorch"
    if runtime == "openvino":
        chosen = precision if precision != "auto" else ("bf16" if cpu_has_bf16() else "fp32")
        if chosen == "int8" and not nncf_available():
            chosen, note = "fp32", "int8 needs NNCF (pip install 'upt[int8]'): serving exact fp32"
        try:
            encoder = OpenVinoImageEncoder(backbone, chosen, cache_dir, calibration=calibration)
            disagreement = start_check(encoder, backbone)
            if disagreement:
                raise RuntimeError(f"at start, {disagreement}")
            return encoder, "; ".join(filter(None, [note, *encoder.cache_problems]))
        except Exception as error:  # a model the converter cannot take still serves, in PyTorch
            note = f"OpenVINO failed ({type(error).__name__}: {error})"
    chosen = precision if precision not in ("auto", "int8") else ("fp16" if on_cuda else "fp32")
    return TorchImageEncoder(backbone, chosen), note


# How far a compiled encoder's features may be from PyTorch fp32's at start, as 1 − cosine: exact fp32
# measured ~1e-12, bf16 up to 5e-5 and int8 up to 1e-3 (tiny and ViT-B-16), so fp32 is held to exact
# and the others to a cosine of 0.99, which a wrong graph or blob is far below.
_START_CHECK_TOLERANCE = {"fp32": 1e-6, "bf16": 1e-2, "fp16": 1e-2, "int8": 1e-2}


def start_check(encoder: OpenVinoImageEncoder, backbone: Backbone) -> str:
    """Why `encoder` must not serve, or "": its features of two fixed inputs, without and with visual
    prompts, against PyTorch fp32's. A fault that raises nothing is caught here: a compiled blob of
    another precision once gave NaN features (upt/compiled.py)."""
    generator = torch.Generator().manual_seed(0)
    size = backbone.image.size
    calibration = encoder.calibration  # int8 is held to images of the kind it was calibrated on
    images = calibration[:2] if calibration is not None else torch.randn(2, 3, size, size, generator=generator)
    prompts = torch.randn(backbone.vision_layers, 4, backbone.vision_width, generator=generator) * 0.02
    reference = TorchImageEncoder(backbone)
    tolerance = _START_CHECK_TOLERANCE[encoder.precision]
    for name, given in (("unprompted", None), ("prompted", prompts)):
        features = encoder(images, given)
        if not bool(torch.isfinite(features).all()):
            return f"its {name} features are not finite"
        gap = 1 - float(torch.nn.functional.cosine_similarity(features, reference(images, given), dim=-1).min())
        if gap > tolerance:
            return f"its {name} features are {gap:.1e} from PyTorch fp32's in 1 - cosine (at most {tolerance:.0e})"
    return ""


def calibration_images(backbone: Backbone, folder: str | Path, limit: int = CALIBRATION_IMAGES) -> torch.Tensor:
    """int8's calibration set: up to `limit` image files under `folder` (recursively, in path order,
    evenly spaced when there are more, so every class folder contributes), as the eval transform
    hands them to the encoder."""
    folder = Path(folder)
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DataError(f"No images under {folder} to calibrate the int8 image encoder on.")
    if len(paths) > limit:
        paths = [paths[i * len(paths) // limit] for i in range(limit)]
    transform = eval_transform(backbone.image)
    return torch.stack([transform(read_image_file(path)) for path in paths])


def encoder_need(predictor: Predictor) -> Hashable:
    """Requests with equal needs can share one encoder pass: the backbone, and the prompt tokens'
    count and width (not their depth: `depths` tells each sample's); or, with image adapters, the
    predictor itself."""
    if predictor.lora is not None:
        return id(predictor.backbone), ("lora", id(predictor))
    prompts = predictor.visual_prompts
    shape = None if prompts is None else (tuple(prompts.shape[1:]), prompts.dtype)
    return id(predictor.backbone), shape


def logits_together(encoder: ImageEncoder, requests: Sequence[tuple[Predictor, torch.Tensor]]) -> list[torch.Tensor]:
    """Each request's logits, from one encoder pass over all their images (all must share one need)."""
    return [predictor.head(features)
            for (predictor, _), features in zip(requests, features_together(encoder, requests))]


def features_together(encoder: ImageEncoder, requests: Sequence[tuple[Predictor, torch.Tensor]]) -> list[torch.Tensor]:
    """Each request's normalised image features, from one encoder pass over all their images (all must
    share one need); its head (`predictor.head`) is the caller's to run, on its own thread."""
    images = torch.cat([batch for _, batch in requests]) if len(requests) > 1 else requests[0][1]
    if requests[0][0].lora is not None:  # one CLIP-LoRA task's requests: its adapted PyTorch tower
        features = requests[0][0].image_features(images)
    else:
        prompts, depths = _prompts(requests)
        features = encoder(images, prompts, depths=depths)
    out, start = [], 0
    for _, batch in requests:
        out.append(features[start:start + len(batch)])
        start += len(batch)
    return out


def _prompts(requests: Sequence[tuple[Predictor, torch.Tensor]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The pass's prompts: shared by the batch for one task, else per sample (batch, depth, n, width),
    padded to the deepest task's depth with each sample's depth beside them where the depths differ."""
    first = requests[0][0].visual_prompts
    if first is None:
        return None, None
    if all(predictor is requests[0][0] for predictor, _ in requests):
        return first, None  # one task: its prompts are shared by the batch, nothing to copy
    deepest = max(len(predictor.visual_prompts) for predictor, _ in requests)
    per_sample = torch.zeros(sum(len(batch) for _, batch in requests), deepest, *first.shape[1:], dtype=first.dtype)
    depths = torch.empty(len(per_sample), dtype=torch.long)
    start = 0
    for predictor, batch in requests:
        prompts = predictor.visual_prompts
        per_sample[start:start + len(batch), :len(prompts)] = prompts
        depths[start:start + len(batch)] = len(prompts)
        start += len(batch)
    return per_sample, (None if bool((depths == deepest).all()) else depths)
