"""Trainable parameter counts of each method for an architecture, without its weights."""

from __future__ import annotations

import open_clip
import torch

from .backbone import Backbone, _image_spec
from .methods import METHODS, PromptConfig, build_prompt_generator
from .tiny import register_model_configs


def trainable_parameters_by_method(model: str) -> dict[str, int]:
    """Counts only depend on widths and depths, so a randomly initialised architecture is enough.

    The randomly initialised model built here is used for counting and nothing else.
    """
    register_model_configs()
    clip = open_clip.create_model(model, pretrained=None)
    backbone = Backbone(model, "none (architecture only)", clip, open_clip.get_tokenizer(model),
                        _image_spec(clip), weights_sha256="", device=torch.device("cpu"))
    counts = {}
    for method in METHODS:
        config = PromptConfig(method)
        generator = build_prompt_generator(backbone, config, config.n_ctx)
        counts[method] = 0 if generator is None else sum(p.numel() for p in generator.parameters())
    return counts
