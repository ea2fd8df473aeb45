"""The image encoder compiled with OpenVINO, for serving on CPUs (training always runs in PyTorch;
the API's training-free instant stage encodes its cache's views with it, no gradient being needed).

One compiled model per backbone serves every task: the visual prompts are an input of the graph,
(batch, layers, n, width) with the batch and the prompt count n dynamic, and `replace` (batch, layers)
says at which layers each sample's prompts replace the previous layer's outputs (1 up to its task's
depth, 0 after), so VPT-shallow, VPT-deep and UPT tasks of any depth run through the same graph, in
the same pass. Unprompted requests (zero-shot, CoOp) use a second graph without prompt inputs. Both
are converted once and saved as OpenVINO IR under `cache_dir` (keyed by the backbone's weights sha256
and the library version), so a restart reads them instead of tracing the model again; compiling
happens once, at load. The folder only saves time: a damaged file is converted again and replaced,
and where nothing can be written (a full or read-only volume) the compiled encoder serves all the
same and `cache_problems` says why. Compiled blobs (OpenVINO's CACHE_DIR) are kept beside them, in a
folder per compile setting: OpenVINO's blob key leaves the precision hint out, so with one folder a
bf16 encoder imported the blob an exact-fp32 start had compiled, and ViT-B-16 then gave NaN
features three times slower.

Precision: "fp32" is exact to float rounding (features equal to ~1e-6); "bf16"/"fp16" run the
matrix products in 16 bits where the CPU supports it (bench/encoder_runtimes.py prints the top-1
agreement with PyTorch fp32 on trained artifacts, and the speed of each). "int8" quantizes the fp32
graphs (with the last block at every position, see `_model`) after training with NNCF
(`nncf.quantize`, transformer preset: the linear layers' and attention matrix products' inputs and
weights in 8 bits; layer norms, softmax and the residual sums stay fp32), calibrated on real images
the caller gives; the int8 units (AVX-512 VNNI, AMX) run those products several times faster than
fp32. The quantized graphs are cached too, keyed by the calibration images.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone
from .encoders import first_token_block, pools_first_token

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
# int8: the quantized products run in int8, everything else in exact fp32 (not bf16 as well).
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
# Calibration prompts of the prompted graph: 4 tokens (the methods' default) drawn as the methods
# initialise them, N(0, 0.02²), replacing at the first layer only (shallow) or at every layer (deep),
# alternately; the layer norm in front of each block's products makes their scale matter little.
_CALIBRATION_PROMPTS, _CALIBRATION_STD = 4, 0.02
# What the saved graphs compute, in their folder's name, so that no graph of another format is read
# back as these: none (normalised features), then "raw-features" (raw, `replace` one per layer), then
# "sample-depths" (`replace` per sample and layer), now that with the last block run at [CLS] only
# (the same features, but a restart would otherwise keep reading the slower saved graph).
_GRAPH_FORMAT = "sample-depths-cls-last"


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def nncf_available() -> bool:
    """NNCF (OpenVINO's quantizer) makes the int8 graphs; serving them needs only OpenVINO."""
    return importlib.util.find_spec("nncf") is not None


def cpu_has_bf16() -> bool:
    """Whether OpenVINO runs bf16 on this CPU's bf16 units of the two kinds where it was measured
    faster than fp32 (bench/encoder_runtimes.py, ViT-B-16 batch 32): AMX, 5.3x raw PyTorch fp32, and
    AVX-512 BF16 alone (AMD Zen 4), 2.5x. OpenVINO also reports bf16 on CPUs with only AVX2 bf16
    conversions, where it was never measured."""
    import openvino as ov

    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: unknown, so exact fp32
        return False
    units = "amx_bf16" in flags or "avx512_bf16" in flags
    return units and "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class _PromptedImageTower(nn.Module):
    """`encoders.encode_image` with per-sample prompts for every layer and a per-layer replace mask,
    written for tracing (no Python branches on the prompts' values). Raw features: the caller
    normalises them (Tip-Adapter's cache averages raw features before normalising)."""

    def __init__(self, clip, first_token_only: bool = True) -> None:
        super().__init__()
        self.visual = clip.visual
        self.first_token_only = first_token_only and pools_first_token(clip.visual)

    def forward(self, images: torch.Tensor, prompts: torch.Tensor, replace: torch.Tensor) -> torch.Tensor:
        """prompts (batch, layers, n, width); replace (batch, layers): 1 where the sample's prompts
        replace the previous layer's outputs at that layer, 0 where those carry on."""
        visual = self.visual
        x = self._embed(images)
        n = prompts.shape[2]
        x = torch.cat([x[:, :1], prompts[:, 0].to(x.dtype), x[:, 1:]], dim=1)
        x = visual.ln_pre(x)
        for index, block in enumerate(visual.transformer.resblocks):
            if index > 0:
                kept = x[:, 1:1 + n]
                swapped = torch.where(replace[:, index].view(-1, 1, 1) > 0, prompts[:, index].to(x.dtype), kept)
                x = torch.cat([x[:, :1], swapped, x[:, 1 + n:]], dim=1)
            x = self._block(block, x, last=index == len(visual.transformer.resblocks) - 1)
        if not self.first_token_only:
            x = torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)
        return self._pool(x)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        x = visual.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)

    def _block(self, block: nn.Module, x: torch.Tensor, last: bool) -> torch.Tensor:
        """x (batch, tokens, width); the last block at [CLS] only where that is all the pool reads."""
        batch_first = self.visual.transformer.batch_first
        x = x if batch_first else x.transpose(0, 1)
        x = first_token_block(block, x, batch_first) if last and self.first_token_only else block(x)
        return x if batch_first else x.transpose(0, 1)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.visual._pool(x)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return pooled


class _PlainImageTower(_PromptedImageTower):
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = self.visual.ln_pre(self._embed(images))
        blocks = self.visual.transformer.resblocks
        for index, block in enumerate(blocks):
            x = self._block(block, x, last=index == len(blocks) - 1)
        return self._pool(x)


class OpenVinoImageEncoder:
    """Image features from the OpenVINO-compiled tower, normalised unless asked for raw ones (see the
    module's docstring).

    `calibration`: preprocessed images (n, 3, size, size), required for int8 and used only for it."""

    runtime = "openvino"

    def __init__(self, backbone: Backbone, precision: str = "bf16", cache_dir: str | Path | None = None,
                 threads: int | None = None, calibration: torch.Tensor | None = None) -> None:
        import openvino as ov

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        if precision == "int8" and (calibration is None or len(calibration) == 0):
            raise ValueError("int8 needs calibration images: real images of the kind that will be served.")
        self.backbone = backbone
        self.precision = precision
        self.calibration = calibration if precision == "int8" else None
        self.layers = backbone.vision_layers
        # Why the cache folder could not be used: served all the same, compiled again at the next start.
        self.cache_problems: list[str] = []
        config = {"INFERENCE_PRECISION_HINT": _OV_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        folder = None if cache_dir is None else Path(cache_dir) / _cache_key(backbone)
        self._plain = self._compile(ov, self._model(ov, folder, "plain"), config, folder)
        self._prompted = self._compile(ov, self._model(ov, folder, "prompted"), config, folder)
        if folder is not None:
            _remove_other_releases(folder, _cache_prefix(backbone))
            _remove_unkeyed_blobs(folder / "blobs")
        self._lock = threading.Lock()  # one inference at a time per compiled model (the batcher's thread)

    def describe(self) -> str:
        if self.calibration is not None:
            return f"openvino int8 on cpu (calibrated on {len(self.calibration)} images)"
        return f"openvino {self.precision} on cpu"

    def __call__(self, images: torch.Tensor, prompts: torch.Tensor | None, normalize: bool = True,
                 depths: torch.Tensor | None = None) -> torch.Tensor:
        images = images.float().contiguous().numpy()
        with self._lock:
            if prompts is None:
                out = self._plain([images])[0]
            else:
                inputs = self._prompt_inputs(prompts, len(images), depths)
                out = self._prompted([images, *inputs])[0]
        features = torch.from_numpy(out.copy()).float()
        return F.normalize(features, dim=-1) if normalize else features

    def _prompt_inputs(self, prompts: torch.Tensor, batch: int, depths: torch.Tensor | None = None):
        """The prompted graph's prompts and replace mask: every sample's prompts padded to all layers,
        replacing at its first `depths[b]` layers (all it was given where no depths are)."""
        if prompts.dim() == 3:
            prompts = prompts.unsqueeze(0).expand(batch, *prompts.shape)
        depth = prompts.shape[1]
        if depth > self.layers:
            raise ValueError(f"{depth} prompted layers exceed the backbone's {self.layers}.")
        full = torch.zeros(batch, self.layers, prompts.shape[2], prompts.shape[3])
        full[:, :depth] = prompts.float()
        reach = torch.full((batch, 1), depth) if depths is None else depths.view(-1, 1)
        replace = (torch.arange(self.layers).unsqueeze(0) < reach).float()
        return full.numpy(), replace.numpy()

    def _compile(self, ov, model, config: dict, folder: Path | None):
        """The compiled model, its blob kept under `folder` (a folder per compile setting) so that a
        restart imports it instead of compiling again; where the blob cannot be written (a full or
        read-only volume), compiled without it."""
        if folder is not None:
            try:
                blobs = folder / "blobs" / _settings_key(config)
                return ov.Core().compile_model(model, "CPU", {**config, "CACHE_DIR": str(blobs)})
            except Exception as error:
                self.cache_problems.append(f"compiled blob not cached ({_reason(error, folder)})")
        return ov.Core().compile_model(model, "CPU", config)

    def _model(self, ov, folder: Path | None, kind: str):
        if self.calibration is None:
            return self._cached(ov, folder, f"{kind}.xml", lambda: self._convert(ov, kind))
        # Quantized from a graph whose last block runs at every position: quantized with that block
        # at [CLS] only (NNCF then puts quantizers on its separate query path), int8 agreed with fp32
        # less (VPT-deep: 98.75 % of 400 views against 99.50 %; |Δlogit| up to 0.58 against 0.45 for
        # UPT; bench/encoder_runtimes.py). The int8 graph is cached, so this costs one conversion.
        return self._cached(ov, folder, f"{kind}-int8-{_calibration_key(self.calibration)}.xml",
                            lambda: self._quantize(self._convert(ov, kind, first_token_only=False), kind))

    def _cached(self, ov, folder: Path | None, name: str, build: Callable[[], Any]):
        """The graph saved as `folder/name`, or `build()`'s, saved there for the next start (no folder:
        not kept). A file that cannot be read is built again and replaced; a graph that cannot be
        saved is served all the same: the folder only saves the next start some time."""
        path = None if folder is None else folder / name
        if path is not None and path.is_file():
            try:
                return ov.Core().read_model(path)
            except Exception as error:
                self.cache_problems.append(f"{name} unreadable ({type(error).__name__}), converted again")
        model = build()
        if path is not None:
            try:
                _save(ov, model, path)
                # Compiled as every later start reads it: OpenVINO keys a blob by the model it was
                # given, and the converted model's key differs from the saved one's, so a first start
                # compiled a blob that no restart would import.
                return ov.Core().read_model(path)
            except Exception as error:
                self.cache_problems.append(f"{name} not cached ({_reason(error, folder)})")
        return model

    def _quantize(self, model, kind: str):
        """The fp32 graph with int8 products, their ranges taken from the calibration images (one
        image per calibration sample, as NNCF advises for transformers)."""
        import nncf

        generator = torch.Generator().manual_seed(0)
        samples = []
        for index, image in enumerate(self.calibration.float()):
            images = image.unsqueeze(0).contiguous().numpy()
            if kind == "plain":
                samples.append([images])
                continue
            depth = 1 if index % 2 == 0 else self.layers
            prompts = torch.randn(1, depth, _CALIBRATION_PROMPTS, self.backbone.vision_width,
                                  generator=generator) * _CALIBRATION_STD
            samples.append([images, *self._prompt_inputs(prompts, 1)])
        # SmoothQuant off: with it, a VPT-deep artifact of the pretrained tiny backbone agreed with fp32
        # on 98.25 % of held-out views, without it on 99.50-99.75 % (bench/encoder_runtimes.py).
        no_smoothing = nncf.AdvancedSmoothQuantParameters(convolution=-1, matmul=-1)
        return nncf.quantize(model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                             subset_size=len(samples),
                             advanced_parameters=nncf.AdvancedQuantizationParameters(smooth_quant_alphas=no_smoothing))

    def _convert(self, ov, kind: str, first_token_only: bool = True):
        clip = self.backbone.clip
        size, width = self.backbone.image.size, self.backbone.vision_width
        images = torch.zeros(2, 3, size, size)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shapes: the graph's inputs are declared dynamic
            if kind == "plain":
                return ov.convert_model(_PlainImageTower(clip, first_token_only).eval(), example_input=(images,),
                                        input=[ov.PartialShape([-1, 3, size, size])])
            prompts = torch.zeros(2, self.layers, 4, width)
            replace = torch.ones(2, self.layers)
            return ov.convert_model(
                _PromptedImageTower(clip, first_token_only).eval(), example_input=(images, prompts, replace),
                input=[ov.PartialShape([-1, 3, size, size]), ov.PartialShape([-1, self.layers, -1, width]),
                       ov.PartialShape([-1, self.layers])])


def _remove_other_releases(folder: Path, prefix: str) -> None:
    """The folders beside `folder` of the same backbone and weights (`prefix`) that another release
    (or graph format) saved: this release never reads them, and each holds the weights several times
    over (over 1 GB for ViT-B-16). During a rolling upgrade two releases sharing the volume each remove
    the other's; the other converts again at its next start, which costs time, not correctness."""
    try:
        siblings = [p for p in folder.parent.iterdir() if p.name.startswith(prefix) and p.name != folder.name]
    except OSError:
        return
    for sibling in siblings:
        shutil.rmtree(sibling, ignore_errors=True)
        log.info("removed %s: compiled graphs of another release, never read by this one", sibling)


def _remove_unkeyed_blobs(blobs: Path) -> None:
    """Blobs that an earlier release kept straight under `blobs`, one folder for every precision: one of
    them could be another precision's (see the module's docstring), and none is read any more."""
    try:
        for blob in blobs.glob("*.blob"):
            blob.unlink(missing_ok=True)
    except OSError:  # a read-only volume: they take room, and are never read
        pass


def _settings_key(config: dict) -> str:
    """The blob folder of one compile setting: its precision, readable, and a digest of all of it."""
    digest = hashlib.sha256(repr(sorted(config.items())).encode()).hexdigest()[:12]
    return f"{config['INFERENCE_PRECISION_HINT']}-{digest}"


def _save(ov, model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.xml")
    try:
        ov.save_model(model, tmp, compress_to_fp16=False)
        tmp.with_suffix(".bin").replace(path.with_suffix(".bin"))
        tmp.replace(path)  # the .xml last: a model on disk is complete
    finally:  # a failed save leaves no half-written files behind
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)


def _reason(error: BaseException, folder: Path) -> str:
    """Why writing under `folder` failed, in words: OpenVINO reports a full disk as an iostream error."""
    if isinstance(error, OSError) and error.errno is not None:
        return os.strerror(error.errno).lower()
    try:
        if shutil.disk_usage(_existing(folder)).free < 1024 * 1024:
            return "no space left on the device"
    except OSError:
        pass
    return f"{type(error).__name__}: {error}"


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _calibration_key(calibration: torch.Tensor) -> str:
    """Which images made an int8 graph (other images give other ranges); reading it back needs no NNCF."""
    digest = hashlib.sha256(calibration.float().contiguous().numpy().tobytes())
    digest.update(f"{tuple(calibration.shape)} prompts {_CALIBRATION_PROMPTS}x{_CALIBRATION_STD} no smoothing".encode())
    return digest.hexdigest()[:16]


def _cache_prefix(backbone: Backbone) -> str:
    """What the cache folders of one backbone's weights start with, whatever the release."""
    return f"{backbone.name}-{backbone.weights_sha256[:16]}-upt"


def _cache_key(backbone: Backbone) -> str:
    from . import __version__

    return f"{_cache_prefix(backbone)}{__version__}-{_GRAPH_FORMAT}"
