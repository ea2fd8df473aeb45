"""Trainable parameter counts of each method for an architecture, without its weights."""

from __future__ import annotations

from .backbone import random_backbone
from .methods import SPECS, PromptConfig, build_prompt_generator
from .methods.lora import adapter_parameters


def trainable_parameters_by_method(model: str, cached_images: int | None = None) -> dict[str, int | None]:
    """Counts only depend on widths and depths, so a randomly initialised architecture is enough.

    Tip-Adapter-F trains one key (the embedding width) per cached training image, so its count needs
    `cached_images` (classes × shots); without it, it is None. Tip-Adapter trains nothing."""
    backbone = random_backbone(model, "cpu")
    counts: dict[str, int | None] = {}
    for spec in SPECS:
        if spec.uses_cache:  # trains its keys (Tip-Adapter-F), or nothing
            per_image = embedding_width(backbone) if spec.trains else 0
            counts[spec.name] = None if cached_images is None and per_image else (cached_images or 0) * per_image
            continue
        if spec.learns_adapters:  # CLIP-LoRA: its adapters at the paper's rank
            counts[spec.name] = adapter_parameters(backbone)
            continue
        config = PromptConfig(spec.name)
        generator = build_prompt_generator(backbone, config, config.n_ctx)
        counts[spec.name] = 0 if generator is None else sum(p.numel() for p in generator.parameters())
    return counts


def embedding_width(backbone) -> int:
    """d, the width of the shared image-text space (a Tip-Adapter key's length)."""
    return int(backbone.clip.visual.output_dim)


def parameters_per_cached_image(model: str) -> int:
    return embedding_width(random_backbone(model, "cpu"))
