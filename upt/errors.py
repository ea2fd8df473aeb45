"""The errors the core raises. Each says what went wrong and what to do about it."""


class UptError(Exception):
    """Base class: callers (CLI, service) turn these into clear messages, never tracebacks."""


class ConfigError(UptError, ValueError):
    """A method, prompt or training option is invalid."""


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
