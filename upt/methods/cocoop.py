"""CoCoOp (Zhou et al., "Conditional Prompt Learning for Vision-Language Models", CVPR 2022).

CoOp's m context vectors v_1..v_m plus a meta-net h (Linear(d → d/16), ReLU, Linear(d/16 → text
width)) applied to the image's normalised feature x: that image's context is v_i + h(x) for every i,
so the text encoder runs once per image over all classes. With h's output zero it is CoOp exactly.

Its paper's settings are the method's defaults: m = 4 initialised from "a photo of a", batch size 1,
SGD lr 0.002 with one warm-up epoch at 1e-5 and cosine decay, 10 epochs (its 16-shot schedule).
"""

from __future__ import annotations

import torch
from torch import nn

from ..encoders import encode_text
from .prompts import Prompts

BATCH_SIZE = 1
EPOCHS = 10
META_NET_REDUCTION = 16  # the meta-net's hidden width is d/16
SERVING_PREFIX = "cocoop."  # artifact tensors serving needs: the context and the meta-net
SERVING_TENSORS = tuple(SERVING_PREFIX + name for name in
                        ("context", "meta_net.0.weight", "meta_net.0.bias", "meta_net.2.weight", "meta_net.2.bias"))
SEQUENCES_PER_PASS = 1024  # image x class prompts per text-encoder pass when scoring many images


class ConditionalContext(nn.Module):
    """The context v (1, m, text width) and the meta-net h; `forward()` gives CoOp's unshifted context."""

    def __init__(self, n_ctx: int, text_width: int, feature_width: int, std: float, init: torch.Tensor | None = None):
        super().__init__()
        self.context = nn.Parameter(torch.randn(1, n_ctx, text_width) * std)
        if init is not None:
            with torch.no_grad():
                self.context[0].copy_(init)
        hidden = max(1, feature_width // META_NET_REDUCTION)
        self.meta_net = nn.Sequential(nn.Linear(feature_width, hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, text_width))

    def forward(self) -> Prompts:
        return Prompts(text=self.context)

    def contexts(self, image_features: torch.Tensor) -> torch.Tensor:
        """(batch, m, text width): every context token shifted by h(x) of its image."""
        shift = self.meta_net(image_features.to(self.context.dtype))
        return self.context[0].unsqueeze(0) + shift.unsqueeze(1)

    def serving_tensors(self) -> dict[str, torch.Tensor]:
        return {SERVING_PREFIX + name: value.detach().float().clone() for name, value in self.state_dict().items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "ConditionalContext | None":
        state = {name.removeprefix(SERVING_PREFIX): value for name, value in tensors.items()
                 if name.startswith(SERVING_PREFIX)}
        if not state:
            return None
        _, n_ctx, text_width = state["context"].shape
        module = cls(n_ctx, text_width, state["meta_net.0.weight"].shape[1], 0.0)
        module.load_state_dict(state)
        return module.eval().requires_grad_(False)


def conditional_logits(clip, class_tokens: torch.Tensor, module: ConditionalContext, image_features: torch.Tensor,
                       logit_scale: float) -> torch.Tensor:
    """(batch, classes) logits: each image against the class prompts built with its own context.

    All images' class prompts go through the text encoder together (per-sample context), a few images
    at a time so that one pass holds about SEQUENCES_PER_PASS prompts; traced for export (upt.export),
    the whole batch in one pass, since a traced loop would keep the example batch's count of chunks."""
    if torch.jit.is_tracing():
        return _conditional_pass(clip, class_tokens, module, image_features, logit_scale)
    per_pass = max(1, SEQUENCES_PER_PASS // class_tokens.shape[0])
    return torch.cat([_conditional_pass(clip, class_tokens, module, image_features[start:start + per_pass],
                                        logit_scale) for start in range(0, image_features.shape[0], per_pass)])


def _conditional_pass(clip, class_tokens: torch.Tensor, module: ConditionalContext, features: torch.Tensor,
                      logit_scale: float) -> torch.Tensor:
    """(b, classes) logits of b images in one text-encoder pass over their b·classes prompts."""
    classes, b = class_tokens.shape[0], features.shape[0]
    contexts = module.contexts(features)  # (b, m, width)
    per_sample = contexts.repeat_interleave(classes, dim=0).unsqueeze(0)  # depth 1, (b·k, m, width)
    text = encode_text(clip, class_tokens.repeat(b, 1), per_sample, normalize=True).view(b, classes, -1)
    return logit_scale * torch.einsum("bd,bkd->bk", features.to(text.dtype), text)
