"""The training loop of the paper's protocol (CoOp's): SGD, one constant warm-up epoch, cosine decay.

Everything random is seeded per epoch from (seed, epoch), so a run resumed from an epoch checkpoint
draws the same crops, flips, batches and dropout masks as one that never stopped, and ends with the
same artifact: bit for bit on CPU; on CUDA up to the non-determinism of its kernels (attention's
backward pass, cuBLAS), which PyTorch does not make deterministic by default.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .analysis import analyze_samples
from .artifact import save_artifact
from .backbone import Backbone
from .data import FewShotSplit, ImageDataset, train_transform
from .datasets import DataSource, few_shot_split, load_data
from .datasets.source import FOLDER
from .errors import ConfigError, DataError, TrainingCancelled
from .methods import PromptConfig, PromptedCLIP
from .methods import lora
from .methods.cocoop import ConditionalContext
from .methods.model import template_classifier
from .methods.registry import MethodSpec, method_spec
from .methods.gda import NAME as GDA
from .methods.gda import GdaOptions
from .methods.gda import fit as fit_gda
from .methods.tip_adapter import (
    CacheEncoder,
    CacheModel,
    CacheOptions,
    KeyEpoch,
    SearchResult,
    build_keys,
    cross_fit_search,
    encode_views,
    fine_tune_keys,
    leave_one_out_search,
    one_hot_values,
    released_config,
    released_templates,
)
from .options import (
    AUGMENT_VIEWS,
    BATCH_SIZE,
    EPOCHS,
    GPA_MEAN,
    GPA_STD,
    IMAGE_LOSS_WEIGHT,
    ITERATIONS,
    LORA_ALPHA,
    LORA_DROPOUT,
    LORA_RANK,
    LR,
    MOMENTUM,
    SEED,
    SHOTS,
    TEXT_LOSS_WEIGHT,
    WARMUP_EPOCHS,
    WARMUP_LR,
    WEIGHT_DECAY,
    OPTIONS,
    JsonOptions,
)
from .predict import Predictor

CHECKPOINT_FILE = "last.pt"
SGD_OPTIONS = ("lr", "momentum", "weight_decay", "batch_size", "warmup_epochs", "warmup_lr")


def epochs_for_shots(shots: int | None) -> int:
    """The paper's schedule: 1 shot → 50 epochs, 2 and 4 → 100, 8 and more → 200."""
    if shots is not None and shots <= 1:
        return 50
    if shots is not None and shots <= 4:
        return 100
    return 200


# The prompt options a training run sets through `TrainConfig.of` and stores flat beside its own.
PROMPT_OPTIONS = ("n_ctx", "depth", "ctx_init", "templates", "dropout")


@dataclass
class TrainConfig(JsonOptions):
    """All options of one training run: the method's prompt options (`prompt`) and the training
    schedule's. Defaults are the paper's. `TrainConfig.of("upt", shots=4, n_ctx=8)` builds one
    from flat options, as the CLI, the API and stored JSON give them."""

    prompt: PromptConfig
    shots: int | None = SHOTS.default
    seed: int = SEED.default
    epochs: int | None = EPOCHS.default
    lr: float | None = LR.default  # None: the method's (PromptSRC's config: 0.0025; the others': the paper's 0.002)
    momentum: float = MOMENTUM.default
    weight_decay: float = WEIGHT_DECAY.default
    batch_size: int | None = BATCH_SIZE.default  # None: the method's (CoCoOp's paper: 1; the others': 32)
    warmup_epochs: int = WARMUP_EPOCHS.default
    warmup_lr: float = WARMUP_LR.default
    class_names: list[str] | None = None
    augment_views: int = AUGMENT_VIEWS.default  # Tip-Adapter's cache: augmented views averaged per image
    # Tip-Adapter's search; None: the data set's released config (upt.methods.tip_adapter.RELEASED_CONFIGS)
    alpha_max: float | None = None
    beta_max: float | None = None
    init_alpha: float | None = None
    init_beta: float | None = None
    # PromptSRC's self-regulation (upt.methods.promptsrc.Regulation); None: its own defaults
    text_loss_weight: float | None = TEXT_LOSS_WEIGHT.default
    image_loss_weight: float | None = IMAGE_LOSS_WEIGHT.default
    gpa_mean: float | None = GPA_MEAN.default
    gpa_std: float | None = GPA_STD.default
    # CLIP-LoRA's adapters and iterations (upt.methods.lora.LoraOptions); None: its own defaults
    lora_rank: int | None = LORA_RANK.default
    lora_alpha: float | None = LORA_ALPHA.default
    lora_dropout: float | None = LORA_DROPOUT.default
    iterations: int | None = ITERATIONS.default

    options_kind = "training options"

    @classmethod
    def of(cls, method: str, **options: Any) -> "TrainConfig":
        """A run of `method` with flat options: the prompt's (n_ctx, depth, ...) and the schedule's.
        An option that `method` does not use (CoCoOp's depth, zero-shot's lr) is refused
        (UnusedOptionError, a ConfigError naming it), not ignored: `upt train` and `POST /tasks`
        build a method's config here, so this is where both refuse it (auto's: upt.auto.base_config,
        by the same rule of the registry)."""
        method_spec(method).refuse_unused(options)
        return cls.holding(method, **options)

    @classmethod
    def holding(cls, method: str, **options: Any) -> "TrainConfig":
        """`of` without refusing the options `method` does not use: for the stored form, which holds
        every option whether used or not, and for auto's shared options (upt.auto.base_config), from
        which each candidate takes its own."""
        own = {f.name for f in fields(cls)} - {"prompt"}
        unknown = set(options) - own - set(PROMPT_OPTIONS)
        if unknown:
            raise ConfigError(f"Unknown {cls.options_kind}: {', '.join(sorted(unknown))}.", field=sorted(unknown)[0])
        prompt = PromptConfig(method, **{name: options[name] for name in PROMPT_OPTIONS if name in options})
        return cls(prompt, **{name: value for name, value in options.items() if name in own})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """The flat form `to_dict` writes (artifacts' `train`, checkpoints, task rows)."""
        options = dict(data)
        if "method" not in options:
            raise ConfigError("Stored training options name no method.", field="method")
        # It holds every option, used or not (and a row written before unused options were refused
        # may hold a value its method ignored): read as stored, never refused.
        return cls.holding(options.pop("method"), **options)

    def to_dict(self) -> dict[str, Any]:
        """Flat, as stored since the first version: the method and prompt options beside the schedule's."""
        prompt = self.prompt.to_dict()
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "prompt"}
        return {"method": prompt["method"], **{name: prompt[name] for name in PROMPT_OPTIONS}, **own}

    @property
    def method(self) -> str:
        return self.prompt.method

    @property
    def spec(self) -> MethodSpec:
        return self.prompt.spec

    @property
    def templates(self) -> tuple[str, ...]:
        return self.prompt.templates

    def cache_options(self, dataset: str = FOLDER) -> CacheOptions:
        """Tip-Adapter's settings: its released config for `dataset` (ImageNet's for any other), with the
        views and, where given, the search's range and start and Tip-Adapter-F's epochs from here."""
        released = released_config(dataset)
        epochs = self.epochs if self.epochs is not None else released.epochs

        def given(value: float | None, default: float) -> float:
            return value if value is not None else default

        return CacheOptions(augment_views=self.augment_views, beta_max=given(self.beta_max, released.beta_max),
                            alpha_max=given(self.alpha_max, released.alpha_max),
                            init_alpha=given(self.init_alpha, released.init_alpha),
                            init_beta=given(self.init_beta, CacheOptions.init_beta),
                            epochs=epochs if self.spec.trains else 0)

    def validate(self) -> "TrainConfig":
        self.prompt.validate()  # a bad method or prompt option
        for f in fields(self):
            if f.name in OPTIONS:
                OPTIONS[f.name].check(getattr(self, f.name))
        if self.class_names is not None and len(set(self.class_names)) != len(self.class_names):
            raise ConfigError("class names must be unique.", field="class_names")
        self.cache_options()  # raises for a bad augment_views
        self._check_sgd_options_unused()
        return self

    def _check_sgd_options_unused(self) -> None:
        """A method with its own recipe (Tip-Adapter-F: AdamW) would ignore the SGD options given for it,
        but those it takes as its own (CLIP-LoRA's lr and batch size)."""
        recipe = self.spec.recipe
        if recipe is None:
            return
        defaults = TrainConfig.of(self.method)
        changed = [name for name in SGD_OPTIONS
                   if not self.spec.takes(name) and getattr(self, name) != getattr(defaults, name)]
        if changed:
            raise ConfigError(f"{', '.join(changed)} apply to the prompt methods' SGD training; {self.method} "
                              f"follows {recipe}.", field=changed[0])

    @property
    def total_epochs(self) -> int:
        spec = self.spec
        if not spec.trains:
            return 0
        if spec.learns_adapters:  # CLIP-LoRA counts iterations; its epochs are passes over the shots
            return lora.planned_epochs(self)
        if self.epochs is not None:
            return self.epochs
        return spec.epochs if spec.epochs is not None else epochs_for_shots(self.shots)

    @property
    def step_batch_size(self) -> int:
        """Images per SGD step: batch_size, or the method's own default."""
        return self.batch_size if self.batch_size is not None else self.spec.batch_size

    @property
    def step_lr(self) -> float:
        """The SGD learning rate after the warm-up: lr, or the method's own default."""
        return self.lr if self.lr is not None else self.spec.lr

    def lr_at(self, epoch: int) -> float:
        """Constant warm-up, then cosine over all epochs, stepped per epoch.

        As Dassl (CoOp's code) with its default WARMUP_RECOUNT: the cosine starts counting when the
        warm-up ends, so the first epoch after it runs at the full rate.
        """
        if epoch < self.warmup_epochs:
            return self.warmup_lr
        return 0.5 * self.step_lr * (1 + math.cos(math.pi * (epoch - self.warmup_epochs) / self.total_epochs))


@dataclass
class StepReport:
    epoch: int
    epochs: int
    step: int
    steps_per_epoch: int
    loss: float
    accuracy: float
    progress: float
    eta_s: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpochReport:
    epoch: int  # 1-based: the number of epochs completed
    epochs: int
    loss: float
    accuracy: float
    lr: float
    elapsed_s: float
    eta_s: float | None
    progress: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainCallbacks:
    """Hooks into training; subclass and override what you need (all default to doing nothing)."""

    def on_step(self, report: StepReport) -> None:
        pass

    def on_epoch_end(self, report: EpochReport) -> None:
        pass

    def should_stop(self) -> bool:
        """Checked before every step: return True to cancel (TrainingCancelled is raised)."""
        return False


@dataclass
class TrainResult:
    artifact_dir: Path
    metrics: dict[str, Any]
    config: TrainConfig
    history: list[dict[str, Any]] = field(default_factory=list)


def train(
    backbone: Backbone,
    data: str | Path | DataSource,
    config: TrainConfig,
    out_dir: str | Path,
    callbacks: TrainCallbacks | None = None,
    checkpoint_dir: str | Path | None = None,
    class_folders: list[str] | None = None,
    cache_encoder: CacheEncoder | None = None,
) -> TrainResult:
    """Train `config.method` on the few-shot split of `data` (a folder, see `load_data`, or a data
    source already read) and write the artifact to `out_dir`. `class_folders` names the folder of each
    of `config.class_names` where it is not the name itself. `cache_encoder`, for the cache methods
    only, encodes the cache's views and the validation images of the α/β search instead of the
    backbone's PyTorch tower (see `CacheEncoder`); methods with gradients always run the backbone."""
    config.validate()
    callbacks = callbacks or TrainCallbacks()
    source = data if isinstance(data, DataSource) else load_data(data, class_names=config.class_names,
                                                                 class_folders=class_folders)
    if not source.train:
        raise DataError(f"{source.name} has no training split: it is an evaluation set.")
    split = few_shot_split(source, config.shots, config.seed)
    if config.spec.uses_cache:
        return _train_cache_model(backbone, source, split, config, out_dir, callbacks, cache_encoder)
    if cache_encoder is not None:
        raise ConfigError(f"{config.method} trains through the backbone: it takes no cache encoder.")
    if config.spec.learns_adapters:  # CLIP-LoRA: its own loop and artifact
        from .lora_training import train_lora  # imports this module

        return train_lora(backbone, source, split, config, out_dir, callbacks, checkpoint_dir)
    _seed_everything(config.seed, -1)  # prompt initialisation
    model = PromptedCLIP(backbone, source.class_names, config.prompt)
    objective = config.spec.objective(model, config, source.name) if config.spec.objective else CrossEntropy()
    history = _Loop(model, split, config, callbacks, checkpoint_dir, objective).run()
    exported = model.export()
    predictor = Predictor(backbone, source.class_names, exported["classifier"], exported.get("visual_prompts"),
                          conditional=ConditionalContext.from_tensors(exported))
    metrics = _final_metrics(predictor, split, model.trainable_parameters(), history)
    metrics["variances"] = analyze_samples(backbone, source.class_names, split.train + split.val,
                                           config.templates).as_dict()
    tensors = {f"prompt.{name}": value for name, value in model.state_dict().items()} | exported
    options = {"prompt": config.prompt.to_dict(), "train": config.to_dict(), "metrics": metrics,
               "data": source.describe()} | objective.describe()
    out = save_artifact(out_dir, backbone=backbone, method=config.method, class_names=source.class_names,
                        tensors=tensors, options=options)
    return TrainResult(out, metrics, config, history)


def _train_cache_model(backbone: Backbone, source: DataSource, split: FewShotSplit, config: TrainConfig,
                       out_dir: str | Path, callbacks: TrainCallbacks,
                       cache_encoder: CacheEncoder | None = None) -> TrainResult:
    """The methods fitted on cached features of the shots' augmented views: Tip-Adapter (training-free),
    Tip-Adapter-F (keys fine-tuned; upt/methods/tip_adapter.py) and GDA (closed form; upt/methods/gda.py).
    Their hyper-parameters are chosen on the shots (upt.methods.crossfit), so the validation images
    score them as untouched as they score the prompt methods.

    No epoch checkpoints: the encoder passes dominate and Tip-Adapter-F's epochs over cached features
    take seconds, so a run that stopped simply starts again."""
    if not split.train:
        raise DataError("No training images after the few-shot split.")
    class_names = source.class_names
    options = config.cache_options(source.name)
    started = time.monotonic()
    classifier = template_classifier(backbone, class_names, released_templates(source.name, config.templates))
    labels = torch.tensor([sample.label for sample in split.train], dtype=torch.long)
    views = encode_views(backbone, split.train, options, config.seed, callbacks.should_stop, cache_encoder)
    history: list[dict[str, Any]] = []
    fit = _fit_gda if config.method == GDA else _fit_cache
    fitted = fit(backbone, views, labels, classifier, options, config, callbacks, history, started)
    predictor = Predictor(backbone, class_names, classifier, **fitted.head)
    metrics = _final_metrics(predictor, split, fitted.trainable, history)
    metrics["cache"] = fitted.summary
    metrics["variances"] = analyze_samples(backbone, class_names, split.train + split.val,
                                           config.templates).as_dict()
    tensors = {"classifier": classifier} | next(iter(fitted.head.values())).tensors()
    artifact_options = {"prompt": config.prompt.to_dict(), "train": config.to_dict(), **fitted.options,
                        "metrics": metrics, "data": source.describe()}
    out = save_artifact(out_dir, backbone=backbone, method=config.method, class_names=class_names,
                        tensors=tensors, options=artifact_options)
    return TrainResult(out, metrics, config, history)


@dataclass
class _Fitted:
    """A training-free head fitted on the shots' views: the `Predictor` argument that adds it, its summary
    (`metrics["cache"]`), its own settings in the artifact, and its trained parameters."""

    head: dict[str, Any]  # {"cache": CacheModel} or {"gda": GdaHead}
    summary: dict[str, Any]
    options: dict[str, Any]
    trainable: int = 0


def _fit_gda(backbone: Backbone, views: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
             options: CacheOptions, config: TrainConfig, callbacks: TrainCallbacks, history: list[dict[str, Any]],
             started: float) -> _Fitted:
    """GDA's head, α cross-fitted on the shots (it trains nothing: no progress to report)."""
    gda = GdaOptions()
    head, search = fit_gda(views, labels.to(views.device), classifier, backbone.logit_scale, gda)
    summary = {"alpha": head.alpha, "augment_views": options.augment_views, "searched_on": search.count,
               "held_out_accuracy": search.accuracy}
    return _Fitted({"gda": head}, summary, {"gda": gda.to_dict() | {"alpha": head.alpha}})


def _fit_cache(backbone: Backbone, views: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
               options: CacheOptions, config: TrainConfig, callbacks: TrainCallbacks, history: list[dict[str, Any]],
               started: float) -> _Fitted:
    """Tip-Adapter's cache with α, β searched on the shots; for Tip-Adapter-F its keys fine-tuned (once
    per fold of the search, silently, then on every shot with progress reports)."""
    device = backbone.device
    labels = labels.to(device)
    keys, values = build_keys(views), one_hot_values(labels, len(classifier)).to(device)
    scale = backbone.logit_scale
    if not config.spec.trains:
        search = leave_one_out_search(labels, keys, values, classifier, scale, options)
        return _cache_fitted(CacheModel(keys, values, search.alpha, search.beta), search, options, 0)

    def tuned(mask: torch.Tensor, on_epoch: Callable[[KeyEpoch], None] = lambda report: None) -> torch.Tensor:
        return fine_tune_keys(keys[mask], values[mask], views[:, mask], labels[mask], classifier, scale, options,
                              config.seed, on_epoch, callbacks.should_stop)

    search = cross_fit_search(views, labels, values, classifier, scale, options, tuned)

    def on_epoch(report: KeyEpoch) -> None:
        done = report.epoch / report.epochs
        elapsed = time.monotonic() - started
        epoch = EpochReport(report.epoch, report.epochs, report.loss, report.accuracy, report.lr, elapsed,
                            elapsed / done * (1 - done), done)
        history.append(epoch.as_dict())
        callbacks.on_epoch_end(epoch)

    keys = tuned(torch.ones(len(labels), dtype=torch.bool, device=device), on_epoch)
    return _cache_fitted(CacheModel(keys, values, search.alpha, search.beta), search, options, keys.numel())


def _cache_fitted(cache: CacheModel, search: SearchResult, options: CacheOptions, trainable: int) -> _Fitted:
    summary = {"alpha": cache.alpha, "beta": cache.beta, "keys": len(cache.keys),
               "augment_views": options.augment_views, "searched_on": search.held_out_count,
               "held_out_accuracy": search.held_out_accuracy}
    return _Fitted({"cache": cache}, summary, {"cache": options.to_dict() | {"alpha": cache.alpha, "beta": cache.beta}},
                   trainable)


def _final_metrics(predictor: Predictor, split: FewShotSplit, trainable_parameters: int,
                   history: list) -> dict[str, Any]:
    report = predictor.evaluate(split.val, per_sample=True)
    return {
        "val_accuracy": report["accuracy"],
        "val_count": report["count"],
        "val_correct": report["correct"],  # per validation image, in split order: auto's paired comparison
        "per_class_accuracy": report["per_class_accuracy"],
        "confusion_matrix": report["confusion_matrix"],
        "class_names": report["class_names"],
        "train_count": len(split.train),
        "trainable_parameters": trainable_parameters,
        "epochs": len(history),
        "final_loss": history[-1]["loss"] if history else None,
        "final_train_accuracy": history[-1]["accuracy"] if history else None,
    }


def _seed_everything(seed: int, epoch: int) -> torch.Generator:
    derived = (seed * 1_000_003 + epoch + 1) % (2**31)
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
    return torch.Generator().manual_seed(derived)


class CrossEntropy:
    """The objective of a step: the paper's cross-entropy of the logits. A method with its own (its
    spec's `objective`: PromptSRC's self-regulation) provides the same methods: the loss of a step with
    its logits; what it keeps after each epoch and how it leaves the model at the end (PromptSRC's
    prompt aggregation); that state for the epoch checkpoint, so that a resumed run ends the same; and
    what the artifact records of it."""

    def loss(self, model: PromptedCLIP, images: torch.Tensor,
             labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(images)
        return F.cross_entropy(logits.float(), labels), logits

    def epoch_done(self, epoch: int, model: PromptedCLIP) -> None:
        pass

    def finish(self, model: PromptedCLIP) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        """Entries for the artifact's options (none for the cross-entropy)."""
        return {}


class _Loop:
    """One training run: optimiser, schedule, epoch checkpoints and progress reports."""

    def __init__(self, model: PromptedCLIP, split: FewShotSplit, config: TrainConfig,
                 callbacks: TrainCallbacks, checkpoint_dir: str | Path | None,
                 objective: CrossEntropy | None = None):
        if not split.train:
            raise DataError("No training images after the few-shot split.")
        self.model = model
        self.split = split
        self.config = config
        self.callbacks = callbacks
        self.checkpoint = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None
        self.objective = objective or CrossEntropy()
        self.device = model.backbone.device
        self.amp = self.device.type == "cuda"  # float16 autocast on GPU, float32 on CPU
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=config.step_lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay) if params else None
        self.dataset = ImageDataset(split.train, train_transform(model.backbone.image))
        batch = min(config.step_batch_size, len(self.dataset))
        self.drop_last = len(self.dataset) >= config.step_batch_size  # as Dassl: keep a lone short batch
        self.steps_per_epoch = len(self.dataset) // batch if self.drop_last else math.ceil(len(self.dataset) / batch)
        self.batch = batch

    def run(self) -> list[dict[str, Any]]:
        epochs = self.config.total_epochs
        start, history = self._resume()
        self.started = time.monotonic()
        self.steps_done_here = 0
        self.total_steps = epochs * self.steps_per_epoch
        self.first_step = start * self.steps_per_epoch
        for epoch in range(start, epochs):
            history.append(self._epoch(epoch, epochs))
            self.objective.epoch_done(epoch, self.model)
            self._save(epoch + 1, history)
            self._report_epoch()
        self.objective.finish(self.model)
        self.model.eval()
        return history

    def _epoch(self, epoch: int, epochs: int) -> dict[str, Any]:
        lr = self.config.lr_at(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        generator = _seed_everything(self.config.seed, epoch)
        loader = DataLoader(self.dataset, batch_size=self.batch, shuffle=True, drop_last=self.drop_last,
                            generator=generator, num_workers=0)
        self.model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for step, (images, labels) in enumerate(loader):
            if self.callbacks.should_stop():
                raise TrainingCancelled(f"Training cancelled during epoch {epoch + 1} of {epochs}.")
            loss, hits = self._step(images.to(self.device), labels.to(self.device))
            loss_sum, correct, seen = loss_sum + loss * len(labels), correct + hits, seen + len(labels)
            self.steps_done_here += 1
            done = self.first_step + self.steps_done_here
            self.callbacks.on_step(StepReport(epoch + 1, epochs, step + 1, self.steps_per_epoch, loss,
                                              hits / len(labels), done / self.total_steps, self._eta(done)))
        done = self.first_step + self.steps_done_here
        report = EpochReport(epoch + 1, epochs, loss_sum / seen, correct / seen, lr,
                             time.monotonic() - self.started, self._eta(done), done / self.total_steps)
        self.finished_epoch = report
        return report.as_dict()

    def _report_epoch(self) -> None:
        """The epoch's report (the service's epoch event), once its checkpoint is written: a run killed
        in between resumes after the epoch it was told of, never re-running an epoch already reported."""
        self.callbacks.on_epoch_end(self.finished_epoch)

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            loss, logits = self.objective.loss(self.model, images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach()), int((logits.argmax(dim=-1) == labels).sum())

    def _eta(self, done: int) -> float | None:
        if not self.steps_done_here:
            return None
        per_step = (time.monotonic() - self.started) / self.steps_done_here
        return per_step * (self.total_steps - done)

    def _save(self, epochs_done: int, history: list[dict[str, Any]]) -> None:
        if self.checkpoint is None:
            return
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "epochs_done": epochs_done,
            "history": history,
            "run": self._run_identity(),
            "prompts": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "objective": self.objective.state_dict(),
        }
        tmp = self.checkpoint.with_suffix(".tmp")
        try:
            torch.save(state, tmp)
        except BaseException:  # a full disk: do not leave a half-written file taking the space a retry needs
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.checkpoint)  # a crash mid-write keeps the previous epoch's checkpoint

    def _resume(self) -> tuple[int, list[dict[str, Any]]]:
        if self.checkpoint is None or not self.checkpoint.is_file() or self.optimizer is None:
            return 0, []
        state = torch.load(self.checkpoint, map_location=self.device, weights_only=False)
        saved, current = state.get("run", {}), self._run_identity()
        different = [key for key in current if saved.get(key) != current[key]]
        if different:
            raise ConfigError(f"{self.checkpoint} belongs to another run (its {', '.join(different)} differ); "
                              f"remove it to start afresh.")
        self.model.load_state_dict(state["prompts"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when saved on CPU, where mixed precision is off
            self.scaler.load_state_dict(state["scaler"])
        self.objective.load_state_dict(state.get("objective", {}))  # none in a checkpoint written before it
        return state["epochs_done"], list(state["history"])

    def _run_identity(self) -> dict[str, Any]:
        """What a checkpoint must share with this run to be resumed: options, weights and data."""
        images = "\n".join(f"{s.label}:{s.path.parent.name}/{s.path.name}" for s in self.split.train)
        return {
            "options": self.config.to_dict(),
            "weights": self.model.backbone.weights_sha256,
            "classes": self.model.class_names,
            "training images": hashlib.sha256(images.encode()).hexdigest(),
        }
