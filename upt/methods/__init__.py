"""The prompt-tuning methods: their registry, configuration, learnable prompt generators and the prompted model."""

from .config import (
    CACHE_METHODS,
    ENSEMBLE_TEMPLATES,
    METHODS,
    PROMPT_METHODS,
    ZERO_SHOT,
    PromptConfig,
)
from .model import PromptedCLIP, build_prompt_generator, template_classifier
from .prompts import Prompts, UnifiedTransformerLayer
from .registry import REGISTRY, SPECS, DepthRule, MethodSpec, method_spec

__all__ = [
    "CACHE_METHODS",
    "PROMPT_METHODS",
    "ENSEMBLE_TEMPLATES",
    "METHODS",
    "REGISTRY",
    "SPECS",
    "ZERO_SHOT",
    "DepthRule",
    "MethodSpec",
    "PromptConfig",
    "PromptedCLIP",
    "Prompts",
    "UnifiedTransformerLayer",
    "build_prompt_generator",
    "method_spec",
    "template_classifier",
]
