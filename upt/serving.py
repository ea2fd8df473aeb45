"""Serving many tasks through one image-encoder pass.

A predictor needs from the image encoder either the raw image features (zero-shot, CoOp: tasks that
learn nothing visual) or the features under its own visual prompts (VPT, UPT). Requests are grouped by
what the encoder needs, not by task: every raw-feature request of one backbone shares one pass, and
visual-prompt requests whose prompts have one shape (depth, n, width) share one pass with the prompts
given per sample. Each request's logits are then its own classifier applied to its rows, the same
arithmetic as `Predictor.logits` (tests check the results are equal).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol

import torch

from .backbone import Backbone
from .encoders import encode_image
from .predict import Predictor


class ImageEncoder(Protocol):
    """Normalised image features (batch, d) in float32, with visual prompts shared (depth, n, width)
    or per sample (batch, depth, n, width), or none."""

    runtime: str

    def __call__(self, images: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor: ...


class TorchImageEncoder:
    """The backbone's own PyTorch image tower (the reference every other runtime is compared to)."""

    runtime = "pytorch"

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone

    def describe(self) -> str:
        return f"pytorch {next(self.backbone.clip.parameters()).dtype} on {self.backbone.device}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        return encode_image(self.backbone.clip, images, prompts, normalize=True).float()


def encoder_need(predictor: Predictor) -> Hashable:
    """Requests with equal needs can share one encoder pass: the backbone and the prompts' shape."""
    prompts = predictor.visual_prompts
    shape = None if prompts is None else (tuple(prompts.shape), prompts.dtype)
    return id(predictor.backbone), shape


def logits_together(encoder: ImageEncoder, requests: Sequence[tuple[Predictor, torch.Tensor]]) -> list[torch.Tensor]:
    """Each request's logits, from one encoder pass over all their images (all must share one need)."""
    images = torch.cat([batch for _, batch in requests]) if len(requests) > 1 else requests[0][1]
    features = encoder(images, _prompts(requests))
    out, start = [], 0
    for predictor, batch in requests:
        out.append(predictor.head(features[start:start + len(batch)]))
        start += len(batch)
    return out


def _prompts(requests: Sequence[tuple[Predictor, torch.Tensor]]) -> torch.Tensor | None:
    first = requests[0][0].visual_prompts
    if first is None:
        return None
    if all(predictor is requests[0][0] for predictor, _ in requests):
        return first  # one task: its prompts are shared by the batch, nothing to copy
    return torch.cat([predictor.visual_prompts.unsqueeze(0).expand(len(batch), *first.shape)
                      for predictor, batch in requests])
