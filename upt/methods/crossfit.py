"""Choosing a training-free method's hyper-parameters on the training shots, never on the images that
then score it.

Tip-Adapter's and GDA's released code search their hyper-parameters on the validation images and then
report accuracy on those same images, or (ImageNet) on the test images. Here they are searched on the
shots by cross-fitting: the shots are split into folds, stratified by class; for each fold the method
is fitted on the other folds and scores the held-out fold over the whole grid; the grid point with the
most held-out hits wins, and the method is refitted on every shot with it. The validation images stay
as untouched as they are for the prompt methods, so every candidate's validation accuracy means the
same thing and `auto` compares like with like.

A held-out shot is queried by the L2-normalised mean of its augmented views' raw features: the same
vector a Tip-Adapter key is made of, so no encoder pass is added to the cache's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAX_FOLDS = 4


def fold_count(labels: torch.Tensor, n_classes: int, max_folds: int = MAX_FOLDS) -> int:
    """As many folds as the smallest class allows (each fold leaves at least one shot of every class
    to fit on), at most `max_folds`; 0 when some class has a single shot: nothing can be held out."""
    smallest = int(torch.bincount(labels, minlength=n_classes).min()) if len(labels) else 0
    folds = min(smallest, max_folds)
    return folds if folds >= 2 else 0


def class_ranks(labels: torch.Tensor) -> torch.Tensor:
    """Each shot's place among its class's shots, in split order (itself random): 0, 1, 2, …"""
    ranks = torch.empty_like(labels)
    for label in labels.unique():
        where = (labels == label).nonzero().flatten()
        ranks[where] = torch.arange(len(where), device=labels.device)
    return ranks


def stratified_folds(labels: torch.Tensor, folds: int) -> torch.Tensor:
    """Each shot's fold: the i-th shot of a class goes to fold i mod folds."""
    return class_ranks(labels) % folds


def held_out_queries(view_features: torch.Tensor) -> torch.Tensor:
    """(views, n, d) raw features → (n, d): each shot's views averaged, then normalised (also what a
    Tip-Adapter key is: upt.methods.tip_adapter.build_keys)."""
    return F.normalize(view_features.mean(dim=0), dim=-1)


@dataclass(frozen=True)
class CrossFit:
    """The grid index chosen, with the held-out hits it rests on."""

    index: int | None  # None: no folds (a class with one shot), nothing was searched
    hits: int
    count: int  # held-out queries scored at each grid point: every shot once

    @property
    def accuracy(self) -> float | None:
        return None if self.index is None else self.hits / self.count


def first_best(hits: torch.Tensor, count: int) -> CrossFit:
    """The first grid point with the most held-out hits (the released codes keep the first best)."""
    index = int(torch.argmax(hits))  # argmax returns the first maximum
    return CrossFit(index, int(hits[index]), count)
