"""What each method learns, as one frozen dataclass saved in every artifact."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..options import JsonOptions

ZERO_SHOT = "zero-shot"
TIP_ADAPTER, TIP_ADAPTER_F = "tip-adapter", "tip-adapter-f"
COCOOP = "cocoop"
COCOOP_CTX_INIT = "a photo of a"  # CoCoOp's default context (its configs' ctxv1)
METHODS: tuple[str, ...] = (ZERO_SHOT, "coop", "vpt-shallow", "vpt-deep", "upt", "joint", "shared", "mlp",
                            TIP_ADAPTER, TIP_ADAPTER_F, COCOOP)
# Methods whose classifier adds a cache of the training images' features (upt/methods/tip_adapter.py)
# to the zero-shot logits instead of learning prompts.
CACHE_METHODS = frozenset({TIP_ADAPTER, TIP_ADAPTER_F})
PROMPT_METHODS: tuple[str, ...] = tuple(m for m in METHODS if m not in CACHE_METHODS)

# One line per method, for the CLI's help and the web client.
DESCRIPTIONS: dict[str, str] = {
    ZERO_SHOT: "No training: class names in hand-written templates. A baseline, and enough for common objects.",
    "coop": "Learns the text template (CoOp). Helps when images of a class look alike but names are ambiguous.",
    "vpt-shallow": "Learns visual tokens at the image encoder's input. Cheap; generalises well to new domains.",
    "vpt-deep": "Learns visual tokens at every image layer. Helps when images of one class vary a lot.",
    "upt": "Learns one shared prompt split into text and visual prompts by a small Transformer (the paper's method).",
    "joint": "Ablation: CoOp and VPT-deep prompts trained together without sharing.",
    "shared": "Ablation: one prompt used by both encoders, with only a linear map to the vision width.",
    "mlp": "Ablation: UPT with a 2-layer MLP in place of the Transformer layer.",
    TIP_ADAPTER: "No training: a cache of the training images' features added to zero-shot (Tip-Adapter). Ready in seconds.",
    TIP_ADAPTER_F: "Tip-Adapter's cache keys fine-tuned for 20 quick epochs over cached features (Tip-Adapter-F).",
    COCOOP: "CoOp's context shifted per image by a small meta-net (CoCoOp). Generalises better to unseen "
            "domains than CoOp; the text encoder runs once per image, so training and serving are slower.",
}

TEXT_METHODS = frozenset({"coop", "upt", "joint", "shared", "mlp", COCOOP})

DEFAULT_TEMPLATE = "a photo of a {}."
# The seven templates CLIP's authors selected for ImageNet, used for the zero-shot ensemble.
ENSEMBLE_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


@dataclass(frozen=True)
class PromptConfig(JsonOptions):
    """Prompt options of one method.

    depth: how many layers receive prompts. None means the method's own default: every vision layer
    for vpt-deep and for joint's visual side, 1 (shallow, as the paper's released code) otherwise.
    ctx_init: initialise the text context from a template's word embeddings ("a photo of a"); the
    number of context tokens is then that phrase's token count. Random N(0, 0.02²) otherwise.
    templates: the hand-written templates of zero-shot, and of the fixed classifier that the
    visual-only methods train against; several are averaged (an ensemble).
    """

    method: str
    n_ctx: int = 4
    depth: int | None = None
    ctx_init: str | None = None
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    dropout: float = 0.1
    init_std: float = 0.02

    options_kind = "prompt options"

    def __post_init__(self) -> None:
        object.__setattr__(self, "templates", tuple(self.templates))
        self.validate()

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"Unknown method {self.method!r}; choose one of: {', '.join(METHODS)}.")
        if not 1 <= self.n_ctx <= 64:
            raise ConfigError(f"n_ctx (prompt length) must be between 1 and 64, not {self.n_ctx}.")
        if self.depth is not None and self.depth < 1:
            raise ConfigError(f"depth must be at least 1, not {self.depth}.")
        if self.method == "vpt-shallow" and self.depth not in (None, 1):
            raise ConfigError("vpt-shallow prompts only the first layer; use vpt-deep for depth > 1.")
        if self.method in CACHE_METHODS and (self.n_ctx, self.depth, self.ctx_init) != (4, None, None):
            raise ConfigError(f"{self.method} learns no prompts: n_ctx, depth and ctx_init do not apply to it.")
        if self.ctx_init is not None and self.method not in {"coop", "joint", "shared", COCOOP}:
            raise ConfigError(
                f"ctx_init applies to methods whose text context is used as is (coop, joint, shared, cocoop), "
                f"not {self.method}, whose prompts pass through a learned generator."
            )
        if self.ctx_init is not None and not self.ctx_init.strip():
            raise ConfigError("ctx_init must contain words, e.g. 'a photo of a'.")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ConfigError("Every template must contain '{}' where the class name goes.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), not {self.dropout}.")

    @property
    def context_init(self) -> str | None:
        """The words the text context starts from: ctx_init, or the method's own default (CoCoOp's)."""
        if self.ctx_init is None and self.method == COCOOP and self.n_ctx == 4:  # CoCoOp's ctxv1 configs
            return COCOOP_CTX_INIT
        return self.ctx_init

    @property
    def conditional(self) -> bool:
        """The text context depends on the image (CoCoOp): no classifier W can be computed once."""
        return self.method == COCOOP

    @property
    def learns_text(self) -> bool:
        return self.method in TEXT_METHODS

    @property
    def uses_cache(self) -> bool:
        return self.method in CACHE_METHODS

