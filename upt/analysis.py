"""The data diagnostics of the paper's appendix A: intra-class visual and inter-class text variance.

Both are computed on L2-normalised features, the space in which the cosine classifier works, so the
numbers of different data sets and backbones are comparable (each lies between 0 and 2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .backbone import Backbone
from .data import LabelledImage, eval_transform, labelled_batches
from .datasets import load_data
from .encoders import encode_image
from .methods.config import DEFAULT_TEMPLATE
from .methods.model import template_classifier


@dataclass(frozen=True)
class VarianceReport:
    intra_class_visual: float
    inter_class_text: float
    per_class_visual: dict[str, float]
    classes: int
    images: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"interpretation": self.interpretation()}

    def interpretation(self) -> str:
        """What the paper's analysis (section 2.2) says each number means for the choice of method.

        The paper relates each variance, across data sets, to the gain of one kind of prompt; it does
        not compare the two with each other, so neither does this sentence.
        """
        return (f"Intra-class visual variance {self.intra_class_visual:.3f}: the higher it is, the less text-only "
                f"tuning (CoOp) gains and the more visual prompts (VPT-deep, UPT) help. Inter-class text variance "
                f"{self.inter_class_text:.3f}: the lower it is, the less visual-only tuning (VPT) gains and the more "
                f"text prompts (CoOp, UPT) help. Both are comparable across tasks on the same backbone; UPT tunes "
                f"both sides.")


def intra_class_variance(features: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Per class: mean squared distance of its features from the class mean (eq. 6)."""
    per_class = torch.zeros(classes)
    for label in range(classes):
        members = features[labels == label]
        per_class[label] = ((members - members.mean(dim=0)) ** 2).sum(dim=-1).mean()
    return per_class


def inter_class_variance(class_features: torch.Tensor) -> float:
    """Mean squared distance of the class text features from their mean (eq. 8)."""
    return float(((class_features - class_features.mean(dim=0)) ** 2).sum(dim=-1).mean())


def analyze(backbone: Backbone, data_dir: str | Path, templates: tuple[str, ...] = (DEFAULT_TEMPLATE,),
            batch_size: int = 64) -> VarianceReport:
    """Both variances over every image of an image folder."""
    source = load_data(data_dir)
    return analyze_samples(backbone, source.class_names, source.train or source.test, templates, batch_size)


@torch.no_grad()
def analyze_samples(backbone: Backbone, class_names: list[str], samples: list[LabelledImage],
                    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,), batch_size: int = 64) -> VarianceReport:
    """Both variances over labelled images (training reports them for its few-shot split)."""
    features, labels = [], []
    for batch, batch_labels in labelled_batches(samples, eval_transform(backbone.image), batch_size, backbone.device):
        features.append(encode_image(backbone.clip, batch, normalize=True).float().cpu())
        labels.append(batch_labels)
    per_class = intra_class_variance(torch.cat(features), torch.cat(labels), len(class_names))
    text = template_classifier(backbone, class_names, templates).float().cpu()
    return VarianceReport(
        intra_class_visual=float(per_class.mean()),
        inter_class_text=inter_class_variance(text),
        per_class_visual={name: float(v) for name, v in zip(class_names, per_class)},
        classes=len(class_names),
        images=len(samples),
    )
