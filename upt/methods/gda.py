"""GDA (Wang et al., "A Hard-to-Beat Baseline for Training-free CLIP-based Adaptation", ICLR 2024):
Gaussian discriminant analysis on the frozen image features, added to the zero-shot logits.

Each class is a Gaussian over L2-normalised image features with its own mean μ_c and one covariance Σ
shared by all classes. The features are those of the shots' augmented views, each view normalised on
its own (as the released code; Tip-Adapter's keys average the views first). With uniform priors the
Bayes classifier is linear:

    w_c = Σ⁻¹ μ_c,    b_c = log(1/C) − ½ μ_cᵀ Σ⁻¹ μ_c,
    logits = s · f Wᵀ_clip + α · (f Wᵀ + b)

The precision Σ⁻¹ is the KS estimator of the paper: D · ((N − 1) Σ̂ + tr(Σ̂) I)⁺, with Σ̂ the sample
covariance of the class-centred features (N of them, width D) and ⁺ the pseudo-inverse (the released
code's). It shrinks towards the identity, so it exists however few the shots.

α weighs the GDA term against zero-shot. The released code picks it on the validation images (the
test images on ImageNet) from {10⁻⁴, …, 10²}; here it is cross-fitted on the shots (upt.methods.crossfit),
so the validation images never choose it. With one shot per class nothing can be held out: α keeps
`init_alpha`, and Σ̂ measures only the augmentations' spread (with one view too, Σ̂ = 0, W = 0 and GDA
is zero-shot exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..options import JsonOptions
from .crossfit import CrossFit, fold_count, held_out_queries, stratified_folds, first_best

NAME = "gda"
ALPHAS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # the released code's grid


@dataclass(frozen=True)
class GdaOptions(JsonOptions):
    """GDA's settings; defaults are the released code's."""

    alphas: tuple[float, ...] = ALPHAS
    init_alpha: float = 0.1  # the released code's starting value: kept when α cannot be cross-fitted

    options_kind = "GDA options"

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", tuple(float(alpha) for alpha in self.alphas))
        if not self.alphas or not all(alpha >= 0 and math.isfinite(alpha) for alpha in self.alphas):
            raise ConfigError("GDA's α grid needs at least one finite value ≥ 0.", field="alphas")
        if not (self.init_alpha >= 0 and math.isfinite(self.init_alpha)):
            raise ConfigError(f"init_alpha must be a finite number ≥ 0, not {self.init_alpha}.", field="init_alpha")


@dataclass
class GdaHead:
    """The linear head (W, b) and its weight α: what serving adds to the zero-shot logits."""

    weights: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    alpha: float

    def to(self, device: torch.device) -> "GdaHead":
        return GdaHead(self.weights.to(device), self.bias.to(device), self.alpha)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.alpha * (features @ self.weights.T + self.bias)

    def for_classes(self, rows: torch.Tensor) -> "GdaHead":
        """The head over a subset of classes. b's log-prior is that of all C classes: a constant shift,
        so the ranking is unchanged."""
        return GdaHead(self.weights[rows], self.bias[rows], self.alpha)

    @property
    def nbytes(self) -> int:
        return self.weights.nbytes + self.bias.nbytes

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"gda_weights": self.weights.float(), "gda_bias": self.bias.float(),
                "gda_alpha": torch.tensor(float(self.alpha), dtype=torch.float64)}  # exact, as in the config

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "GdaHead | None":
        if "gda_weights" not in tensors:
            return None
        return cls(tensors["gda_weights"], tensors["gda_bias"], float(tensors["gda_alpha"]))


def ks_precision(centred: torch.Tensor) -> torch.Tensor:
    """The KS estimator of the shared precision from class-centred features (N, D)."""
    n, width = centred.shape
    covariance = centred.T.cov() if n > 1 else torch.zeros(width, width, dtype=centred.dtype, device=centred.device)
    shrunk = (n - 1) * covariance + covariance.trace() * torch.eye(width, dtype=centred.dtype, device=centred.device)
    if covariance.trace() <= 0:  # no spread at all (one view of one shot per class): the pseudo-inverse of 0
        return torch.zeros_like(shrunk)
    # Σ̂ is positive semi-definite and tr(Σ̂) I positive definite: the inverse exists, and Cholesky's is
    # the pseudo-inverse at a fraction of an SVD's cost.
    return width * torch.cholesky_inverse(torch.linalg.cholesky(shrunk))


def fit_linear(view_features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W (C, D) and b (C,) from raw features of augmented views (views, n, D) and the n shots' labels."""
    views = F.normalize(view_features.double(), dim=-1)
    features = views.reshape(-1, views.shape[-1])
    repeated = labels.repeat(views.shape[0])
    means = torch.stack([features[repeated == c].mean(dim=0) for c in range(n_classes)])
    precision = ks_precision(features - means[repeated])
    weights = means @ precision  # precision is symmetric: row c is Σ⁻¹ μ_c
    bias = math.log(1.0 / n_classes) - 0.5 * (weights * means).sum(dim=-1)
    return weights.to(view_features.dtype), bias.to(view_features.dtype)


@torch.no_grad()
def cross_fit_alpha(view_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
                    logit_scale: float, options: GdaOptions) -> tuple[float, CrossFit]:
    """α cross-fitted on the shots: fit on the other folds, score each held-out shot at every α."""
    n_classes = classifier.shape[0]
    folds = fold_count(labels, n_classes)
    if not folds:
        return options.init_alpha, CrossFit(None, 0, 0)
    assignment = stratified_folds(labels, folds)
    queries = held_out_queries(view_features)
    alphas = torch.tensor(options.alphas, dtype=queries.dtype, device=queries.device)
    hits = torch.zeros(len(alphas), dtype=torch.long)
    for fold in range(folds):
        fit, held = assignment != fold, assignment == fold
        weights, bias = fit_linear(view_features[:, fit], labels[fit], n_classes)
        zero_shot = logit_scale * queries[held] @ classifier.T
        gda = queries[held] @ weights.T + bias
        logits = zero_shot.unsqueeze(0) + alphas.view(-1, 1, 1) * gda.unsqueeze(0)  # (alphas, held, C)
        hits += (logits.argmax(dim=-1) == labels[held].unsqueeze(0)).sum(dim=-1).cpu()
    chosen = first_best(hits, len(labels))
    return options.alphas[chosen.index], chosen


def fit(view_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, logit_scale: float,
        options: GdaOptions) -> tuple[GdaHead, CrossFit]:
    """GDA on every shot, with α cross-fitted on them."""
    alpha, search = cross_fit_alpha(view_features, labels, classifier, logit_scale, options)
    weights, bias = fit_linear(view_features, labels, classifier.shape[0])
    return GdaHead(weights, bias, alpha), search
