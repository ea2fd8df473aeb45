"""The prompt-tuning methods: configuration, learnable prompt generators and the prompted model."""

from .config import (
    CACHE_METHODS,
    DESCRIPTIONS,
    ENSEMBLE_TEMPLATES,
    METHODS,
    PROMPT_METHODS,
    ZERO_SHOT,
    PromptConfig,
)
from .model import PromptedCLIP, build_prompt_generator, template_classifier
from .prompts import Prompts, UnifiedTransformerLayer

__all__ = [
    "CACHE_METHODS",
    "PROMPT_METHODS",
    "DESCRIPTIONS",
    "ENSEMBLE_TEMPLATES",
    "METHODS",
    "ZERO_SHOT",
    "PromptConfig",
    "PromptedCLIP",
    "Prompts",
    "UnifiedTransformerLayer",
    "build_prompt_generator",
    "template_classifier",
]
