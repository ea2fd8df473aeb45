"""The learnable parts of each method. Each generator's forward() returns the prompts of one step.

Shapes: text prompts (depth, m, text width), visual prompts (depth, n, vision width). Generators are
computed once per step and their output is shared by both towers, so UPT's θ(U) runs once per step
with one dropout mask (the released code ran it twice, once per modality).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Prompts:
    text: torch.Tensor | None = None
    visual: torch.Tensor | None = None


def _normal(shape: tuple[int, ...], std: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape) * std)


class TextContext(nn.Module):
    """CoOp: m context vectors shared by all classes, optionally initialised from word embeddings."""

    def __init__(self, n_ctx: int, width: int, depth: int, std: float, init: torch.Tensor | None = None):
        super().__init__()
        self.context = _normal((depth, n_ctx, width), std)
        if init is not None:
            with torch.no_grad():
                self.context[0].copy_(init)

    def forward(self) -> Prompts:
        return Prompts(text=self.context)


class VisualPrompts(nn.Module):
    """VPT: n visual tokens per prompted layer (depth 1 is VPT-shallow)."""

    def __init__(self, n_prompts: int, width: int, depth: int, std: float):
        super().__init__()
        self.prompts = _normal((depth, n_prompts, width), std)

    def forward(self) -> Prompts:
        return Prompts(visual=self.prompts)


class JointPrompts(nn.Module):
    """Ablation: independent text and visual prompts trained together."""

    def __init__(self, text: TextContext, visual: VisualPrompts):
        super().__init__()
        self.text = text
        self.visual = visual

    def forward(self) -> Prompts:
        return Prompts(text=self.text().text, visual=self.visual().visual)


class UnifiedTransformerLayer(nn.Module):
    """UPT's θ, equation 5 of the paper (not the released code's LN(U + SA(U))):

        U' = SA(U) + LN(U)
        Û  = FFN(LN(U')) + LN(U')

    batch_first=True matters: the released code omitted it on a (1, 2m, d) tensor, so each token only
    attended to itself. Here the 2m tokens of one layer's U attend to each other.
    """

    def __init__(self, width: int, dropout: float):
        super().__init__()
        heads = max(1, width // 64)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_in = nn.LayerNorm(width)
        self.norm_mid = nn.LayerNorm(width)
        self.ffn = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(u, u, u, need_weights=False)
        u_mid = attended + self.norm_in(u)
        normed = self.norm_mid(u_mid)
        return self.ffn(normed) + normed


class PromptMLP(nn.Module):
    """Ablation: a 2-layer MLP applied to each token of U on its own (no mixing across tokens)."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, width))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.layers(u)


class UnifiedPrompts(nn.Module):
    """UPT and its ablations: one prompt U of 2m tokens per layer at text width, transformed by a mixer.

    The first m tokens of mixer(U) are the text context; the last m, mapped to the vision width, are
    the visual prompts. With `mixer=None` and `split=False` (the "shared" ablation) the same m tokens
    feed both towers, only linearly mapped for vision.
    """

    def __init__(
        self,
        n_ctx: int,
        text_width: int,
        vision_width: int,
        depth: int,
        std: float,
        mixer: nn.Module | None,
        split: bool = True,
        init: torch.Tensor | None = None,
    ):
        super().__init__()
        self.n_ctx = n_ctx
        self.split = split
        self.unified = _normal((depth, 2 * n_ctx if split else n_ctx, text_width), std)
        if init is not None:
            with torch.no_grad():
                self.unified[0, :n_ctx].copy_(init)
        self.mixer = mixer
        self.to_vision = nn.Linear(text_width, vision_width)

    def forward(self) -> Prompts:
        u = self.unified if self.mixer is None else self.mixer(self.unified)  # depth acts as the batch
        if not self.split:
            return Prompts(text=u, visual=self.to_vision(u))
        return Prompts(text=u[:, : self.n_ctx], visual=self.to_vision(u[:, self.n_ctx:]))
