"""The one list of methods: a `MethodSpec` per method says what it is, what it learns, which options
it takes (with their types, defaults, limits and help), its default depth and how to build it.

Everything else is derived from it: `METHODS` and the other name lists in `upt.methods.config`, the
prompt options' checks, `build_prompt_generator`, the `upt train` flags, `upt methods`, the API's
form validation and OpenAPI description, and `GET /methods` (which the web client reads).

Adding a method = one module with its `nn.Module` (like `cocoop.py`) and one spec below.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from torch import nn

from ..errors import ConfigError
from ..options import (
    ALPHA_MAX,
    AUGMENT_VIEWS,
    BETA_MAX,
    BATCH_SIZE,
    CTX_INIT,
    DEPTH,
    EPOCHS,
    GPA_MEAN,
    GPA_STD,
    IMAGE_LOSS_WEIGHT,
    INIT_ALPHA,
    INIT_BETA,
    ITERATIONS,
    LORA_ALPHA,
    LORA_DROPOUT,
    LORA_RANK,
    LR,
    N_CTX,
    OPTIONS,
    SEED,
    SHOTS,
    TEXT_LOSS_WEIGHT,
    OptionSpec,
    UnusedOptionError,
)
from . import lora, promptsrc
from .cocoop import BATCH_SIZE as COCOOP_BATCH_SIZE
from .cocoop import EPOCHS as COCOOP_EPOCHS
from .cocoop import ConditionalContext
from .gda import NAME as GDA
from .prompts import JointPrompts, PromptMLP, TextContext, UnifiedPrompts, UnifiedTransformerLayer, VisualPrompts

if TYPE_CHECKING:
    import torch

    from .config import PromptConfig

TEXT, VISUAL, CACHE = "text", "visual", "cache"  # what a method learns
ADAPTERS = "adapters"  # low-rank updates of the frozen towers' weights (CLIP-LoRA)
DEFAULT_BATCH_SIZE = 32  # the paper's (CoOp's)
DEFAULT_LR = 0.002  # the paper's (CoOp's)
TIP_ADAPTER_F_EPOCHS = 20  # Tip-Adapter-F's paper (upt.methods.tip_adapter.CacheOptions.epochs)


@dataclass(frozen=True)
class DepthRule:
    """Which towers a method's `depth` counts layers of, and its default.

    default None: every layer of the tower. maximum: a method's own cap (VPT-shallow: 1), with the
    advice its error gives."""

    towers: tuple[str, ...]  # ("text",), ("vision",) or ("text", "vision"): depth ≤ the smaller tower
    default: int | None = 1
    maximum: int | None = None
    advice: str = ""
    capped: bool = False  # the default is cut to the towers' layers (PromptSRC's 9 on a smaller model)

    def layers(self, towers: Any) -> int:
        """The layers `depth` may reach on `towers` (anything with text_layers and vision_layers)."""
        return min(getattr(towers, f"{tower}_layers") for tower in self.towers)

    def resolve(self, depth: int | None, towers: Any) -> int:
        """The depth used on `towers`; ConfigError (field depth) if it exceeds their layers."""
        layers = self.layers(towers)
        chosen = depth if depth is not None else self.default if self.default is not None else layers
        if depth is None and self.capped:
            chosen = min(chosen, layers)
        if chosen > layers:
            raise ConfigError(f"depth {chosen} exceeds the {layers} layers of the {' and '.join(self.towers)} "
                              f"encoder.", field="depth")
        return chosen

    def describe(self) -> str:
        """'every vision layer', '1 layer of the text and vision towers', '1 layer of the vision tower, at most 1'."""
        tower = " and ".join(self.towers)
        if self.default is None:
            return f"every {tower} layer"
        layers = f"{self.default} layer{'s' if self.default > 1 else ''}"
        towers = f"{tower} tower{'s' if len(self.towers) > 1 else ''}"
        capped = ", or every layer of a tower with fewer" if self.capped else ""
        return f"{layers} of the {towers}{capped}{'' if self.maximum is None else f', at most {self.maximum}'}"


# (backbone, prompt config, context length, depth, ctx_init word embeddings) -> the learnable module
Builder = Callable[[Any, "PromptConfig", int, int, "torch.Tensor | None"], nn.Module]


@dataclass(frozen=True)
class MethodSpec:
    """One method. `options` are those it takes, with its own defaults; `learns` what it trains."""

    name: str
    title: str  # a short display name ("CoOp (text prompt)")
    description: str  # one line: what it does and when it helps
    learns: tuple[str, ...]  # TEXT, VISUAL (prompts), CACHE (a cache of training features); () nothing
    options: tuple[OptionSpec, ...]
    depth: DepthRule | None = None  # None: takes no depth
    build: Builder | None = None  # None: no learnable prompts
    conditional: bool = False  # the text context depends on the image: no classifier W is computed once
    trains: bool = True  # False: no epochs at all (zero-shot, Tip-Adapter)
    epochs: int | None = None  # its default epochs; None: the paper's schedule by shots
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = DEFAULT_LR  # its SGD learning rate after the warm-up
    context_init: str | None = None  # the words its default context starts from (CoCoOp's "a photo of a")
    recipe: str | None = None  # its own optimiser recipe: the SGD options are refused rather than ignored
    # (model, TrainConfig, data set name) -> its own training objective (upt.training.CrossEntropy's
    # methods: PromptSRC's self-regulation); None: the cross-entropy of the logits
    objective: Callable[[Any, Any, str], Any] | None = None

    @property
    def learns_text(self) -> bool:
        return TEXT in self.learns

    @property
    def uses_cache(self) -> bool:
        return CACHE in self.learns

    @property
    def learns_prompts(self) -> bool:
        return self.build is not None

    @property
    def learns_adapters(self) -> bool:
        return ADAPTERS in self.learns

    def option(self, name: str) -> OptionSpec | None:
        return next((option for option in self.options if option.name == name), None)

    def takes(self, name: str) -> bool:
        return self.option(name) is not None

    def refuse_unused(self, options: Mapping[str, Any]) -> None:
        """UnusedOptionError for the first of `options` that is some method's but not this one's."""
        refuse_unused(self.name, self.options, options)

    def as_dict(self) -> dict[str, Any]:
        """What `upt methods --json` and `GET /methods` say about this method."""
        return {"name": self.name, "title": self.title, "description": self.description, "learns": list(self.learns),
                "conditional": self.conditional, "uses_cache": self.uses_cache,
                "default_depth": None if self.depth is None else self.depth.describe(),
                "options": [option.as_dict() for option in self.options]}


def _default(option: OptionSpec, default: Any, why: str) -> OptionSpec:
    """`option` with this method's default, said in its help."""
    return replace(option, default=default, help=f"{option.help.split(' (default')[0]} (default: {why})")


_TRAINING = (SHOTS, SEED, EPOCHS, LR, BATCH_SIZE)


def _prompt_options(depth: DepthRule, ctx_init: bool = False) -> tuple[OptionSpec, ...]:
    depth_option = replace(DEPTH, help=f"layers that receive prompts (default: {depth.describe()})")
    return (N_CTX, depth_option, *((CTX_INIT,) if ctx_init else ())) + _TRAINING


def _text_context(backbone, config, n_ctx, depth, init):
    return TextContext(n_ctx, backbone.text_width, depth, config.init_std, init)


def _visual_prompts(backbone, config, n_ctx, depth, init):
    return VisualPrompts(n_ctx, backbone.vision_width, depth, config.init_std)


def _joint(backbone, config, n_ctx, depth, init):
    return JointPrompts(TextContext(n_ctx, backbone.text_width, 1, config.init_std, init),
                        VisualPrompts(n_ctx, backbone.vision_width, depth, config.init_std))


def _unified(mixer: Callable[[int, float], nn.Module] | None, split: bool = True) -> Builder:
    def build(backbone, config, n_ctx, depth, init):
        mixed = None if mixer is None else mixer(backbone.text_width, config.dropout)  # drawn first, as always
        return UnifiedPrompts(n_ctx, backbone.text_width, backbone.vision_width, depth, config.init_std, mixed,
                              split=split, init=init)

    return build


def _independent(backbone, config, n_ctx, depth, init):
    """Deep prompts of `depth` layers in each tower, learned independently (PromptSRC's IVLP prompts)."""
    return JointPrompts(TextContext(n_ctx, backbone.text_width, depth, config.init_std, init),
                        VisualPrompts(n_ctx, backbone.vision_width, depth, config.init_std))


def _conditional_context(backbone, config, n_ctx, depth, init):
    return ConditionalContext(n_ctx, backbone.text_width, backbone.clip.visual.output_dim, config.init_std, init)


_TEXT_DEPTH = DepthRule(("text",))
_BOTH_DEPTH = DepthRule(("text", "vision"))
_VISION_ALL = DepthRule(("vision",), default=None)
_SHALLOW = DepthRule(("vision",), default=1, maximum=1,
                     advice="vpt-shallow prompts only the first layer; use vpt-deep for depth > 1.")
_PROMPTSRC_DEPTH = DepthRule(("text", "vision"), default=promptsrc.DEPTH, capped=True)
_CACHE_RECIPE = "Tip-Adapter's recipe (AdamW, lr 0.001, batch 256, cosine)"
_SEARCH = (ALPHA_MAX, BETA_MAX, INIT_ALPHA, INIT_BETA)  # Tip-Adapter's search: the released config's by default
_FEW_SHOT_CONFIG = "its few-shot config's"
_PROMPTSRC_OPTIONS = (
    N_CTX, replace(DEPTH, help=f"layers that receive prompts (default: {_PROMPTSRC_DEPTH.describe()})"), CTX_INIT,
    SHOTS, SEED, _default(EPOCHS, None, f"{promptsrc.EPOCHS}, {_FEW_SHOT_CONFIG}"),
    _default(LR, None, f"{promptsrc.LR}, {_FEW_SHOT_CONFIG}"),
    _default(BATCH_SIZE, None, f"{promptsrc.BATCH_SIZE}, {_FEW_SHOT_CONFIG}"),
    _default(TEXT_LOSS_WEIGHT, promptsrc.TEXT_LOSS_WEIGHT, f"{promptsrc.TEXT_LOSS_WEIGHT:g}, {_FEW_SHOT_CONFIG}"),
    _default(IMAGE_LOSS_WEIGHT, promptsrc.IMAGE_LOSS_WEIGHT, f"{promptsrc.IMAGE_LOSS_WEIGHT:g}, {_FEW_SHOT_CONFIG}"),
    _default(GPA_MEAN, None, f"{promptsrc.GPA_MEAN:g}; {promptsrc.SHARP_GPA_MEAN:g} on Stanford Cars, Flowers, "
                             f"Aircraft, DTD and EuroSAT, {_FEW_SHOT_CONFIG}"),
    _default(GPA_STD, None, f"{promptsrc.GPA_STD:g}; {promptsrc.SHARP_GPA_STD:g} on Stanford Cars, Flowers, "
                            f"Aircraft, DTD and EuroSAT, {_FEW_SHOT_CONFIG}"),
)
_GDA_RECIPE = "GDA's closed form (no optimiser)"
_LORA_RECIPE = "CLIP-LoRA's recipe (AdamW, weight decay 0.01, cosine over its iterations)"
_LORA_OPTIONS = (
    SHOTS, SEED, _default(LORA_RANK, None, f"{lora.RANK}, the paper's"),
    _default(LORA_ALPHA, None, f"{lora.ALPHA:g}, the paper's"),
    _default(LORA_DROPOUT, None, f"{lora.DROPOUT:g}, the paper's"),
    _default(ITERATIONS, None, f"{lora.ITERATIONS_PER_SHOT} × shots, the paper's"),
    replace(LR, help=f"AdamW learning rate (default: {lora.LR:g}, the paper's)"),
    replace(BATCH_SIZE, help=f"images per AdamW step (default: {DEFAULT_BATCH_SIZE}, the paper's)"),
)

SPECS: tuple[MethodSpec, ...] = (
    MethodSpec("zero-shot", "Zero-shot",
               "No training: class names in hand-written templates (\"a photo of a {class}\"). Instant; a baseline, "
               "and enough for common objects.",
               learns=(), options=(SHOTS, SEED), trains=False),
    MethodSpec("coop", "CoOp (text prompt)",
               "Learns the words around each class name (CoOp). Cheap and strong when each class looks "
               "consistent but its name alone says little.",
               learns=(TEXT,), options=_prompt_options(_TEXT_DEPTH, ctx_init=True), depth=_TEXT_DEPTH,
               build=_text_context),
    MethodSpec("vpt-shallow", "VPT shallow",
               "Learns a few image tokens at the image encoder's input (VPT). Cheapest visual option; helps when "
               "images look unlike web photos (sketches, scans) and generalises well to new domains.",
               learns=(VISUAL,), options=_prompt_options(_SHALLOW), depth=_SHALLOW, build=_visual_prompts),
    MethodSpec("vpt-deep", "VPT deep",
               "Learns image tokens at every layer of the image encoder. More capacity when images of one class "
               "vary a lot; needs more shots to avoid over-fitting.",
               learns=(VISUAL,), options=_prompt_options(_VISION_ALL), depth=_VISION_ALL, build=_visual_prompts),
    MethodSpec("upt", "UPT (unified prompt)",
               "The paper's method: one shared prompt split into text and image prompts by a small Transformer. "
               "The best all-round choice, when images of a class vary and when class names sound alike.",
               learns=(TEXT, VISUAL), options=_prompt_options(_BOTH_DEPTH), depth=_BOTH_DEPTH,
               build=_unified(UnifiedTransformerLayer)),
    MethodSpec("joint", "Joint (CoOp + VPT)",
               "Ablation: CoOp's text prompt and VPT-deep's image prompts trained together without sharing; shows "
               "what UPT's shared prompt adds.",
               learns=(TEXT, VISUAL), options=_prompt_options(_VISION_ALL, ctx_init=True), depth=_VISION_ALL,
               build=_joint),
    MethodSpec("shared", "Shared prompt",
               "Ablation: one prompt used by both encoders, with only a linear map to the vision width. A lighter "
               "UPT.",
               learns=(TEXT, VISUAL), options=_prompt_options(_BOTH_DEPTH, ctx_init=True), depth=_BOTH_DEPTH,
               build=_unified(None, split=False)),
    MethodSpec("mlp", "UPT with an MLP",
               "Ablation: UPT with a 2-layer MLP in place of the Transformer layer; slightly faster to train.",
               learns=(TEXT, VISUAL), options=_prompt_options(_BOTH_DEPTH), depth=_BOTH_DEPTH,
               build=_unified(PromptMLP)),
    MethodSpec("tip-adapter", "Tip-Adapter (no training)",
               "No training: a cache of the training images' features votes next to zero-shot (Tip-Adapter). "
               "Ready seconds after the task is created.",
               learns=(CACHE,), options=(SHOTS, SEED, AUGMENT_VIEWS, *_SEARCH), trains=False, recipe=_CACHE_RECIPE),
    MethodSpec("tip-adapter-f", "Tip-Adapter-F",
               "Tip-Adapter's cache keys fine-tuned for 20 quick epochs over cached features (Tip-Adapter-F). "
               "Usually better than Tip-Adapter, still done in seconds to minutes.",
               learns=(CACHE,), options=(SHOTS, SEED, _default(EPOCHS, None, f"{TIP_ADAPTER_F_EPOCHS}, the paper's"),
                                         AUGMENT_VIEWS, *_SEARCH),
               epochs=TIP_ADAPTER_F_EPOCHS, recipe=_CACHE_RECIPE),
    MethodSpec(GDA, "GDA (no training)",
               "No training: a Gaussian per class over the shots' image features, with one shared covariance, "
               "added to zero-shot (GDA). Ready seconds after the task is created; usually well above "
               "Tip-Adapter from 2 shots on.",
               learns=(CACHE,), options=(SHOTS, SEED, AUGMENT_VIEWS), trains=False, recipe=_GDA_RECIPE),
    MethodSpec("cocoop", "CoCoOp (conditional prompt)",
               "CoOp's context shifted per image by a small meta-net (CoCoOp). Generalises better to unseen domains "
               "than CoOp; the text encoder runs once per image, so training and serving are slower.",
               learns=(TEXT,),
               options=(N_CTX, CTX_INIT, SHOTS, SEED, _default(EPOCHS, None, f"{COCOOP_EPOCHS}, the paper's"), LR,
                        _default(BATCH_SIZE, None, f"{COCOOP_BATCH_SIZE}, the paper's")),
               build=_conditional_context, conditional=True, epochs=COCOOP_EPOCHS, batch_size=COCOOP_BATCH_SIZE,
               context_init="a photo of a"),
    MethodSpec("promptsrc", "PromptSRC (self-regulating prompts)",
               "Deep prompts in both towers kept close to frozen CLIP (its features and zero-shot predictions) and "
               "averaged over the epochs (PromptSRC). Strong with few shots and keeps CLIP's generality; 50 "
               "epochs at batch 4, three encoder passes per step.",
               learns=(TEXT, VISUAL), options=_PROMPTSRC_OPTIONS, depth=_PROMPTSRC_DEPTH, build=_independent,
               epochs=promptsrc.EPOCHS, batch_size=promptsrc.BATCH_SIZE, lr=promptsrc.LR,
               context_init=promptsrc.CONTEXT_INIT, objective=promptsrc.self_regulation),
    MethodSpec("clip-lora", "CLIP-LoRA (low-rank adapters)",
               "Low-rank adapters on the queries, keys and values of every layer of both encoders (CLIP-LoRA). The "
               "best published few-shot accuracy of these methods; 500 steps per shot, the longest to train.",
               learns=(ADAPTERS,), options=_LORA_OPTIONS, lr=lora.LR, recipe=_LORA_RECIPE),
)

REGISTRY: dict[str, MethodSpec] = {spec.name: spec for spec in SPECS}


def method_spec(name: str) -> MethodSpec:
    """The spec of `name`; ConfigError (field method) naming the choices if there is none."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise ConfigError(f"Unknown method {name!r}; choose one of: {', '.join(REGISTRY)}.", field="method")
    return spec


def registry_as_dicts() -> list[dict[str, Any]]:
    return [spec.as_dict() for spec in SPECS]


def train_options() -> list[OptionSpec]:
    """Every option some method takes, as the general spec (not one method's defaults), in the
    registry's order: the `upt train` flags and the API's `POST /tasks` option fields."""
    names = dict.fromkeys(option.name for spec in SPECS for option in spec.options)
    return [OPTIONS[name] for name in names]


def refuse_unused(method: str, takes: Sequence[OptionSpec], options: Mapping[str, Any]) -> None:
    """The rule for every caller (`TrainConfig.of`, hence `upt train` and `POST /tasks`; auto's shared
    options): an option that some method takes (a `upt train` flag, a `POST /tasks` field), given to
    `method` whose options `takes` do not include it, is refused, not silently ignored; a user who
    sends depth=12 with CoCoOp would believe it mattered. A value of None is not given (it means the
    method's own default); the options only the Python API sets (momentum, dropout, ...) belong to
    no method's list and are not judged here."""
    taken = {option.name for option in takes}
    settable = {option.name for spec in SPECS for option in spec.options}
    for name, value in options.items():
        if value is not None and name in settable and name not in taken:
            raise UnusedOptionError(method, name, tuple(takes))


def methods_taking(option: str) -> list[str]:
    return [spec.name for spec in SPECS if spec.takes(option)]


def takers_text(option: str) -> str:
    """'' when every method takes `option`, else which do and that the others refuse it (the `upt train`
    help and the OpenAPI description say so)."""
    takers = methods_taking(option)
    return "" if len(takers) == len(SPECS) else f"methods: {', '.join(takers)}; refused by the others"
