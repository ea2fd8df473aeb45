"""PromptSRC (Khattak et al., "Self-regulating Prompts: Foundational Model Adaptation without Forgetting",
ICCV 2023): independent deep prompts in both towers, trained with self-regularising terms that keep
them close to frozen CLIP, and averaged over the epochs with Gaussian weights.

Prompts (the released IVLP design): m = 4 text tokens initialised from "a photo of a" and n = 4 visual
tokens at the input, and a fresh N(0, 0.02²) set of each before every further layer up to depth 9.

The loss of a step, for logits z = s · f̃ w̃ᵀ of the prompted normalised image features f̃ (B, d) and
class text features w̃ (k, d):

    L = CE(z, y) + λ_text · mean|w̃ − w̃₀| + λ_image · mean|f̃ − f̃₀| + Σ p₀ (log p₀ − log p) / (B · k)

w̃₀ is frozen CLIP's class text feature: the normalised mean of its unnormalised features over the
60 templates of `TEMPLATES` (the released code's ensemble; not CLIP's mean of normalised features),
computed once per run. f̃₀ is frozen CLIP's normalised image feature, z₀ = s · f̃₀ w̃₀ᵀ the zero-shot
logits, p = softmax(z), p₀ = softmax(z₀) at temperature 1: the KL term is KL(p₀ ‖ p) summed over the
batch and divided by B · k, as the released code divides by the logits' element count (not by B).

Gaussian prompt aggregation (GPA): after epoch e (1-based) of N the prompts are added to a running
sum with weight g_e ∝ exp(−(e − μ)² / 2σ²), the weights normalised over e = 1..N; the sum, not the
last epoch's prompts, is the trained model (hence its classifier W and served visual prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..encoders import encode_image
from ..options import JsonOptions

if TYPE_CHECKING:
    from .model import PromptedCLIP

# Its few-shot config (vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml): SGD, one warm-up epoch at 1e-5, cosine.
EPOCHS = 50
BATCH_SIZE = 4
LR = 0.0025
DEPTH = 9  # both towers
CONTEXT_INIT = "a photo of a"
TEXT_LOSS_WEIGHT = 25.0
IMAGE_LOSS_WEIGHT = 10.0
GPA_MEAN, GPA_STD = 30.0, 30.0  # its config's for ImageNet, Caltech101, OxfordPets, Food101, UCF101, SUN397
SHARP_GPA_MEAN, SHARP_GPA_STD = 45.0, 5.0  # ... and for these CoOp data sets:
SHARP_GPA_DATASETS = frozenset({"stanford_cars", "oxford_flowers", "fgvc_aircraft", "dtd", "eurosat"})

# The released code's template ensemble for frozen CLIP's text features (its IMAGENET_TEMPLATES: 60 of
# the 80 of CLIP's ImageNet notebook, in its order).
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.",
    "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.",
)


@dataclass(frozen=True)
class Regulation(JsonOptions):
    """The self-regulation of one run: the two L1 weights and GPA's Gaussian (epochs, 1-based)."""

    text_loss_weight: float = TEXT_LOSS_WEIGHT
    image_loss_weight: float = IMAGE_LOSS_WEIGHT
    gpa_mean: float = GPA_MEAN
    gpa_std: float = GPA_STD

    options_kind = "PromptSRC options"

    @classmethod
    def of(cls, config: Any, dataset: str) -> "Regulation":
        """A run's (an upt.training.TrainConfig): each option it leaves None takes the config's
        default, GPA's for `dataset` (a CoOp data set's name, or "folder")."""
        sharp = dataset in SHARP_GPA_DATASETS
        chosen = {"gpa_mean": SHARP_GPA_MEAN if sharp else GPA_MEAN, "gpa_std": SHARP_GPA_STD if sharp else GPA_STD,
                  "text_loss_weight": TEXT_LOSS_WEIGHT, "image_loss_weight": IMAGE_LOSS_WEIGHT}
        given = {name: getattr(config, name) for name in chosen if getattr(config, name) is not None}
        return cls(**(chosen | given))


def gpa_weights(epochs: int, mean: float, std: float) -> torch.Tensor:
    """g_e ∝ exp(−(e − mean)² / 2 std²) for e = 1..epochs, summing to 1 (float64).

    A softmax of the log-density: the normalised density's weights, without the 0/0 that the density
    itself underflows to when every epoch lies many σ from the mean (a short run with μ 45, σ 5)."""
    epoch = torch.arange(1, epochs + 1, dtype=torch.float64)
    return (-0.5 * ((epoch - mean) / std) ** 2).softmax(dim=0)


def frozen_text_features(model: "PromptedCLIP") -> torch.Tensor:
    """w̃₀ (k, d): frozen CLIP's class features, the normalised mean of the unnormalised features of TEMPLATES."""
    from .model import template_classifier  # model.py imports the registry, which imports this module

    return template_classifier(model.backbone, model.class_names, TEMPLATES, normalize_each=False)


def self_regulating_terms(logits: torch.Tensor, zero_shot_logits: torch.Tensor, text: torch.Tensor,
                          frozen_text: torch.Tensor, image: torch.Tensor, frozen_image: torch.Tensor,
                          labels: torch.Tensor, regulation: Regulation) -> dict[str, torch.Tensor]:
    """The four terms of the loss (the module's docstring), each already weighted; their sum is the loss."""
    log_p, log_p0 = logits.log_softmax(dim=-1), zero_shot_logits.log_softmax(dim=-1)
    return {
        "cross_entropy": F.cross_entropy(logits, labels),
        "text_l1": regulation.text_loss_weight * (text - frozen_text).abs().mean(),
        "image_l1": regulation.image_loss_weight * (image - frozen_image).abs().mean(),
        "logits_kl": (log_p0.exp() * (log_p0 - log_p)).sum() / logits.numel(),
    }


class SelfRegulation:
    """PromptSRC's objective for `upt.training._Loop` (the methods of `upt.training.CrossEntropy`): the
    regularised loss of a step, GPA's running sum after each epoch, the sum as the final prompts, and
    that sum in the epoch checkpoint, so that a resumed run ends with the same artifact."""

    def __init__(self, model: "PromptedCLIP", regulation: Regulation, epochs: int):
        self.regulation = regulation
        self.frozen_text = frozen_text_features(model)
        self.weights = gpa_weights(epochs, regulation.gpa_mean, regulation.gpa_std)
        self.aggregate: dict[str, torch.Tensor] = {}

    def terms(self, model: "PromptedCLIP", images: torch.Tensor,
              labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The loss terms of a step and its prompted logits (the prompts generated once for both towers)."""
        prompts = model.generate()
        text = _wide(model.classifier(prompts))
        image = _wide(model.image_features(images, prompts))
        scale = model.backbone.logit_scale
        logits = scale * image @ text.T
        with torch.no_grad():
            frozen_image = _wide(encode_image(model.clip, images, None, normalize=True))
            frozen_text = self.frozen_text.to(frozen_image.dtype)
            zero_shot_logits = scale * frozen_image @ frozen_text.T
        return self_regulating_terms(_wide(logits), _wide(zero_shot_logits), text, frozen_text, image, frozen_image,
                                     labels, self.regulation), logits

    def loss(self, model: "PromptedCLIP", images: torch.Tensor,
             labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        terms, logits = self.terms(model, images, labels)
        return sum(terms.values()), logits

    @torch.no_grad()
    def epoch_done(self, epoch: int, model: "PromptedCLIP") -> None:
        """Add the prompts after `epoch` (0-based) to GPA's sum with that epoch's weight."""
        weight = float(self.weights[epoch])
        for name, value in model.state_dict().items():
            weighted = value.detach() * weight
            self.aggregate[name] = weighted if name not in self.aggregate else self.aggregate[name] + weighted

    @torch.no_grad()
    def finish(self, model: "PromptedCLIP") -> None:
        """The trained prompts are GPA's sum (none after zero epochs: the initial prompts stay)."""
        if self.aggregate:
            model.load_state_dict(self.aggregate)

    def state_dict(self) -> dict[str, Any]:
        return {"aggregate": dict(self.aggregate)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.aggregate = dict(state["aggregate"])

    def describe(self) -> dict[str, Any]:
        """What the artifact's options record: the regulation that was applied, defaults resolved."""
        return {"regulation": self.regulation.to_dict()}


def _wide(features: torch.Tensor) -> torch.Tensor:
    """float32 at least: under autocast (a GPU's float16) features and products come in half precision,
    and the terms are computed in float32 from them."""
    return features if features.dtype == torch.float64 else features.float()


def self_regulation(model: "PromptedCLIP", config: Any, dataset: str) -> SelfRegulation:
    """The spec's objective builder: `config` an upt.training.TrainConfig, `dataset` its data set's name."""
    return SelfRegulation(model, Regulation.of(config, dataset), config.total_epochs)
