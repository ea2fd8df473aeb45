"""Backbones for the reference tests: random weights, in float64, loaded through the project's own path.

`upt-asym` (tests/core/model_configs) differs from `upt-tiny` where upt-tiny hides bugs: its text
width (128) gives θ two attention heads of 64; its vision width (160, four heads of 40) is not the
text width; its vision tower (3 layers) is deeper than its text tower (2); it pools the mean of the
patch tokens, not [CLS]. `upt-asym-deeptext` is the same with the depths the other way round.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from torch import nn

from upt.backbone import Backbone, random_backbone

CONFIG_DIR = Path(__file__).parent / "model_configs"
ASYMMETRIC = "upt-asym"
DEEP_TEXT = "upt-asym-deeptext"


def register_test_configs() -> None:
    if ASYMMETRIC not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def float64_backbone(model: str, seed: int = 0) -> Backbone:
    """`model` with random weights (seeded), every CLIP weight in float64 so that 1e-6 is a fair bound."""
    register_test_configs()
    backbone = random_backbone(model, "cpu", seed=seed)
    backbone.clip.double()
    return backbone


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    """`model` in float64 with every learnable tensor moved off its initial value (seeded), so that a
    reference test sees what training would have made of it (a zero B or a zero-initialised head
    would hide the terms they multiply)."""
    model = model.double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


def random_images(backbone: Backbone, n: int = 3, seed: int = 0) -> torch.Tensor:
    """n preprocessed-looking images for `backbone`, float64, seeded."""
    generator = torch.Generator().manual_seed(seed)
    size = backbone.image.size
    return torch.randn(n, 3, size, size, generator=generator, dtype=torch.float64)
