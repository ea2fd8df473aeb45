"""Loading a frozen open_clip backbone the real way: a pretrained tag or a local checkpoint file."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from open_clip.model import CLIP
from open_clip.transformer import VisionTransformer

from .errors import UnsupportedBackboneError, WeightsUnavailableError
from .tiny import register_model_configs

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass(frozen=True)
class ImageSpec:
    """What the image tower expects: its input size and normalisation."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"


@dataclass
class Backbone:
    """A frozen open_clip CLIP with everything the prompt methods need to know about it."""

    name: str
    pretrained: str
    clip: CLIP
    tokenizer: Callable[..., torch.Tensor]
    image: ImageSpec
    weights_sha256: str
    device: torch.device
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def text_width(self) -> int:
        return self.clip.token_embedding.embedding_dim

    @property
    def vision_width(self) -> int:
        return self.clip.visual.conv1.out_channels

    @property
    def text_layers(self) -> int:
        return len(self.clip.transformer.resblocks)

    @property
    def vision_layers(self) -> int:
        return len(self.clip.visual.transformer.resblocks)

    @property
    def context_length(self) -> int:
        """Tokens the text encoder reads (77 for CLIP's)."""
        return int(getattr(self.clip, "context_length", 77))

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.exp())

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "pretrained": self.pretrained, "weights_sha256": self.weights_sha256}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_backbone(model: str, pretrained: str, device: str | torch.device | None = None) -> Backbone:
    """Load `model` with `pretrained` (an open_clip tag such as `openai`, or a checkpoint file path).

    OpenAI weights were trained with QuickGELU; open_clip's plain `ViT-B-16` config uses GELU, which
    gives wrong features silently, so the activation follows the tag's own record of it.
    """
    register_model_configs()
    if model not in open_clip.list_models():
        raise WeightsUnavailableError(
            f"Unknown open_clip model {model!r}. Known ViT CLIP models include ViT-B-16, ViT-B-32, ViT-L-14 "
            f"and the project's tiny test model 'upt-tiny'."
        )
    return _frozen(model, pretrained, _create_clip(model, pretrained), device)


def random_backbone(model: str, device: str | torch.device | None = None, seed: int = 0) -> Backbone:
    """`model` with random weights, for what depends only on the architecture: parameter counts and
    timings. Its `pretrained` says so; it is never loaded in place of real weights."""
    register_model_configs()
    torch.manual_seed(seed)
    return _frozen(model, "random (architecture only)", open_clip.create_model(model, pretrained=None), device)


def _frozen(model: str, pretrained: str, clip: torch.nn.Module, device: str | torch.device | None) -> Backbone:
    _check_supported(model, clip)
    torch_device = resolve_device(device)
    clip.requires_grad_(False).eval().to(torch_device)
    return Backbone(
        name=model,
        pretrained=pretrained,
        clip=clip,
        tokenizer=open_clip.get_tokenizer(model),
        image=_image_spec(clip),
        weights_sha256=fingerprint(clip),
        device=torch_device,
    )


def _create_clip(model: str, pretrained: str) -> CLIP:
    is_file = Path(pretrained).suffix in CHECKPOINT_SUFFIXES or os.sep in pretrained
    if is_file and not Path(pretrained).is_file():
        raise WeightsUnavailableError(
            f"Checkpoint file {pretrained!r} does not exist. Point UPT_PRETRAINED (or --pretrained) at an "
            f"open_clip checkpoint (.pt, .pth, .bin or .safetensors) for {model}."
        )
    tag_cfg = {} if is_file else open_clip.get_pretrained_cfg(model, pretrained)
    if not is_file and not tag_cfg:
        tags = [t for m, t in open_clip.list_pretrained() if m == model]
        raise WeightsUnavailableError(
            f"{pretrained!r} is neither a checkpoint file nor a pretrained tag of {model}. Tags: {tags or 'none'}."
        )
    if is_file:
        _warn_if_quick_gelu_variant_exists(model)
    try:
        return open_clip.create_model(
            model,
            pretrained=pretrained,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            require_pretrained=True,
        )
    except Exception as error:  # open_clip raises RuntimeError, OSError, hub errors alike
        raise WeightsUnavailableError(_missing_weights_advice(model, pretrained, is_file, error)) from error


def _warn_if_quick_gelu_variant_exists(model: str) -> None:
    """A file does not say which activation its weights were trained with; OpenAI's used QuickGELU."""
    if not model.endswith("-quickgelu") and f"{model}-quickgelu" in open_clip.list_models():
        log.warning("Loading %s from a file with GELU. If these are OpenAI's weights, use --model %s-quickgelu: "
                    "with the wrong activation the features are wrong without any error.", model, model)


def _missing_weights_advice(model: str, pretrained: str, is_file: bool, error: Exception) -> str:
    if is_file:
        return f"Could not load checkpoint {pretrained!r} into {model}: {error}"
    return (
        f"Could not get the {pretrained!r} weights of {model} ({error}). They are downloaded on first use "
        f"and cached (HF_HOME / ~/.cache/huggingface). Without network access, download the checkpoint "
        f"elsewhere and pass its path instead of the tag: --pretrained /path/to/open_clip_model.safetensors "
        f"(or UPT_PRETRAINED for the service). OpenAI's weights from a file need the QuickGELU variant of the "
        f"model name, e.g. --model ViT-B-16-quickgelu."
    )


def _check_supported(model: str, clip: torch.nn.Module) -> None:
    if not isinstance(clip, CLIP) or not isinstance(clip.visual, VisionTransformer):
        raise UnsupportedBackboneError(
            f"{model} is not a ViT-based open_clip CLIP; prompts can only be inserted into ViT towers."
        )
    if clip.visual.attn_pool is not None:
        raise UnsupportedBackboneError(f"{model} uses attention pooling, which the visual prompts do not support.")


def _image_spec(clip: CLIP) -> ImageSpec:
    cfg = clip.visual.preprocess_cfg
    size = cfg["size"]
    return ImageSpec(
        size=int(size[0] if isinstance(size, (tuple, list)) else size),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic"),
    )


def fingerprint(module: torch.nn.Module) -> str:
    """sha256 of the weights themselves, so the same weights match whatever file format held them."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
