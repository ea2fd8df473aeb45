"""JSON round-trips of the option dataclasses stored in artifacts, checkpoints and task rows."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, ClassVar, TypeVar

from .errors import ConfigError

T = TypeVar("T", bound="JsonOptions")


class JsonOptions:
    """Mixin for dataclasses: `to_dict()` (tuples as lists) and a `from_dict()` that names unknown keys."""

    options_kind: ClassVar[str] = "options"

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"Unknown {cls.options_kind}: {', '.join(sorted(unknown))}.")
        return cls(**data)
