"""Export a task's classifier as one self-contained model that ONNX Runtime or OpenVINO runs without upt.

The graph is `Predictor.logits` traced with the task's tensors baked in as constants: the image
tower with its visual prompts, the L2 normalisation, the classifier W (and a Tip-Adapter cache's
votes, a few matrix products), then a softmax. Tracing the predictor itself, not a copy of its
arithmetic, is what makes every method exportable without a branch here (a new one too, whatever its
`Predictor` holds: prompts, image adapters, a cache, a head), and its outputs equal to what
`upt predict` and `/classify` answer. What the trace needs of that code: no Python loop or branch on
the batch's size or values (CoCoOp's chunking loop runs as one pass under `torch.jit.is_tracing()`).

Input `pixels`: (batch, 3, size, size) float32 RGB in [0, 1], the image's shorter side resized to
`size` (bicubic) and centre-cropped; the CLIP mean/std normalisation runs inside the graph. Outputs
`logits` and `probabilities` (batch, classes). The class names and the preprocessing are in the
model's metadata (ONNX `metadata_props`; OpenVINO `rt_info` under "upt"): text as is, lists and
numbers as JSON (`class_names` is a JSON list, in the order of the outputs' columns).

CoCoOp has no fixed classifier (its context is shifted by each image's features): its graph holds the
text encoder too, run over every class's prompt for each image, as `Predictor.head` does, so it is
slower than the others by about a text-encoder pass per class.
"""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifact import Artifact, load_serving_artifact, library_version
from .backbone import Backbone, load_backbone
from .errors import ConfigError, UptError
from .predict import Predictor

FORMATS = ("onnx", "openvino")
INPUT = "pixels"
OUTPUTS = ("logits", "probabilities")
ONNX_OPSET = 17  # scaled dot-product attention and layer norm as single operators; ONNX Runtime ≥ 1.12
METADATA_KEY = "upt"  # OpenVINO rt_info section holding the metadata
PREPROCESSING = ("RGB; shorter side resized to {size} px (bicubic), centre crop {size}x{size}; "
                 "float32 in [0, 1], layout NCHW (batch, 3, {size}, {size}); the mean/std normalisation "
                 "runs inside the model")


class ExportUnavailableError(UptError):
    """The library that writes the format is not installed."""


class _ExportedClassifier(nn.Module):
    """pixels in [0, 1] -> (logits, probabilities): the image normalisation, then `Predictor.logits`."""

    def __init__(self, predictor: Predictor) -> None:
        super().__init__()
        self.predictor = predictor
        spec, device = predictor.backbone.image, predictor.backbone.device
        self.register_buffer("mean", torch.tensor(spec.mean, device=device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, device=device).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.predictor.logits((pixels - self.mean) / self.std).float()
        return logits, logits.softmax(dim=-1)


def check_format(format: str) -> None:
    if format not in FORMATS:
        raise ConfigError(f"Unknown export format {format!r}; choose one of: {', '.join(FORMATS)}.", field="format")


def export_key(artifact: Artifact) -> str:
    """Names the exports of one artifact: its tensors' sha256 (what the graphs bake in) and the
    library version (which wrote them)."""
    return f"{artifact.config['tensors_sha256'][:16]}-upt{library_version()}"


def model_metadata(predictor: Predictor, artifact: Artifact | None = None) -> dict[str, str]:
    """What a user of the exported model needs, as text: the class names (JSON list, in the order of
    the outputs' columns), the preprocessing, and where the model came from."""
    backbone = predictor.backbone
    spec = backbone.image
    metadata: dict[str, Any] = {
        "class_names": predictor.class_names,
        "input": INPUT,
        "outputs": list(OUTPUTS),
        "image_size": spec.size,
        "preprocessing": PREPROCESSING.format(size=spec.size),
        "mean": list(spec.mean),
        "std": list(spec.std),
        "backbone": backbone.name,
        "backbone_weights_sha256": backbone.weights_sha256,
        "upt_version": library_version(),
    }
    if artifact is not None:
        metadata["method"] = artifact.config.get("method")
        metadata["artifact_tensors_sha256"] = artifact.config.get("tensors_sha256")
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}


def export_predictor(predictor: Predictor, format: str, out: str | Path,
                     metadata: dict[str, str] | None = None) -> list[Path]:
    """Write the predictor as an ONNX file `out`, or as OpenVINO IR `out` (.xml) with its .bin beside
    it; returns the files written. `metadata`: `model_metadata(predictor)` where not given."""
    check_format(format)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = metadata if metadata is not None else model_metadata(predictor)
    module = _ExportedClassifier(predictor).eval()
    size = predictor.backbone.image.size
    example = torch.rand(2, 3, size, size, device=predictor.backbone.device)
    with torch.no_grad(), warnings.catch_warnings(), _without_attention_fast_path():
        # The tracer's notes on Python values taken from shapes (prompt depth and count): they are the
        # task's, fixed in the graph; the batch stays dynamic.
        warnings.simplefilter("ignore")
        if format == "onnx":
            return [_write_onnx(module, example, out, metadata)]
        return _write_openvino(module, example, out, metadata)


@contextmanager
def _without_attention_fast_path() -> Iterator[None]:
    """nn.MultiheadAttention's fused inference kernel (taken without gradients when the head count is
    even, as ViT-B-16's 12) has no ONNX form: traced through the plain products instead, the same
    arithmetic. Process-wide while it lasts, so restored at once."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def export_artifact(artifact: Artifact | str | Path, format: str, out: str | Path, backbone: Backbone | None = None,
                    pretrained: str | None = None, device: str | None = None) -> list[Path]:
    """Export an artifact (or the one in that folder; see `export_predictor`) on `backbone`, or on the
    one it records (`pretrained` overriding its weights' tag or path)."""
    check_format(format)  # before the backbone loads: fail fast
    if not isinstance(artifact, Artifact):
        artifact = load_serving_artifact(artifact)
    if backbone is None:
        recorded = artifact.config["backbone"]
        backbone = load_backbone(recorded["model"], pretrained or recorded["pretrained"], device)
    predictor = Predictor.from_artifact(backbone, artifact)
    return export_predictor(predictor, format, out, model_metadata(predictor, artifact))


def _require(module: str, install: str):
    """The runtime module the format is written with, or a UptError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ExportUnavailableError(f"Exporting to this format needs {module}, which is not installed: "
                                     f"{install}") from error


def _write_onnx(module: nn.Module, example: torch.Tensor, out: Path, metadata: dict[str, str]) -> Path:
    onnx = _require("onnx", "pip install 'upt[export]'")

    batch = {0: "batch"}
    # The TorchScript exporter (dynamo=False): it traces the fixed-shape graph as is and needs no
    # onnxscript; the dynamo exporter gives the same graph here with more dependencies.
    torch.onnx.export(module, (example,), str(out), input_names=[INPUT], output_names=list(OUTPUTS),
                      dynamic_axes={name: batch for name in (INPUT, *OUTPUTS)}, opset_version=ONNX_OPSET,
                      dynamo=False)
    model = onnx.load(str(out))
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(out))
    return out


def _write_openvino(module: nn.Module, example: torch.Tensor, out: Path, metadata: dict[str, str]) -> list[Path]:
    ov = _require("openvino", "pip install openvino (it comes with 'upt[service]')")

    from .compiled import _save  # the atomic IR writer the compiled encoder's cache uses, weights in fp32

    size = example.shape[-1]
    model = ov.convert_model(module, example_input=(example,), input=[ov.PartialShape([-1, 3, size, size])])
    model.inputs[0].get_tensor().set_names({INPUT})
    for output, name in zip(model.outputs, OUTPUTS):
        output.get_tensor().set_names({name})
    for key, value in metadata.items():
        model.set_rt_info(value, [METADATA_KEY, key])
    xml = out if out.suffix == ".xml" else out.with_name(out.name + ".xml")
    _save(ov, model, xml)
    return [xml, xml.with_suffix(".bin")]
