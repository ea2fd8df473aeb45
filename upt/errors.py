"""The errors the core raises. Each says what went wrong and what to do about it."""

from __future__ import annotations


class UptError(Exception):
    """Base class: callers (CLI, service) turn these into clear messages, never tracebacks."""


class ConfigError(UptError, ValueError):
    """A method, prompt or training option is invalid. `field` names the option it is about (as the
    CLI's flag without dashes and the API's form field spell it), or None when no one option is."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # pickled across processes (a worker's result) with its field
        return type(self), (str(self), self.field)


class DataError(UptError, ValueError):
    """A data folder or image cannot be used for training or evaluation."""


class WeightsUnavailableError(UptError):
    """Backbone weights could not be found, downloaded or loaded."""


class UnsupportedBackboneError(UptError):
    """The open_clip model is not a ViT-based CLIP that prompts can be inserted into."""


class ArtifactError(UptError):
    """An artifact folder is missing, incomplete or corrupted."""


class BackboneMismatchError(ArtifactError):
    """An artifact was trained on another backbone than the one it is loaded with."""


class TrainingCancelled(UptError):
    """Training stopped because the caller asked it to (between two steps)."""
