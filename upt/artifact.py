"""The learned-prompt artifact: one folder, like a peft adapter.

- `adapter_config.json`: method, prompt and training options, backbone name and weights sha256,
  class names, library version, metrics, the sha256 of the tensors file and of each tensor in it.
- `prompts.safetensors`: the learned parameters (`prompt.*`, to resume or inspect them) and what
  serving needs resolved once at the end of training: the text `classifier` W and `visual_prompts`.

Serving reads only W and the visual prompts (`load_serving_artifact`): a UPT artifact is megabytes
because of θ, while serving needs kilobytes. Each of the two is checked against its own sha256, so a
cache miss neither reads nor hashes the rest. Artifacts written before per-tensor hashes existed are
checked whole, as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .backbone import Backbone
from .errors import ArtifactError, BackboneMismatchError
from .methods.cocoop import SERVING_TENSORS as COCOOP_TENSORS
from .methods.lora import SERVING_TENSORS as LORA_TENSORS

CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "prompts.safetensors"
FORMAT = "upt-prompts"
FORMAT_VERSION = 1  # `tensor_sha256` was added without a new version: older readers ignore it
# What /classify reads: W, the visual prompts, and a Tip-Adapter cache (keys, values, α, β).
SERVING_TENSORS = ("classifier", "visual_prompts", "cache_keys", "cache_values", "cache_alpha", "cache_beta",
                   "gda_weights", "gda_bias", "gda_alpha", *COCOOP_TENSORS)  # CoCoOp's context and meta-net: serving shifts the context per image
SERVING_TENSORS += LORA_TENSORS  # CLIP-LoRA's image adapters (its text adapters are folded into W)


def library_version() -> str:
    from . import __version__

    return __version__


@dataclass
class Artifact:
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def class_names(self) -> list[str]:
        return list(self.config["class_names"])

    @property
    def classifier(self) -> torch.Tensor:
        return self.tensors["classifier"]

    @property
    def visual_prompts(self) -> torch.Tensor | None:
        return self.tensors.get("visual_prompts")

    def prompt_state(self) -> dict[str, torch.Tensor]:
        return {k.removeprefix("prompt."): v for k, v in self.tensors.items() if k.startswith("prompt.")}

    def check_backbone(self, backbone: Backbone) -> None:
        expected = self.config["backbone"]
        if expected["weights_sha256"] != backbone.weights_sha256:
            raise BackboneMismatchError(
                f"This artifact was trained on {expected['model']} with weights {expected['pretrained']!r} "
                f"(sha256 {expected['weights_sha256'][:12]}…), not on {backbone.name} with {backbone.pretrained!r} "
                f"(sha256 {backbone.weights_sha256[:12]}…). Load it with the backbone it was trained on."
            )


def save_artifact(
    out_dir: str | Path,
    *,
    backbone: Backbone,
    method: str,
    class_names: list[str],
    tensors: dict[str, torch.Tensor],
    options: dict[str, Any],
) -> Path:
    """Write the two files (each atomically: a crash leaves the old file or the new one, not half)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors_path = out_dir / TENSORS_FILE
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic(tensors_path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": library_version(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": method,
        "class_names": list(class_names),
        "backbone": backbone.describe(),
        "tensors_sha256": _sha256(tensors_path),
        "tensor_sha256": {name: tensor_sha256(tensor) for name, tensor in sorted(tensors.items())},
        **options,
    }
    _atomic(out_dir / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return out_dir


def annotate_artifact(out_dir: str | Path, extra: dict[str, Any]) -> None:
    """Add top-level keys to an artifact's config (e.g. how `auto` chose it); the tensors are untouched."""
    config_path = Path(out_dir) / CONFIG_FILE
    config = json.loads(config_path.read_text()) | extra
    _atomic(config_path, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))


def load_artifact(path: str | Path) -> Artifact:
    """The whole artifact (learned parameters included), checked against the file's sha256."""
    config, tensors_path = _read_config(Path(path))
    if _sha256(tensors_path) != config.get("tensors_sha256"):
        raise ArtifactError(f"{tensors_path} is corrupted: its sha256 does not match {CONFIG_FILE}.")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError) as error:
        raise ArtifactError(f"{tensors_path} is corrupted: {error}") from error
    return _checked(Artifact(config, tensors), tensors_path)


def load_serving_artifact(path: str | Path) -> Artifact:
    """Only what serving needs (classifier W, visual prompts), each checked against its own sha256."""
    config, tensors_path = _read_config(Path(path))
    recorded = config.get("tensor_sha256")
    if not isinstance(recorded, dict):  # written before per-tensor hashes: check the whole file
        full = load_artifact(path)
        return Artifact(full.config, {k: v for k, v in full.tensors.items() if k in SERVING_TENSORS})
    tensors = {}
    try:
        with safe_open(str(tensors_path), framework="pt") as file:
            for name in SERVING_TENSORS:
                if name in file.keys():
                    tensors[name] = file.get_tensor(name)
    except (SafetensorError, OSError) as error:
        raise ArtifactError(f"{tensors_path} is corrupted: {error}") from error
    for name in SERVING_TENSORS:
        actual = tensor_sha256(tensors[name]) if name in tensors else None
        if actual != recorded.get(name):
            raise ArtifactError(f"{tensors_path} is corrupted: tensor {name!r} does not match its sha256 "
                                f"in {CONFIG_FILE}.")
    return _checked(Artifact(config, tensors), tensors_path)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (what safetensors stores for it)."""
    tensor = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read_config(path: Path) -> tuple[dict[str, Any], Path]:
    config_path, tensors_path = path / CONFIG_FILE, path / TENSORS_FILE
    for required in (config_path, tensors_path):
        if not required.is_file():
            raise ArtifactError(f"{path} is not a upt artifact: {required.name} is missing.")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{config_path} is corrupted: {error}") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ArtifactError(f"{config_path} is not a upt artifact config (format {FORMAT!r} expected).")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{path} was written by a newer upt ({config.get('library_version')}); upgrade to load it.")
    return config, tensors_path


def _checked(artifact: Artifact, tensors_path: Path) -> Artifact:
    classifier = artifact.tensors.get("classifier")
    if classifier is None or classifier.shape[0] != len(artifact.config.get("class_names", [])):
        raise ArtifactError(f"{tensors_path} has no classifier matching the {CONFIG_FILE} class names.")
    _check_cache(artifact.tensors, tensors_path)
    _check_gda(artifact.tensors, tensors_path)
    return artifact


def _check_cache(tensors: dict[str, torch.Tensor], tensors_path: Path) -> None:
    """A Tip-Adapter cache: keys (n, d) as wide as the classifier, values (n, classes), α and β."""
    names = ("cache_keys", "cache_values", "cache_alpha", "cache_beta")
    present = [name for name in names if name in tensors]
    if not present:
        return
    keys, values, classifier = tensors.get("cache_keys"), tensors.get("cache_values"), tensors["classifier"]
    if (len(present) != len(names) or keys.dim() != 2 or keys.shape[1] != classifier.shape[1]
            or values.shape != (keys.shape[0], classifier.shape[0])):
        raise ArtifactError(f"{tensors_path} has an incomplete or inconsistent Tip-Adapter cache.")


def _check_gda(tensors: dict[str, torch.Tensor], tensors_path: Path) -> None:
    """GDA's head: weights as the classifier (classes, d), a bias per class, α."""
    names = ("gda_weights", "gda_bias", "gda_alpha")
    present = [name for name in names if name in tensors]
    if not present:
        return
    weights, bias, classifier = tensors.get("gda_weights"), tensors.get("gda_bias"), tensors["classifier"]
    if len(present) != len(names) or weights.shape != classifier.shape or bias.shape != classifier.shape[:1]:
        raise ArtifactError(f"{tensors_path} has an incomplete or inconsistent GDA head.")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
