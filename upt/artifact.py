"""The learned-prompt artifact: one folder, like a peft adapter.

- `adapter_config.json`: method, prompt and training options, backbone name and weights sha256,
  class names, library version, metrics, and the sha256 of the tensors file.
- `prompts.safetensors`: the learned parameters (`prompt.*`, to resume or inspect them) and what
  serving needs resolved once at the end of training: the text `classifier` W and `visual_prompts`.
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .backbone import Backbone
from .errors import ArtifactError, BackboneMismatchError

CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "prompts.safetensors"
FORMAT = "upt-prompts"
FORMAT_VERSION = 1


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
    _atomic(tensors_path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                                str(tmp), metadata={"format": FORMAT}))
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": library_version(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": method,
        "class_names": list(class_names),
        "backbone": backbone.describe(),
        "tensors_sha256": _sha256(tensors_path),
        **options,
    }
    _atomic(out_dir / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return out_dir


def load_artifact(path: str | Path) -> Artifact:
    path = Path(path)
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
    if _sha256(tensors_path) != config.get("tensors_sha256"):
        raise ArtifactError(f"{tensors_path} is corrupted: its sha256 does not match {CONFIG_FILE}.")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError) as error:
        raise ArtifactError(f"{tensors_path} is corrupted: {error}") from error
    if "classifier" not in tensors or tensors["classifier"].shape[0] != len(config.get("class_names", [])):
        raise ArtifactError(f"{tensors_path} has no classifier matching the {CONFIG_FILE} class names.")
    return Artifact(config, tensors)


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
