"""CLIP-LoRA (Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models", CVPRW 2024).

Low-rank adapters on the query, key and value projections of every attention block of both towers:
W_p x becomes W_p x + s · B_p A_p x, with A_p (rank × width) drawn as nn.Linear's weights are
(Kaiming-uniform), B_p (width × rank) zero, so the untrained model is zero-shot CLIP exactly; the
base weights stay frozen. Dropout (0.25) drops the adapters' input while training. s = alpha / √rank,
as CLIP-LoRA's released code scales them (its published numbers come from it; the LoRA paper's
alpha / rank, which it left commented out, gives 0.5 instead of 0.71 at its defaults); `lora_scale` is
the one place that says which.

The class prompts are its templates (one, "a photo of a {}.", unless the Python API gives others; an
ensemble is averaged as zero-shot's), encoded through the adapted text tower at every step. At export the text adapters are folded into the classifier W, so serving runs only the
image tower with its adapters.

Its paper's settings are the defaults (upt.methods.registry, upt/lora_training.py): rank 2, alpha 1,
dropout 0.25, AdamW (lr 2e-4, weight decay 0.01, betas 0.9 and 0.999) with a cosine schedule over
500 × K iterations (K shots) at batch 32, down to 1e-6, fp16 autocast on CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, Transformer
from torch import nn

from ..backbone import Backbone
from ..encoders import QkvLora, encode_image, encode_text
from ..errors import ArtifactError, ConfigError

RANK, ALPHA, DROPOUT = 2, 1.0, 0.25
ITERATIONS_PER_SHOT = 500
MAX_EPOCHS = 200  # epochs reported and checkpointed at most (the prompt methods' longest schedule); see EpochPlan
LR, WEIGHT_DECAY, BETAS, MIN_LR = 2e-4, 1e-2, (0.9, 0.999), 1e-6
PROJECTIONS = 3  # query, key, value
SERVING_PREFIX = "lora."
SERVING_TENSORS = tuple(SERVING_PREFIX + name for name in ("visual.down", "visual.up", "scale"))


def lora_scale(rank: int, alpha: float) -> float:
    """s in W x + s · B A x: CLIP-LoRA's released scaling."""
    return alpha / math.sqrt(rank)


@dataclass(frozen=True)
class LoraOptions:
    """The adapters' shape and regularisation: rank, alpha (s = alpha / √rank) and the dropout of their input."""

    rank: int = RANK
    alpha: float = ALPHA
    dropout: float = DROPOUT

    @classmethod
    def of(cls, config: Any) -> "LoraOptions":
        """From a TrainConfig's lora_rank, lora_alpha and lora_dropout (None: the paper's)."""
        return cls(*(default if value is None else value for value, default in
                     ((config.lora_rank, RANK), (config.lora_alpha, ALPHA), (config.lora_dropout, DROPOUT))))

    @property
    def scale(self) -> float:
        return lora_scale(self.rank, self.alpha)


def iterations(config: Any, shots: int | None) -> int | None:
    """A TrainConfig's `iterations`, or the paper's 500 × K for K `shots` (None: not known yet)."""
    if config.iterations is not None:
        return config.iterations
    return None if shots is None else ITERATIONS_PER_SHOT * shots


@dataclass(frozen=True)
class EpochPlan:
    """How a run's iterations group into the epochs that it reports and checkpoints: an epoch is one
    pass over the training images (the last short batch kept, as the paper's code), or several where
    there would be more than MAX_EPOCHS (500 × K iterations over N·K images are 16,000 / N passes at
    batch 32: a checkpoint and a progress event after each of 8,000 one-step passes would cost more
    than the steps). The last epoch ends where the iterations do."""

    iterations: int
    steps_per_pass: int
    passes_per_epoch: int

    @classmethod
    def of(cls, iterations: int, images: int, batch: int) -> "EpochPlan":
        steps_per_pass = math.ceil(images / min(batch, images))
        return cls(iterations, steps_per_pass, max(1, math.ceil(math.ceil(iterations / steps_per_pass) / MAX_EPOCHS)))

    @property
    def steps_per_epoch(self) -> int:
        return self.steps_per_pass * self.passes_per_epoch

    @property
    def epochs(self) -> int:
        return math.ceil(self.iterations / self.steps_per_epoch)


def planned_epochs(config: Any) -> int:
    """The epochs a TrainConfig will report, as far as it tells before the data is read (0: not known
    until the split is drawn): it needs the shots and the class names."""
    total = iterations(config, config.shots)
    if total is None or config.shots is None or not config.class_names:
        return 0
    return EpochPlan.of(total, config.shots * len(config.class_names), config.step_batch_size).epochs


class TowerAdapters(nn.Module):
    """One tower's adapters: down (layers, 3, rank, width) = A, up (layers, 3, width, rank) = B."""

    def __init__(self, layers: int, width: int, options: LoraOptions):
        super().__init__()
        self.options = options
        self.down = nn.Parameter(torch.empty(layers, PROJECTIONS, options.rank, width))
        self.up = nn.Parameter(torch.zeros(layers, PROJECTIONS, width, options.rank))
        with torch.no_grad():
            for layer in range(layers):
                for projection in range(PROJECTIONS):  # each A as an nn.Linear(width, rank) weight
                    nn.init.kaiming_uniform_(self.down[layer, projection], a=math.sqrt(5))

    def forward(self) -> QkvLora:
        return QkvLora(self.down, self.up, self.options.scale, self.options.dropout if self.training else 0.0)


def check_lora_supported(backbone: Backbone) -> None:
    """The adapters go on open_clip's plain blocks with one packed nn.MultiheadAttention in-projection
    (every CLIP ViT); another tower (a Hugging Face text model, a timm image model) is refused."""
    clip = backbone.clip
    towers = {"text": getattr(clip, "transformer", None), "image": getattr(clip.visual, "transformer", None)}
    for tower, transformer in towers.items():
        if not isinstance(transformer, Transformer) or not all(_plain(block) for block in transformer.resblocks):
            raise ConfigError(f"{backbone.name}'s {tower} tower is not made of open_clip's plain attention blocks, "
                              f"which clip-lora adapts; choose another method or a CLIP ViT backbone.", field="method")


def _plain(block: nn.Module) -> bool:
    attn = getattr(block, "attn", None)
    return (type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv")
            and isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim and attn.dropout == 0)


class LoraCLIP(nn.Module):
    """Logits of `class_names` for a batch of images through the adapted towers.

    Only the adapters are parameters (`text`, `visual`); the backbone is kept outside the module tree,
    as in PromptedCLIP, so `state_dict()` is the adapters alone."""

    def __init__(self, backbone: Backbone, class_names: list[str], options: LoraOptions,
                 templates: tuple[str, ...]):
        from .model import clean_class_name  # here: the registry imports this module, and .model the registry

        super().__init__()
        if len(class_names) < 2:
            raise ConfigError("At least two classes are needed.", field="class_names")
        check_lora_supported(backbone)
        self.backbone = backbone
        self.class_names = list(class_names)
        self.options = options
        self.templates = tuple(templates)
        clip = backbone.clip
        self.text = TowerAdapters(len(clip.transformer.resblocks), clip.transformer.width, options)
        self.visual = TowerAdapters(len(clip.visual.transformer.resblocks), clip.visual.transformer.width, options)
        texts = [template.format(clean_class_name(name)) for name in class_names for template in self.templates]
        self.register_buffer("class_tokens", backbone.tokenizer(texts), persistent=False)
        self.to(backbone.device)

    def classifier(self) -> torch.Tensor:
        """Normalised W (k, d) through the adapted text tower: each class's templates averaged, normalised."""
        features = encode_text(self.backbone.clip, self.class_tokens, normalize=True, lora=self.text())
        features = features.view(len(self.class_names), len(self.templates), -1)
        return F.normalize(features.mean(dim=1), dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return encode_image(self.backbone.clip, images, normalize=True, lora=self.visual())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.logit_scale * self.image_features(images) @ self.classifier().T

    @torch.no_grad()
    def export(self) -> dict[str, torch.Tensor]:
        """What serving needs, in eval mode and the adapters' dtype: W with the text adapters folded in,
        and the image adapters."""
        was_training = self.training
        self.eval()
        exported = {"classifier": self.classifier().to(self.visual.down.dtype).clone(),
                    SERVING_PREFIX + "visual.down": self.visual.down.detach().clone(),
                    SERVING_PREFIX + "visual.up": self.visual.up.detach().clone(),
                    SERVING_PREFIX + "scale": torch.tensor(self.options.scale, dtype=torch.float64)}
        self.train(was_training)
        return exported

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def adapter_parameters(backbone: Backbone, options: LoraOptions = LoraOptions()) -> int:
    """How many numbers the adapters of both towers hold: 3 projections × (A + B) per block."""
    clip = backbone.clip
    towers = ((clip.transformer.width, len(clip.transformer.resblocks)),
              (clip.visual.transformer.width, len(clip.visual.transformer.resblocks)))
    return sum(layers * PROJECTIONS * 2 * options.rank * width for width, layers in towers)


def serving_lora(tensors: dict[str, torch.Tensor]) -> QkvLora | None:
    """The image adapters an artifact serves with (none: not a clip-lora artifact); ArtifactError if
    they are incomplete or inconsistent."""
    present = [name for name in SERVING_TENSORS if name in tensors]
    if not present:
        return None
    down, up, scale = (tensors.get(name) for name in SERVING_TENSORS)
    if (len(present) != len(SERVING_TENSORS) or down.dim() != 4 or down.shape[1] != PROJECTIONS
            or up.shape != (down.shape[0], PROJECTIONS, down.shape[3], down.shape[2]) or scale.numel() != 1):
        raise ArtifactError("The artifact's image adapters (lora.visual.down, lora.visual.up, lora.scale) are "
                            "incomplete or inconsistent.")
    return QkvLora(down, up, float(scale))
