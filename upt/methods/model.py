"""A frozen backbone plus one method's prompts: the model that is trained and served."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from ..encoders import encode_image, encode_text
from ..errors import ConfigError
from .cocoop import ConditionalContext, conditional_logits
from .config import PromptConfig
from .prompts import Prompts


def clean_class_name(name: str) -> str:
    return name.replace("_", " ").strip()


TEXT_CHUNK = 256  # prompts per text-encoder pass: bounds memory for 1000 classes x 7 templates


@torch.no_grad()
def template_classifier(backbone: Backbone, class_names: list[str], templates: tuple[str, ...],
                        normalize_each: bool = True) -> torch.Tensor:
    """Zero-shot classifier W (k, d): each class's template features averaged, then normalised.
    `normalize_each`: each feature normalised before the mean (CLIP's ensemble); PromptSRC's frozen
    targets average the unnormalised features.

    All class x template prompts go through the text encoder in a few passes, one per prompt length
    (split into chunks of TEXT_CHUNK): each pass is cut after its prompts' end-of-text token (see
    `encode_text`), so no prompt is padded to a longer one, and one pass over many prompts costs far
    less than one pass per class. (Passes of 256 prompts of any length, each padded to its longest,
    took 1.12x as long for 100 ImageNet class names, 9.5 tokens on average and 14 at most, and 1.24x
    for 1,000; ViT-B-16 on a CPU.)
    """
    texts = [template.format(clean_class_name(name)) for name in class_names for template in templates]
    tokens = backbone.tokenizer(texts)
    lengths = tokens.argmax(dim=-1)  # the end-of-text token's position
    chunks = [chunk for length in lengths.unique()
              for chunk in (lengths == length).nonzero().squeeze(1).split(TEXT_CHUNK)]
    encoded = torch.cat([encode_text(backbone.clip, tokens[chunk].to(backbone.device), normalize=normalize_each)
                         for chunk in chunks])
    features = torch.empty_like(encoded)
    features[torch.cat(chunks).to(backbone.device)] = encoded  # back to class-major order
    features = features.view(len(class_names), len(templates), -1)
    return F.normalize(features.mean(dim=1), dim=-1)


class PromptedCLIP(nn.Module):
    """Logits of `class_names` for a batch of images, through the method's prompts.

    Only `self.prompts` holds trainable parameters; the backbone is kept outside the module tree so
    that `state_dict()` and `parameters()` are the learned prompts alone.
    """

    def __init__(self, backbone: Backbone, class_names: list[str], config: PromptConfig):
        super().__init__()
        if len(class_names) < 2:
            raise ConfigError("At least two classes are needed.", field="class_names")
        self.backbone = backbone
        self.class_names = list(class_names)
        self.config = config
        if config.learns_text:
            check_start_token(backbone)
            check_text_prompt_fits(backbone, config, class_names)
        self.n_ctx = _context_length(backbone, config)
        self.prompts: nn.Module | None = build_prompt_generator(backbone, config, self.n_ctx)
        if config.learns_text:
            self.register_buffer("class_tokens", self._class_tokens(), persistent=False)
        else:
            self.register_buffer("fixed_classifier", template_classifier(backbone, class_names, config.templates),
                                 persistent=False)
        self.to(backbone.device)

    @property
    def clip(self):
        return self.backbone.clip

    def generate(self) -> Prompts:
        return Prompts() if self.prompts is None else self.prompts()

    def classifier(self, prompts: Prompts) -> torch.Tensor:
        """Normalised text classifier W (k, d) for this step's prompts."""
        if not self.config.learns_text:
            return self.fixed_classifier
        return encode_text(self.clip, self.class_tokens, prompts.text, normalize=True)

    def image_features(self, images: torch.Tensor, prompts: Prompts) -> torch.Tensor:
        return encode_image(self.clip, images, prompts.visual, normalize=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.config.conditional:  # CoCoOp: a context per image, so a classifier per image
            features = encode_image(self.clip, images, None, normalize=True)
            return conditional_logits(self.clip, self.class_tokens, self.prompts, features, self.backbone.logit_scale)
        prompts = self.generate()  # once per step, shared by both towers
        return self.backbone.logit_scale * self.image_features(images, prompts) @ self.classifier(prompts).T

    @torch.no_grad()
    def export(self) -> dict[str, torch.Tensor]:
        """What serving needs, resolved in eval mode: the classifier W and the visual prompts (CoCoOp: its
    context and meta-net too, and W is the classifier of its context before the image's shift)."""
        was_training = self.training
        self.eval()
        prompts = self.generate()
        resolved = {"classifier": self.classifier(prompts).float().clone()}
        if prompts.visual is not None:
            resolved["visual_prompts"] = prompts.visual.float().clone()  # not a view of a parameter
        if self.config.conditional:  # serving shifts the context per image; W above is the unshifted one
            resolved |= self.prompts.serving_tensors()
        self.train(was_training)
        return resolved

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _class_tokens(self) -> torch.Tensor:
        """`[SOS] X…X name. [EOS]`: the X (or the ctx_init words) are replaced by the learned context."""
        return context_prompt_tokens(self.backbone, self.class_names, self.n_ctx, self.config.context_init)


def context_prompt_tokens(backbone: Backbone, class_names: list[str], n_ctx: int,
                          words: str | None = None) -> torch.Tensor:
    """`[SOS] X…X name. [EOS]` per class: the n_ctx X (or the `words` that initialise the context) are
    placeholders at positions 1..n_ctx, which the learned context replaces."""
    prefix = words.strip() if words else " ".join(["X"] * n_ctx)
    return backbone.tokenizer([f"{prefix} {clean_class_name(name)}." for name in class_names]).to(backbone.device)


def _token_count(backbone: Backbone, text: str) -> int:
    """Tokens of `text` without [SOS]/[EOS] and without truncation (the tokenizer cuts at the context length)."""
    ids = backbone.tokenizer([text], context_length=len(text.encode("utf-8")) + 8)[0]
    return int((ids != 0).sum()) - 2


def check_start_token(backbone: Backbone) -> None:
    """The learned text context replaces positions 1..m, after a start token at position 0. A tokenizer
    with none (open_clip's multilingual models) would overwrite the class name's first tokens, and
    classes of one token would all get the same prompt: refuse it rather than train a broken model."""
    ids = backbone.tokenizer(["a", "b"])
    if int(ids[0, 0]) != int(ids[1, 0]) or int(ids[0, 0]) == 0 or int(ids[0, 1]) == int(ids[1, 1]):
        raise ConfigError(f"{backbone.name}'s tokenizer puts no start token at position 0, where the learned text "
                          f"context (CoOp, UPT and their ablations) is placed after; use a model with CLIP's "
                          f"tokenizer, or a method that learns no text context (zero-shot, vpt-shallow, vpt-deep).",
                          field="method")


def check_text_prompt_fits(backbone: Backbone, config: PromptConfig, class_names: list[str]) -> None:
    """`[SOS] context name. [EOS]` must fit the text encoder's context: past it, the tokenizer cuts the
    class name off and every class gets the same prompt (a "trained" model that predicts 1/k for all).
    A ctx_init phrase must also give at least one token of words (not "\x00" or a zero-width space)."""
    if config.context_init is not None:
        phrase = config.context_init.strip()
        if not any(ch.isalnum() for ch in phrase) or _token_count(backbone, phrase) < 1:
            raise ConfigError("ctx_init must contain words, e.g. 'a photo of a'.", field="ctx_init")
        n_ctx, field = _token_count(backbone, phrase), "ctx_init"
    else:
        n_ctx, field = config.n_ctx, "n_ctx"
    limit = backbone.context_length
    longest = max(class_names, key=lambda name: _token_count(backbone, f"{clean_class_name(name)}."))
    room = limit - 2 - _token_count(backbone, f"{clean_class_name(longest)}.")
    if n_ctx > room:
        raise ConfigError(f"{field} takes {n_ctx} tokens, but the text encoder's context of {limit} tokens leaves "
                          f"room for {max(room, 0)} beside the longest class name ({longest[:40]!r}); shorten it.",
                          field=field)


def _context_length(backbone: Backbone, config: PromptConfig) -> int:
    if config.context_init is None:
        return config.n_ctx
    return _ctx_init_ids(backbone, config.context_init).numel()


def _ctx_init_ids(backbone: Backbone, phrase: str) -> torch.Tensor:
    tokens = backbone.tokenizer([phrase.strip()])[0]
    end = int(tokens.argmax())
    return tokens[1:end]  # drop [SOS] and [EOS]


def _ctx_init_embeddings(backbone: Backbone, config: PromptConfig) -> torch.Tensor | None:
    if config.context_init is None:
        return None
    with torch.no_grad():
        ids = _ctx_init_ids(backbone, config.context_init).to(backbone.device)
        return backbone.clip.token_embedding(ids).float().cpu()


def build_prompt_generator(backbone: Backbone, config: PromptConfig, n_ctx: int) -> nn.Module | None:
    """The learnable module of `config.method` (its spec's `build`) for this backbone's widths and
    depths; None for a method without prompts (zero-shot)."""
    spec = config.spec
    if spec.uses_cache:
        raise ConfigError(f"{spec.name} learns no prompts: it is a cache model (upt.methods.tip_adapter).")
    if spec.learns_adapters:
        raise ConfigError(f"{spec.name} learns no prompts: it adapts the towers' weights (upt.methods.lora).")
    if spec.build is None:
        return None
    init = _ctx_init_embeddings(backbone, config)
    depth = spec.depth.resolve(config.depth, backbone) if spec.depth is not None else 1
    return spec.build(backbone, config, n_ctx, depth, init)
