"""Trainable parameter counts of each method for an architecture, without its weights."""

from __future__ import annotations

from .backbone import random_backbone
from .methods import METHODS, PromptConfig, build_prompt_generator


def trainable_parameters_by_method(model: str) -> dict[str, int]:
    """Counts only depend on widths and depths, so a randomly initialised architecture is enough."""
    backbone = random_backbone(model, "cpu")
    counts = {}
    for method in METHODS:
        config = PromptConfig(method)
        generator = build_prompt_generator(backbone, config, config.n_ctx)
        counts[method] = 0 if generator is None else sum(p.numel() for p in generator.parameters())
    return counts
