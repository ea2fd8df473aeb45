"""The project's own tiny open_clip configuration, for tests and local runs without real weights.

`upt-tiny` is a real open_clip CLIP (ViT image tower, Transformer text tower, OpenAI tokenizer) whose
vision width (96) differs from its text width (64), so every projection the methods use is exercised.
Two sets of weights: random ones (`write_tiny_checkpoint`), for what only needs code to run and
gradients to flow, and `PRETRAINED_TINY`, trained here CLIP's way on Fashion-MNIST's training split
(scripts/pretrain_tiny.py), which knows ten kinds of clothes in 32-pixel greyscale and nothing else.
Neither shows what a real CLIP would reach. It is only used when asked for by name; nothing falls
back to it.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch

TINY_MODEL = "upt-tiny"
_CONFIG_DIR = Path(__file__).parent / "model_configs"
# `upt-tiny` pretrained here, CLIP's way, on Fashion-MNIST's training split (scripts/pretrain_tiny.py).
PRETRAINED_TINY = Path(__file__).parent / "weights" / "upt-tiny-fashion-mnist.safetensors"


def register_model_configs() -> None:
    """Make the project's configurations known to open_clip's factory (idempotent)."""
    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


def write_tiny_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write random weights for `upt-tiny`; `.safetensors` by suffix, else a torch state dict."""
    register_model_configs()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_MODEL, pretrained=None)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path
