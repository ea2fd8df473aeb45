"""CLIP-LoRA's training loop (upt/methods/lora.py has the adapters): AdamW with a cosine schedule
stepped per iteration, 500 × K iterations at batch 32, as the paper's code runs it.

Its epochs are passes over the training images, grouped where there are many (`EpochPlan`; the last
one cut where the iterations end): the progress reports and the checkpoints follow them as
`upt.training`'s loop does, the cancellation check runs before every step. Everything random is
seeded per pass from (seed, pass), so a run resumed from an epoch checkpoint draws the same crops,
batches and dropout masks as one that never stopped.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .analysis import analyze_samples
from .artifact import save_artifact
from .backbone import Backbone
from .data import FewShotSplit
from .datasets import DataSource
from .errors import TrainingCancelled
from .methods.lora import BETAS, MIN_LR, WEIGHT_DECAY, EpochPlan, LoraCLIP, LoraOptions, iterations, serving_lora
from .predict import Predictor
from .training import (
    EpochReport,
    StepReport,
    TrainCallbacks,
    TrainConfig,
    TrainResult,
    _final_metrics,
    _Loop,
    _seed_everything,
)


def lora_iterations(config: TrainConfig, split: FewShotSplit) -> int:
    """`iterations`, or the paper's 500 × K: K the shots, or (all images used) the most any class has."""
    return iterations(config, config.shots or max(Counter(sample.label for sample in split.train).values()))


def train_lora(backbone: Backbone, source: DataSource, split: FewShotSplit, config: TrainConfig,
               out_dir: str | Path, callbacks: TrainCallbacks,
               checkpoint_dir: str | Path | None = None) -> TrainResult:
    """Train clip-lora on `split` and write its artifact: the adapters, W through the adapted text
    tower, and the image adapters that serving runs."""
    _seed_everything(config.seed, -1)  # the adapters' initialisation
    model = LoraCLIP(backbone, source.class_names, LoraOptions.of(config), config.templates)
    loop = LoraLoop(model, split, config, callbacks, checkpoint_dir)
    history = loop.run()
    exported = model.export()
    predictor = Predictor(backbone, source.class_names, exported["classifier"], lora=serving_lora(exported))
    metrics = _final_metrics(predictor, split, model.trainable_parameters(), history)
    metrics["iterations"] = loop.iterations
    metrics["variances"] = analyze_samples(backbone, source.class_names, split.train + split.val,
                                           config.templates).as_dict()
    tensors = {f"prompt.{name}": value for name, value in model.state_dict().items()} | exported
    options = {"prompt": config.prompt.to_dict(), "train": config.to_dict(), "metrics": metrics,
               "lora": {"rank": model.options.rank, "alpha": model.options.alpha, "dropout": model.options.dropout,
                        "scale": model.options.scale, "iterations": loop.iterations, "lr": config.step_lr},
               "data": source.describe()}
    out = save_artifact(out_dir, backbone=backbone, method=config.method, class_names=source.class_names,
                        tensors=tensors, options=options)
    return TrainResult(out, metrics, config, history)


class LoraLoop(_Loop):
    """One run: AdamW, the per-iteration cosine schedule and the grouping of iterations into epochs; the
    steps, the epoch checkpoints (what they hold, how a run resumes from one) and the estimates of
    the remaining time are `upt.training`'s loop's."""

    def __init__(self, model: LoraCLIP, split: FewShotSplit, config: TrainConfig, callbacks: TrainCallbacks,
                 checkpoint_dir: str | Path | None):
        super().__init__(model, split, config, callbacks, checkpoint_dir)
        self.lr = config.step_lr
        # the paper's AdamW in place of the prompt methods' SGD
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
        self.plan = EpochPlan.of(lora_iterations(config, split), len(self.dataset), config.step_batch_size)
        self.iterations, self.steps_per_epoch, self.epochs = self.plan.iterations, self.plan.steps_per_epoch, \
            self.plan.epochs

    def lr_at(self, iteration: int) -> float:
        """Cosine from lr down to 1e-6 over the iterations (PyTorch's CosineAnnealingLR, stepped per iteration)."""
        return MIN_LR + (self.lr - MIN_LR) * (1 + math.cos(math.pi * iteration / self.iterations)) / 2

    def run(self) -> list[dict[str, Any]]:
        start, history = self._resume()
        self.started = time.monotonic()
        self.steps_done_here = 0
        self.total_steps = self.iterations
        self.first_step = min(start * self.steps_per_epoch, self.iterations)
        for epoch in range(start, self.epochs):
            history.append(self._epoch(epoch, self.epochs))
            self._save(epoch + 1, history)
            self._report_epoch()
        self.model.eval()
        return history

    @property
    def done(self) -> int:
        return self.first_step + self.steps_done_here

    def _batches(self, epoch: int):
        """The epoch's batches: its passes over the training images, each shuffled and cropped anew; the
        last short batch kept, as the paper's code does."""
        for index in range(epoch * self.plan.passes_per_epoch, (epoch + 1) * self.plan.passes_per_epoch):
            generator = _seed_everything(self.config.seed, index)
            yield from DataLoader(self.dataset, batch_size=self.batch, shuffle=True, generator=generator,
                                  num_workers=0)

    def _epoch(self, epoch: int, epochs: int) -> dict[str, Any]:
        steps = min(self.steps_per_epoch, self.iterations - epoch * self.steps_per_epoch)
        self.model.train()
        loss_sum, correct, seen, lr = 0.0, 0, 0, self.lr
        for step, (images, labels) in zip(range(steps), self._batches(epoch)):
            if self.callbacks.should_stop():
                raise TrainingCancelled(f"Training cancelled during epoch {epoch + 1} of {epochs}.")
            lr = self.lr_at(self.done)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, hits = self._step(images.to(self.device), labels.to(self.device))
            loss_sum, correct, seen = loss_sum + loss * len(labels), correct + hits, seen + len(labels)
            self.steps_done_here += 1
            self.callbacks.on_step(StepReport(epoch + 1, epochs, step + 1, steps, loss, hits / len(labels),
                                              self.done / self.iterations, self._eta(self.done)))
        report = EpochReport(epoch + 1, epochs, loss_sum / seen, correct / seen, lr,
                             time.monotonic() - self.started, self._eta(self.done), self.done / self.iterations)
        self.finished_epoch = report  # reported once its checkpoint is written (_Loop._report_epoch)
        return report.as_dict()
