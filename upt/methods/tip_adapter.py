"""Tip-Adapter and Tip-Adapter-F (Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for Few-shot
Classification", ECCV 2022): a cache model built from the few-shot images' features.

Keys K (N·K × d): the L2-normalised image features of the training shots, each averaged over several
randomly augmented views first (as the released code: the raw features are averaged, then normalised).
Values V (N·K × N): their one-hot labels. For a normalised test feature f:

    logits = s · f Wᵀ + α · exp(−β (1 − f Kᵀ)) V

with W the zero-shot classifier and s CLIP's logit scale. The released code writes `100. * f @ W`:
100 is exp(logit_scale) of OpenAI's CLIP (clamped there), so s = backbone.logit_scale is the same
number on those weights and keeps `α = 0` equal to our zero-shot logits on any backbone. The cache term
is not multiplied by s: α alone weighs it, as in the paper and the released code.

α and β are chosen over the released code's grid (β in [0.1, β_max), α in [0.1, α_max), 200 × 20
steps; the first best accuracy wins), with its per-data-set ranges, initial α, β and epochs where a
CoOp data set is named (`RELEASED_CONFIGS`; ImageNet's otherwise). Unlike the released code, which
searches on the validation images and reports accuracy on them (on the test images for ImageNet),
the search never sees the images that score it: Tip-Adapter's α, β are chosen on the shots by
leave-one-out (each shot scored by the cache without its own key), Tip-Adapter-F's by cross-fitting
(keys fine-tuned on the other folds of the shots score each fold; upt.methods.crossfit), and the
method is then refitted on every shot. Tip-Adapter-F makes K trainable and fine-tunes it with AdamW
(lr 0.001, eps 1e-4, cosine per step, 20 epochs, batch 256) at the initial α, β, then searches. Its training images pass through the frozen encoder once per augmented
view, cached here; each epoch takes one random view per image, so the backbone never runs per step.
Unlike the released code, which keeps the epoch with the best *test* accuracy, the last epoch is kept
(the project's protocol reports the last epoch and never looks at test images while training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torchvision import transforms as T

from ..backbone import Backbone, ImageSpec
from ..data import LabelledImage, labelled_batches
from ..encoders import encode_image
from ..errors import ConfigError, TrainingCancelled
from ..options import AUGMENT_VIEWS, JsonOptions
from .config import DEFAULT_TEMPLATE, ENSEMBLE_TEMPLATES
from .crossfit import class_ranks, first_best, fold_count, held_out_queries, stratified_folds
from .registry import TIP_ADAPTER_F_EPOCHS

ENCODE_BATCH = 64
# Raw (unnormalised) image features of a preprocessed batch, without gradients. Where one is given, the
# cache's images go through it instead of the backbone's PyTorch tower: the API passes its compiled
# serving encoder, so that a task's instant stage answers sooner (bench/instant_stage.py).
CacheEncoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CacheOptions(JsonOptions):
    """The cache model's settings; defaults are the paper's (its released configs)."""

    augment_views: int = AUGMENT_VIEWS.default
    crop_scale: float = 0.5  # RandomResizedCrop's lower scale bound for the cache views (released code)
    init_alpha: float = 1.17  # ImageNet's released config, as the grid and epochs below
    init_beta: float = 1.0
    alpha_max: float = 3.0
    alpha_steps: int = 20
    beta_max: float = 7.0
    beta_steps: int = 200
    epochs: int = TIP_ADAPTER_F_EPOCHS  # Tip-Adapter-F only
    lr: float = 0.001
    batch_size: int = 256

    options_kind = "cache options"

    def __post_init__(self) -> None:
        AUGMENT_VIEWS.check(self.augment_views)
        checks = [
            (0.0 < self.crop_scale <= 1.0, f"crop_scale must be in (0, 1], not {self.crop_scale}", "crop_scale"),
            (self.alpha_max > 0.1 and self.alpha_steps >= 1, "the α grid needs alpha_max > 0.1 and alpha_steps >= 1",
             "alpha_max"),
            (self.beta_max > 0.1 and self.beta_steps >= 1, "the β grid needs beta_max > 0.1 and beta_steps >= 1",
             "beta_max"),
            (0 <= self.epochs <= 10_000, f"epochs must be between 0 and 10000, not {self.epochs}", "epochs"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, not {self.lr}", "lr"),
            (1 <= self.batch_size <= 65536, f"batch_size must be between 1 and 65536, not {self.batch_size}",
             "batch_size"),
        ]
        for ok, message, field in checks:
            if not ok:
                raise ConfigError(message + ".", field=field)

    def alphas(self) -> list[float]:
        return _grid(self.alpha_max, self.alpha_steps)

    def betas(self) -> list[float]:
        return _grid(self.beta_max, self.beta_steps)


@dataclass(frozen=True)
class ReleasedConfig:
    """One data set's settings in Tip-Adapter's released configs (`configs/<data set>.yaml`)."""

    beta_max: float  # search_scale[0]
    alpha_max: float  # search_scale[1]
    init_alpha: float
    epochs: int = TIP_ADAPTER_F_EPOCHS  # train_epoch (Tip-Adapter-F)


# By the project's names of CoOp's data sets (upt.datasets.catalogue); init_beta is 1 in every one.
RELEASED_CONFIGS: dict[str, ReleasedConfig] = {
    "imagenet": ReleasedConfig(7, 3, 1.17),
    "caltech101": ReleasedConfig(12, 5, 3),
    "dtd": ReleasedConfig(13, 13, 2),
    "eurosat": ReleasedConfig(12, 10, 2, epochs=100),
    "fgvc_aircraft": ReleasedConfig(30, 30, 5),
    "food101": ReleasedConfig(10, 10, 1.17),
    "oxford_flowers": ReleasedConfig(50, 50, 10),
    "oxford_pets": ReleasedConfig(7, 3, 1.17),
    "stanford_cars": ReleasedConfig(20, 10, 3),
    "sun397": ReleasedConfig(12, 10, 1.17),
    "ucf101": ReleasedConfig(7, 3, 3),
}


def released_config(dataset: str) -> ReleasedConfig:
    """The named data set's released settings; ImageNet's for any other (an image folder)."""
    return RELEASED_CONFIGS.get(dataset, RELEASED_CONFIGS["imagenet"])


def released_templates(dataset: str, templates: tuple[str, ...]) -> tuple[str, ...]:
    """The zero-shot classifier's templates: on ImageNet, Tip-Adapter's (and GDA's) released code uses
    CLIP's 7-template ensemble, so it does here unless other templates than the default were given."""
    return ENSEMBLE_TEMPLATES if dataset == "imagenet" and tuple(templates) == (DEFAULT_TEMPLATE,) else templates


def _grid(maximum: float, steps: int) -> list[float]:
    """The released code's grid: `steps` values from 0.1 towards `maximum` (which is not reached)."""
    return [0.1 + i * (maximum - 0.1) / steps for i in range(steps)]


def cache_logits(features: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """exp(−β (1 − f Kᵀ)) V: each cached image votes for its label, weighted by its affinity to f."""
    affinity = features @ keys.T
    return torch.exp(-beta * (1.0 - affinity)) @ values


@dataclass
class CacheModel:
    """Keys, values, α and β: what serving adds to the zero-shot logits."""

    keys: torch.Tensor  # (N·K, d), L2-normalised (Tip-Adapter-F's fine-tuned keys are used as trained)
    values: torch.Tensor  # (N·K, N), one-hot
    alpha: float
    beta: float

    def to(self, device: torch.device) -> "CacheModel":
        return CacheModel(self.keys.to(device), self.values.to(device), self.alpha, self.beta)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.alpha * cache_logits(features, self.keys, self.values, self.beta)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"cache_keys": self.keys.float(), "cache_values": self.values.float(),
                "cache_alpha": torch.tensor(float(self.alpha), dtype=torch.float64),  # exact, as in the config
                "cache_beta": torch.tensor(float(self.beta), dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "CacheModel | None":
        if "cache_keys" not in tensors:
            return None
        return cls(tensors["cache_keys"], tensors["cache_values"], float(tensors["cache_alpha"]),
                   float(tensors["cache_beta"]))


def cache_transform(spec: ImageSpec, crop_scale: float) -> T.Compose:
    """The released code's augmentation for the cache: random resized crop (scale 0.5-1) and flip."""
    return T.Compose([
        T.RandomResizedCrop(spec.size, scale=(crop_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


@torch.no_grad()
def encode_samples(backbone: Backbone, samples: list[LabelledImage], transform: T.Compose,
                   normalize: bool, encoder: CacheEncoder | None = None) -> torch.Tensor:
    """Image features (len(samples), d) in sample order, through the frozen encoder (or `encoder`)."""
    def features(batch: torch.Tensor) -> torch.Tensor:
        if encoder is None:
            return encode_image(backbone.clip, batch, None, normalize=normalize).float()
        raw = encoder(batch).float().to(backbone.device)
        return F.normalize(raw, dim=-1) if normalize else raw

    chunks = [features(batch) for batch, _ in labelled_batches(samples, transform, ENCODE_BATCH, backbone.device)]
    if not chunks:
        return torch.empty(0, backbone.clip.visual.output_dim, device=backbone.device)
    return torch.cat(chunks)


@torch.no_grad()
def encode_views(backbone: Backbone, samples: list[LabelledImage], options: CacheOptions, seed: int,
                 should_stop: Callable[[], bool] = lambda: False, encoder: CacheEncoder | None = None) -> torch.Tensor:
    """Raw (unnormalised) features of `augment_views` augmented views: (views, len(samples), d).

    Each view's crops and flips are drawn from its own seed, so a rebuilt cache is the same cache."""
    transform = cache_transform(backbone.image, options.crop_scale)
    views = []
    for view in range(options.augment_views):
        if should_stop():
            raise TrainingCancelled(f"Cancelled while encoding view {view + 1} of {options.augment_views}.")
        torch.manual_seed((seed * 1_000_003 + 7919 * (view + 1)) % (2**31))  # torchvision draws from torch's RNG
        views.append(encode_samples(backbone, samples, transform, normalize=False, encoder=encoder))
    return torch.stack(views)


def build_keys(view_features: torch.Tensor) -> torch.Tensor:
    """The cache keys: the views' raw features averaged, then L2-normalised (as the released code): the
    vector each shot is queried by when it is held out of the search."""
    return held_out_queries(view_features)


def one_hot_values(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    return F.one_hot(labels, n_classes).float()


# Held-out queries scored at each grid point, at most: the search's cost is queries × keys × classes per
# β, so a 1000-class task queries 4 shots of each class (as many images as its validation split) and a
# 10-class task every shot.
MAX_SEARCH_QUERIES = 4096
GRID_BLOCK = 1 << 24  # logits scored at once by the grid search (64 MB in float32)


@dataclass(frozen=True)
class SearchResult:
    alpha: float
    beta: float
    held_out_accuracy: float | None  # None: no shot could be held out (one per class); α, β stay initial
    held_out_count: int


def _grid_hits(zero_shot_logits: torch.Tensor, affinity: torch.Tensor, values: torch.Tensor, labels: torch.Tensor,
               options: CacheOptions) -> torch.Tensor:
    """Hits of each (β, α) of the grid, β outer and α inner, flattened in that order."""
    alphas = torch.tensor(options.alphas(), dtype=zero_shot_logits.dtype, device=zero_shot_logits.device)
    # Every α of a β in one product where it fits in GRID_BLOCK numbers; α by α for large tasks.
    block = max(1, GRID_BLOCK // max(1, zero_shot_logits.numel()))
    hits = []
    for beta in options.betas():
        votes = torch.exp(-beta * (1.0 - affinity)) @ values
        for some in alphas.split(block):
            logits = zero_shot_logits.unsqueeze(0) + some.view(-1, 1, 1) * votes.unsqueeze(0)
            hits.append((logits.argmax(dim=-1) == labels.unsqueeze(0)).sum(dim=-1).cpu())
    return torch.cat(hits)


def _chosen(hits: torch.Tensor, count: int, options: CacheOptions) -> SearchResult:
    best = first_best(hits, count)
    alphas = options.alphas()
    return SearchResult(alphas[best.index % len(alphas)], options.betas()[best.index // len(alphas)],
                        best.accuracy, count)


def _unsearched(options: CacheOptions) -> SearchResult:
    return SearchResult(options.init_alpha, options.init_beta, None, 0)


def search_queries(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """The shots held out in turn: the first q of each class in split order (itself random), q as many
    as MAX_SEARCH_QUERIES allows, at least one."""
    per_class = max(1, MAX_SEARCH_QUERIES // max(1, n_classes))
    return (class_ranks(labels) < per_class).nonzero().flatten()


@torch.no_grad()
def leave_one_out_search(labels: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, classifier: torch.Tensor,
                         logit_scale: float, options: CacheOptions) -> SearchResult:
    """Tip-Adapter's α, β on the shots, each scored by the cache without its own key (leave-one-out):
    the validation images never choose them. A shot's query is its own key (`build_keys`: its views'
    mean), so `keys` are the cache's as built, not fine-tuned."""
    if fold_count(labels, classifier.shape[0]) == 0:
        return _unsearched(options)
    rows = search_queries(labels, classifier.shape[0]).to(keys.device)
    queries = keys[rows]  # a shot's query is its own key
    affinity = queries @ keys.T
    affinity[torch.arange(len(rows), device=keys.device), rows] = -math.inf  # its own key: no vote
    hits = _grid_hits(logit_scale * queries @ classifier.T, affinity, values, labels[rows].to(keys.device), options)
    return _chosen(hits, len(rows), options)


def cross_fit_search(view_features: torch.Tensor, labels: torch.Tensor, values: torch.Tensor,
                     classifier: torch.Tensor, logit_scale: float, options: CacheOptions,
                     fit_keys: Callable[[torch.Tensor], torch.Tensor]) -> SearchResult:
    """Tip-Adapter-F's α, β: for each fold of the shots, keys fitted on the others (`fit_keys(mask)`,
    fine-tuned there) score the fold's shots over the grid; the most hits in all folds win."""
    n_classes = classifier.shape[0]
    folds = fold_count(labels, n_classes)
    if folds == 0:
        return _unsearched(options)
    assignment = stratified_folds(labels, folds)
    asked = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
    asked[search_queries(labels, n_classes)] = True
    hits, count = None, 0
    for fold in range(folds):
        fit, held = assignment != fold, (assignment == fold) & asked
        keys = fit_keys(fit)  # fine-tuned: with gradients
        with torch.no_grad():
            queries = held_out_queries(view_features[:, held].to(keys.device))
            fold_hits = _grid_hits(logit_scale * queries @ classifier.T, queries @ keys.T,
                                   values[fit.to(values.device)], labels[held].to(keys.device), options)
        hits = fold_hits if hits is None else hits + fold_hits
        count += int(held.sum())
    return _chosen(hits, count, options)


@dataclass(frozen=True)
class KeyEpoch:
    epoch: int  # 1-based
    epochs: int
    loss: float
    accuracy: float
    lr: float


def fine_tune_keys(keys: torch.Tensor, values: torch.Tensor, view_features: torch.Tensor, labels: torch.Tensor,
                   classifier: torch.Tensor, logit_scale: float, options: CacheOptions, seed: int,
                   on_epoch: Callable[[KeyEpoch], None] = lambda report: None,
                   should_stop: Callable[[], bool] = lambda: False) -> torch.Tensor:
    """Tip-Adapter-F: the keys as the only trainable tensor, trained at the initial α and β.

    `view_features` (views, n, d) are raw features of augmented views; each epoch draws one view per
    image, standing in for the fresh augmentation of an encoder pass per step. Returns the new keys."""
    generator = torch.Generator().manual_seed(seed)
    views = F.normalize(view_features, dim=-1)
    labels = labels.to(keys.device)
    trained = torch.nn.Parameter(keys.detach().clone())
    optimizer = torch.optim.AdamW([trained], lr=options.lr, eps=1e-4)
    n = views.shape[1]
    steps_per_epoch = math.ceil(n / options.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, options.epochs * steps_per_epoch))
    for epoch in range(options.epochs):
        order = torch.randperm(n, generator=generator).to(keys.device)
        chosen = torch.randint(views.shape[0], (n,), generator=generator).to(keys.device)
        loss_sum, correct = 0.0, 0
        for start in range(0, n, options.batch_size):
            if should_stop():
                raise TrainingCancelled(f"Training cancelled during epoch {epoch + 1} of {options.epochs}.")
            index = order[start: start + options.batch_size]
            features, target = views[chosen[index], index], labels[index]
            logits = logit_scale * features @ classifier.T + options.init_alpha * cache_logits(
                features, trained, values, options.init_beta)
            loss = F.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(index)
            correct += int((logits.argmax(dim=-1) == target).sum())
        on_epoch(KeyEpoch(epoch + 1, options.epochs, loss_sum / n, correct / n, scheduler.get_last_lr()[0]))
    return trained.detach()
