"""A backbone's architecture from its open_clip model config, without its weights: what option checks
need (layer counts, widths, the text context and the tokenizer) before any weights are loaded.

`upt-tiny` and the project's other configs live in upt/model_configs and are registered with
open_clip first, so the same names work here as in `load_backbone`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from .errors import UnsupportedBackboneError, WeightsUnavailableError
from .tiny import register_model_configs


@dataclass(frozen=True)
class Architecture:
    """The towers of an open_clip CLIP as its config states them (the same attributes as a Backbone's)."""

    name: str
    text_layers: int
    vision_layers: int
    text_width: int
    vision_width: int
    context_length: int
    tokenizer: Callable[..., torch.Tensor]


@functools.lru_cache(maxsize=8)
def architecture(model: str) -> Architecture:
    """`model`'s architecture from open_clip's config (no weights read); the tokenizer is open_clip's."""
    register_model_configs()
    config = open_clip.get_model_config(model)
    if config is None:
        raise WeightsUnavailableError(f"Unknown open_clip model {model!r}.")
    text, vision = CLIPTextCfg(**config.get("text_cfg", {})), CLIPVisionCfg(**config.get("vision_cfg", {}))
    if not isinstance(vision.layers, int) or text.hf_model_name:  # a ResNet image tower, a Hugging Face text one
        raise UnsupportedBackboneError(f"{model} is not a ViT CLIP with CLIP's text Transformer; prompts cannot be "
                                       f"inserted into it.")
    return Architecture(name=model, text_layers=int(text.layers), vision_layers=int(vision.layers),
                        text_width=int(text.width), vision_width=int(vision.width),
                        context_length=int(text.context_length), tokenizer=open_clip.get_tokenizer(model))
