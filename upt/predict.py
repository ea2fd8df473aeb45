"""Serving: a cached classifier W and the visual prompts; one image-encoder pass per batch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import torch
from PIL import Image

from .artifact import Artifact, load_serving_artifact
from .backbone import Backbone
from .data import LabelledImage, eval_transform, labelled_batches
from .encoders import QkvLora, encode_image
from .errors import DataError
from .methods.config import DEFAULT_TEMPLATE
from .methods.cocoop import ConditionalContext, conditional_logits
from .methods.model import context_prompt_tokens, template_classifier
from .methods.gda import GdaHead
from .methods.lora import serving_lora
from .methods.tip_adapter import CacheModel
from .metrics import classification_report


_eval_transform = lru_cache(maxsize=16)(eval_transform)  # stateless: one per image spec, not per predictor


@dataclass(frozen=True)
class Prediction:
    label: str
    probability: float

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "probability": self.probability}


class Predictor:
    """Classifies images into `class_names` with a fixed classifier and optional visual prompts."""

    def __init__(
        self,
        backbone: Backbone,
        class_names: list[str],
        classifier: torch.Tensor,
        visual_prompts: torch.Tensor | None = None,
        cache: CacheModel | None = None,
        conditional: ConditionalContext | None = None,
        gda: GdaHead | None = None,
        lora: QkvLora | None = None,
    ):
        self.backbone = backbone
        self.class_names = list(class_names)
        self.classifier = classifier.to(backbone.device)
        self.visual_prompts = None if visual_prompts is None else visual_prompts.to(backbone.device)
        self.cache = None if cache is None else cache.to(backbone.device)
        self.gda = None if gda is None else gda.to(backbone.device)
        # CLIP-LoRA: the image tower's adapters (its text adapters are folded into the classifier)
        self.lora = None if lora is None else _lora_on(lora, backbone.device)
        # CoCoOp: the context is shifted per image, so the class prompts are encoded per image
        self.conditional = None if conditional is None else conditional.to(backbone.device)
        self.conditional_tokens = None if conditional is None else context_prompt_tokens(
            backbone, self.class_names, conditional.context.shape[1])
        self.transform = _eval_transform(backbone.image)

    @property
    def nbytes(self) -> int:
        """Memory this predictor holds beyond the shared backbone: tensors plus class names."""
        tensors = self.classifier.nbytes + (0 if self.visual_prompts is None else self.visual_prompts.nbytes)
        if self.cache is not None:
            tensors += self.cache.keys.nbytes + self.cache.values.nbytes
        if self.gda is not None:
            tensors += self.gda.nbytes
        if self.lora is not None:
            tensors += self.lora.down.nbytes + self.lora.up.nbytes
        if self.conditional is not None:
            tensors += sum(p.nbytes for p in self.conditional.parameters()) + self.conditional_tokens.nbytes
        return tensors + sum(len(name) + 64 for name in self.class_names) + 1024  # + object overheads

    @classmethod
    def from_artifact(cls, backbone: Backbone, artifact: Artifact | str | Path) -> "Predictor":
        """From an artifact folder (reading only its serving tensors), or an artifact already loaded;
        its backbone must be `backbone`."""
        if not isinstance(artifact, Artifact):
            artifact = load_serving_artifact(artifact)
        artifact.check_backbone(backbone)
        return cls(backbone, artifact.class_names, artifact.classifier, artifact.visual_prompts,
                   CacheModel.from_tensors(artifact.tensors), ConditionalContext.from_tensors(artifact.tensors),
                   GdaHead.from_tensors(artifact.tensors), lora=serving_lora(artifact.tensors))

    @classmethod
    def zero_shot(cls, backbone: Backbone, class_names: list[str],
                  templates: Iterable[str] = (DEFAULT_TEMPLATE,)) -> "Predictor":
        return cls(backbone, class_names, template_classifier(backbone, list(class_names), tuple(templates)))

    def for_classes(self, class_names: list[str]) -> "Predictor":
        """This predictor over `class_names` only, in their order: its classifier rows for them.

        How an ImageNet artifact is evaluated on ImageNet-A and -R (200 of its 1000 classes), as CoOp
        does: the prompts are the same for every class, so the rows equal a classifier built for the 200.
        """
        if list(class_names) == self.class_names:
            return self
        index = {name: row for row, name in enumerate(self.class_names)}
        unknown = [name for name in class_names if name not in index]
        if unknown:
            raise DataError(f"The artifact has no class {', '.join(map(repr, unknown[:5]))}"
                            f"{' …' if len(unknown) > 5 else ''}; it knows {len(self.class_names)} classes.")
        rows = torch.tensor([index[name] for name in class_names], device=self.classifier.device)
        cache = None if self.cache is None else dataclasses.replace(self.cache, values=self.cache.values[:, rows])
        gda = None if self.gda is None else self.gda.for_classes(rows)
        return Predictor(self.backbone, list(class_names), self.classifier[rows], self.visual_prompts, cache,
                         self.conditional, gda, lora=self.lora)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(image.convert("RGB")) for image in images]).to(self.backbone.device)

    @torch.no_grad()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.head(self.image_features(batch))

    @torch.no_grad()
    def image_features(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised features of a preprocessed batch through the PyTorch tower, with this predictor's
        visual prompts or image adapters."""
        return encode_image(self.backbone.clip, batch, self.visual_prompts, normalize=True, lora=self.lora)

    @torch.no_grad()
    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from normalised image features (those of this predictor's visual prompts)."""
        if self.conditional is not None:
            return conditional_logits(self.backbone.clip, self.conditional_tokens, self.conditional, features,
                                      self.backbone.logit_scale)
        features = features.to(self.classifier.dtype)
        logits = self.backbone.logit_scale * features @ self.classifier.T
        if self.cache is not None:  # Tip-Adapter: the cache's votes added to the zero-shot logits
            logits = logits + self.cache.logits(features)
        if self.gda is not None:  # GDA: its linear head added to the zero-shot logits
            logits = logits + self.gda.logits(features)
        return logits

    def predict(self, images: list[Image.Image], top_k: int = 5) -> list[list[Prediction]]:
        if not images:
            return []
        return self.rank(self.logits(self.preprocess(images)), top_k)

    def rank(self, logits: torch.Tensor, top_k: int = 5) -> list[list[Prediction]]:
        """Per row of logits, the top-k labels with their softmax probabilities, most likely first."""
        probabilities = logits.softmax(dim=-1).cpu()
        values, indices = probabilities.topk(min(top_k, len(self.class_names)), dim=-1)
        return [
            [Prediction(self.class_names[i], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist())]
            for row_p, row_i in zip(values, indices)
        ]

    def evaluate(self, samples: list[LabelledImage], batch_size: int = 64, per_sample: bool = False) -> dict[str, Any]:
        """Accuracy, per-class accuracy and confusion matrix over labelled images; with `per_sample`, also
        `correct`: 1 or 0 per image in `samples`' order (auto's paired comparison of candidates)."""
        predicted, truth = [], []
        for batch, labels in labelled_batches(samples, self.transform, batch_size, self.backbone.device):
            predicted.append(self.logits(batch).argmax(dim=-1).cpu())
            truth.append(labels)
        if not predicted:
            return classification_report(torch.empty(0), torch.empty(0), self.class_names, per_sample)
        return classification_report(torch.cat(predicted), torch.cat(truth), self.class_names, per_sample)


def _lora_on(lora: QkvLora, device: torch.device) -> QkvLora:
    return dataclasses.replace(lora, down=lora.down.to(device), up=lora.up.to(device))
