"""What each method learns, as one frozen dataclass saved in every artifact.

The method names and their properties come from the registry (upt/methods/registry.py); the lists
below are derived from it for the callers that iterate over methods.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..options import CTX_INIT, DEPTH, DROPOUT, N_CTX, JsonOptions
from .registry import REGISTRY, SPECS, MethodSpec, method_spec

METHODS: tuple[str, ...] = tuple(spec.name for spec in SPECS)
ZERO_SHOT = "zero-shot"
# Methods whose classifier adds a cache of the training images' features (upt/methods/tip_adapter.py)
# to the zero-shot logits instead of learning prompts.
CACHE_METHODS = frozenset(spec.name for spec in SPECS if spec.uses_cache)
# Methods that adapt the towers' weights (CLIP-LoRA, upt/methods/lora.py): neither a cache nor prompts.
ADAPTER_METHODS = frozenset(spec.name for spec in SPECS if spec.learns_adapters)
PROMPT_METHODS: tuple[str, ...] = tuple(spec.name for spec in SPECS
                                        if not spec.uses_cache and not spec.learns_adapters)

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

    depth: how many layers receive prompts. None means the method's own default (its spec's
    DepthRule): every vision layer for vpt-deep and for joint's visual side, 1 (shallow, as the
    paper's released code) otherwise.
    ctx_init: initialise the text context from a template's word embeddings ("a photo of a"); the
    number of context tokens is then that phrase's token count. Random N(0, 0.02²) otherwise.
    templates: the hand-written templates of zero-shot, and of the fixed classifier that the
    visual-only methods train against; several are averaged (an ensemble).
    """

    method: str
    n_ctx: int = N_CTX.default
    depth: int | None = None
    ctx_init: str | None = None
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    dropout: float = DROPOUT.default
    init_std: float = 0.02

    options_kind = "prompt options"

    def __post_init__(self) -> None:
        object.__setattr__(self, "templates", tuple(self.templates))
        self.validate()

    @property
    def spec(self) -> MethodSpec:
        return REGISTRY[self.method]

    def validate(self) -> None:
        spec = method_spec(self.method)
        N_CTX.check(self.n_ctx)
        DEPTH.check(self.depth)
        DROPOUT.check(self.dropout)
        if spec.uses_cache or spec.learns_adapters:  # they learn no prompts: a prompt option would change nothing
            given = [name for name, default in (("n_ctx", N_CTX.default), ("depth", None), ("ctx_init", None))
                     if getattr(self, name) != default]
            if given:
                raise ConfigError(f"{self.method} learns no prompts: n_ctx, depth and ctx_init do not apply to it.",
                                  field=given[0])
        if self.depth is not None and spec.depth is not None and spec.depth.maximum is not None \
                and self.depth > spec.depth.maximum:
            raise ConfigError(spec.depth.advice, field="depth")
        if self.ctx_init is not None and not spec.takes(CTX_INIT.name):
            takers = ", ".join(s.name for s in SPECS if s.takes(CTX_INIT.name))
            raise ConfigError(f"ctx_init applies to methods whose text context is used as is ({takers}), "
                              f"not {self.method}.", field="ctx_init")
        if self.ctx_init is not None and not self.ctx_init.strip():
            raise ConfigError("ctx_init must contain words, e.g. 'a photo of a'.", field="ctx_init")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ConfigError("Every template must contain '{}' where the class name goes.", field="templates")

    @property
    def context_init(self) -> str | None:
        """The words the text context starts from: ctx_init, or the method's own default (CoCoOp's,
        with its default length)."""
        if self.ctx_init is None and self.n_ctx == N_CTX.default:
            return self.spec.context_init
        return self.ctx_init

    @property
    def conditional(self) -> bool:
        """The text context depends on the image (CoCoOp): no classifier W can be computed once."""
        return self.spec.conditional

    @property
    def learns_text(self) -> bool:
        return self.spec.learns_text

    @property
    def uses_cache(self) -> bool:
        return self.spec.uses_cache
