"""The options of training runs: each one's spec (type, default, limits, help), and the JSON
round-trips of the option dataclasses stored in artifacts, checkpoints and task rows.

An `OptionSpec` is the one statement of an option: the CLI's flags, the API's form validation and
OpenAPI description, `upt methods` and `GET /methods` are derived from it, and the range checks of
`TrainConfig` and `PromptConfig` run through its `check`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, ClassVar, TypeVar

from .errors import ConfigError

T = TypeVar("T", bound="JsonOptions")

TYPE_NAMES = {int: "integer", float: "number", str: "string"}  # JSON Schema's names


@dataclass(frozen=True)
class OptionSpec:
    """One option: `default` is what an omitted option means (None: the method's own, said in `help`)."""

    name: str
    type: type  # int, float or str
    help: str
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False  # a value must be > minimum (lr), not >=
    exclusive_maximum: bool = False  # a value must be < maximum (dropout), not <=

    @property
    def flag(self) -> str:
        """The command line's spelling: --n-ctx for n_ctx."""
        return "--" + self.name.replace("_", "-")

    @property
    def type_name(self) -> str:
        return TYPE_NAMES[self.type]

    def parse(self, text: str) -> Any:
        """A form field's or flag's text as this option's type; ConfigError naming the option if it is not."""
        if self.type is str:
            return text
        try:
            value = self.type(text)
        except ValueError:
            kind = "a whole number" if self.type is int else "a number"
            raise ConfigError(f"{self.name} must be {kind}, not {text!r}.", field=self.name) from None
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        """Raise ConfigError (field: this option) if `value` is outside the limits; None is always allowed."""
        if value is None or self.type is str:
            return
        if self.type is float and not math.isfinite(value):
            raise ConfigError(f"{self.name} must be a finite number, not {value}.", field=self.name)
        low_ok = self.minimum is None or (value > self.minimum if self.exclusive_minimum else value >= self.minimum)
        high_ok = self.maximum is None or (value < self.maximum if self.exclusive_maximum else value <= self.maximum)
        if not (low_ok and high_ok):
            raise ConfigError(f"{self.name} must be {self.limits_text()}, not {value}.", field=self.name)

    def limits_text(self) -> str:
        """'between 1 and 64', 'at least 1', 'positive', 'in [0, 1)'."""
        low, high = _number(self.minimum), _number(self.maximum)
        if self.minimum is not None and self.maximum is not None:
            if self.exclusive_minimum or self.exclusive_maximum:
                return (f"in {'(' if self.exclusive_minimum else '['}{low}, {high}"
                        f"{')' if self.exclusive_maximum else ']'}")
            return f"between {low} and {high}"
        if self.minimum is not None:
            if self.exclusive_minimum:
                return "positive" if self.minimum == 0 else f"greater than {low}"
            return "non-negative" if self.minimum == 0 else f"at least {low}"
        if self.maximum is not None:
            return f"less than {high}" if self.exclusive_maximum else f"at most {high}"
        return "any value"

    def json_schema(self) -> dict[str, Any]:
        """This option as a JSON Schema property (the API's OpenAPI form description)."""
        schema: dict[str, Any] = {"type": self.type_name, "description": self.help}
        if self.default is not None:
            schema["default"] = self.default
        if self.minimum is not None:
            schema["exclusiveMinimum" if self.exclusive_minimum else "minimum"] = self.minimum
        if self.maximum is not None:
            schema["exclusiveMaximum" if self.exclusive_maximum else "maximum"] = self.maximum
        return schema

    def as_dict(self) -> dict[str, Any]:
        """What `upt methods --json` and `GET /methods` say about this option."""
        return {"name": self.name, "type": self.type_name, "default": self.default, "minimum": self.minimum,
                "maximum": self.maximum, "exclusive_minimum": self.exclusive_minimum,
                "exclusive_maximum": self.exclusive_maximum, "help": self.help}


class UnusedOptionError(ConfigError):
    """An option given to a method that does not use it: refused rather than silently ignored (the
    registry's `refuse_unused`). `field` is that option; `takes` the options the method does use, so a
    caller can list them in its own spelling (the CLI its flags)."""

    def __init__(self, method: str, option: str, takes: tuple[OptionSpec, ...]):
        self.method, self.takes = method, tuple(takes)
        super().__init__(self.describe(lambda spec: spec.name), field=option)

    def describe(self, spell: Callable[[OptionSpec], str]) -> str:
        """'cocoop does not use this option; its options are n_ctx, ...', each option as `spell` writes it."""
        return f"{self.method} does not use this option; its options are {', '.join(map(spell, self.takes))}."

    def __reduce__(self):  # pickled across processes with what it lists, not only its message
        return type(self), (self.method, self.field, self.takes)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


# Options a user sets (the CLI's `upt train` flags and the API's `POST /tasks` fields)...
SHOTS = OptionSpec("shots", int, "images per class used for training (default: all but the validation images)",
                   minimum=1)
SEED = OptionSpec("seed", int, "fixes the few-shot sample, the initialisation and the batches", default=1)
EPOCHS = OptionSpec("epochs", int, "passes over the training images (default: the method's own schedule)",
                    minimum=0, maximum=10_000)
N_CTX = OptionSpec("n_ctx", int, "prompt length: learned tokens per prompt", default=4, minimum=1, maximum=64)
DEPTH = OptionSpec("depth", int, "layers that receive prompts (default: the method's own)", minimum=1)
CTX_INIT = OptionSpec("ctx_init", str, "initialise the text context from these words, e.g. 'a photo of a' "
                      "(the number of context tokens is then theirs)")
# Learning rates are bounded: 1e30 "succeeded" with a NaN loss and null probabilities, 1e308 overflowed.
MAX_LR = 10.0
LR = OptionSpec("lr", float, "SGD learning rate (default: the method's own: 0.002, the paper's)", minimum=0,
                exclusive_minimum=True, maximum=MAX_LR)
BATCH_SIZE = OptionSpec("batch_size", int, "images per SGD step (default: the method's own)",
                        minimum=1, maximum=4096)
AUGMENT_VIEWS = OptionSpec("augment_views", int, "augmented views averaged per cached training image",
                           default=10, minimum=1, maximum=100)
# Tip-Adapter's search (upt/methods/tip_adapter.py); unset: its released config for the data set (ImageNet's for
# an image folder).
ALPHA_MAX = OptionSpec("alpha_max", float, "Tip-Adapter: the α search's upper end (default: the data set's "
                       "released config, 3 on ImageNet and image folders)", minimum=0.1, exclusive_minimum=True,
                       maximum=1000)
BETA_MAX = OptionSpec("beta_max", float, "Tip-Adapter: the β search's upper end (default: the data set's released "
                      "config, 7 on ImageNet and image folders)", minimum=0.1, exclusive_minimum=True, maximum=1000)
INIT_ALPHA = OptionSpec("init_alpha", float, "Tip-Adapter: α before the search (Tip-Adapter-F trains at it; kept "
                        "when nothing can be searched; default: the data set's released config, 1.17 on ImageNet)",
                        minimum=0, maximum=1000)
INIT_BETA = OptionSpec("init_beta", float, "Tip-Adapter: β before the search (default: 1, every released config's)",
                       minimum=0, maximum=1000)
# PromptSRC's self-regulation (upt/methods/promptsrc.py; its few-shot config's values are the defaults there).
TEXT_LOSS_WEIGHT = OptionSpec("text_loss_weight", float, "PromptSRC: weight of the L1 distance of the prompted class "
                              "text features from frozen CLIP's", minimum=0)
IMAGE_LOSS_WEIGHT = OptionSpec("image_loss_weight", float, "PromptSRC: weight of the L1 distance of the prompted "
                               "image features from frozen CLIP's", minimum=0)
GPA_MEAN = OptionSpec("gpa_mean", float, "PromptSRC: the epoch at which the Gaussian weights of the prompt "
                      "aggregation peak", minimum=0)
GPA_STD = OptionSpec("gpa_std", float, "PromptSRC: the spread, in epochs, of the Gaussian weights of the prompt "
                     "aggregation", minimum=0, exclusive_minimum=True)
# CLIP-LoRA's adapters and schedule (upt/methods/lora.py; its paper's values are the defaults there).
LORA_RANK = OptionSpec("lora_rank", int, "CLIP-LoRA: the rank of the adapters on every query, key and value "
                       "projection", minimum=1, maximum=64)
LORA_ALPHA = OptionSpec("lora_alpha", float, "CLIP-LoRA: the adapters' alpha; their updates are scaled by "
                        "alpha / rank", minimum=0, exclusive_minimum=True)
LORA_DROPOUT = OptionSpec("lora_dropout", float, "CLIP-LoRA: dropout of the adapters' input while training",
                          minimum=0, maximum=1, exclusive_maximum=True)
ITERATIONS = OptionSpec("iterations", int, "CLIP-LoRA: optimiser steps in all (default: the method's own)",
                        minimum=0, maximum=10_000_000)
# ...and those only the Python API sets, checked the same way.
DROPOUT = OptionSpec("dropout", float, "dropout in UPT's prompt Transformer (and the MLP ablation)", default=0.1,
                     minimum=0, maximum=1, exclusive_maximum=True)
MOMENTUM = OptionSpec("momentum", float, "SGD momentum", default=0.9, minimum=0, maximum=1, exclusive_maximum=True)
WEIGHT_DECAY = OptionSpec("weight_decay", float, "SGD weight decay", default=5e-4, minimum=0, maximum=1)
WARMUP_EPOCHS = OptionSpec("warmup_epochs", int, "epochs at the constant warm-up rate", default=1, minimum=0)
WARMUP_LR = OptionSpec("warmup_lr", float, "the warm-up's learning rate", default=1e-5, minimum=0,
                       exclusive_minimum=True, maximum=MAX_LR)

OPTIONS: dict[str, OptionSpec] = {spec.name: spec for spec in (
    SHOTS, SEED, EPOCHS, N_CTX, DEPTH, CTX_INIT, LR, BATCH_SIZE, AUGMENT_VIEWS, ALPHA_MAX, BETA_MAX, INIT_ALPHA, INIT_BETA,
    TEXT_LOSS_WEIGHT, IMAGE_LOSS_WEIGHT, GPA_MEAN, GPA_STD, LORA_RANK, LORA_ALPHA, LORA_DROPOUT, ITERATIONS,
    DROPOUT, MOMENTUM, WEIGHT_DECAY, WARMUP_EPOCHS, WARMUP_LR)}


class JsonOptions:
    """Mixin for dataclasses: `to_dict()` (tuples as lists) and a `from_dict()` that names unknown keys."""

    options_kind: ClassVar[str] = "options"

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"Unknown {cls.options_kind}: {', '.join(sorted(unknown))}.", field=sorted(unknown)[0])
        return cls(**data)
