"""The training protocol of the paper (CoOp's, run by Dassl), observed from outside the training loop.

One short run is watched through PyTorch itself: every `SGD.step` (the learning rate, momentum and
weight decay the optimiser really used), every cross-entropy (the logits and labels of each step),
every forward of a module holding learned parameters (its images and its train/eval mode) and every
dropout call. The expectations are written independently: Dassl's warm-up + cosine schedule is
re-enacted with torch's own CosineAnnealingLR.
"""

from __future__ import annotations

import math
import random
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from upt.data import eval_transform, sample_few_shot, scan_image_folder, train_transform
from upt.predict import Predictor
from upt.training import TrainCallbacks, TrainConfig, train

SHOTS, EPOCHS, BATCH = 6, 3, 8  # 4 classes x 6 shots = 24 images: 3 steps per epoch


def dassl_epoch_lrs(lr: float, epochs: int, warmup_epochs: int, warmup_lr: float) -> list[float]:
    """Dassl's ConstantWarmupScheduler around CosineAnnealingLR(T_max=epochs), WARMUP_RECOUNT=True,
    stepped once at the end of every epoch: the cosine starts counting when the warm-up ends."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": no real steps here
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        lrs = []
        for epoch in range(epochs):
            lrs.append(warmup_lr if epoch < warmup_epochs else optimizer.param_groups[0]["lr"])
            if epoch >= warmup_epochs:
                cosine.step()
    return lrs


class Observed:
    def __init__(self):
        self.sgd_steps: list[dict] = []
        self.losses: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.batches: list[torch.Tensor] = []
        self.dropout_modes: list[tuple[int, bool]] = []  # (losses seen so far, training)
        self.learned_modules: dict[int, torch.nn.Module] = {}
        self.step_reports: list = []
        self.epoch_reports: list = []


class _Recorder(TrainCallbacks):
    def __init__(self, observed: Observed):
        self.observed = observed

    def on_step(self, report) -> None:
        self.observed.step_reports.append(report)

    def on_epoch_end(self, report) -> None:
        self.observed.epoch_reports.append(report)


@pytest.fixture(scope="module")
def observed_run(tiny, fashion_train, tmp_path_factory):
    observed = Observed()
    monkeypatch = pytest.MonkeyPatch()
    real_step, real_ce, real_dropout = torch.optim.SGD.step, F.cross_entropy, torch.nn.Dropout.forward

    def step(self, *args, **kwargs):
        observed.sgd_steps.append({key: group[key] for group in self.param_groups
                                   for key in ("lr", "momentum", "weight_decay", "nesterov", "dampening")})
        return real_step(self, *args, **kwargs)

    def cross_entropy(logits, labels, *args, **kwargs):
        observed.losses.append((logits.detach().clone(), labels.clone()))
        return real_ce(logits, labels, *args, **kwargs)

    def dropout(self, x):
        observed.dropout_modes.append((len(observed.losses), self.training))
        return real_dropout(self, x)

    def forward_pre_hook(module, args):
        if any(p.requires_grad for p in module.parameters()):
            observed.learned_modules[id(module)] = module
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
                observed.batches.append(args[0].detach().clone())

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    monkeypatch.setattr(F, "cross_entropy", cross_entropy)
    monkeypatch.setattr(torch.nn.Dropout, "forward", dropout)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(forward_pre_hook)
    config = TrainConfig.of("upt", shots=SHOTS, epochs=EPOCHS, batch_size=BATCH, lr=0.01, dropout=0.2)
    try:
        result = train(tiny, fashion_train, config, tmp_path_factory.mktemp("run") / "artifact", _Recorder(observed))
    finally:
        handle.remove()
        monkeypatch.undo()
    return observed, result, config


def test_the_optimiser_uses_dassls_schedule_at_every_step(observed_run):
    observed, _, config = observed_run
    steps_per_epoch = math.ceil(4 * SHOTS / BATCH)
    expected = [lr for lr in dassl_epoch_lrs(config.lr, EPOCHS, 1, 1e-5) for _ in range(steps_per_epoch)]
    assert [s["lr"] for s in observed.sgd_steps] == pytest.approx(expected, rel=1e-9, abs=0)
    assert expected[:steps_per_epoch] == [1e-5] * steps_per_epoch and expected[steps_per_epoch] == config.lr


def test_the_optimiser_is_sgd_with_the_papers_momentum_and_weight_decay(observed_run):
    observed, _, _ = observed_run
    assert observed.sgd_steps and all(
        (s["momentum"], s["weight_decay"], s["nesterov"], s["dampening"]) == (0.9, 5e-4, False, 0)
        for s in observed.sgd_steps
    )


def test_training_runs_in_train_mode_and_leaves_the_model_in_eval_mode(observed_run):
    observed, _, _ = observed_run
    last_loss = len(observed.losses)
    during = [training for seen, training in observed.dropout_modes if seen < last_loss]
    after = [training for seen, training in observed.dropout_modes if seen == last_loss]
    assert during and all(during)  # θ's dropout is on in every training step
    assert after and not any(after)  # and off when the artifact is exported
    assert observed.learned_modules and not any(m.training for m in observed.learned_modules.values())


def test_reported_loss_and_accuracy_are_those_of_the_steps(observed_run):
    observed, _, _ = observed_run
    assert len(observed.step_reports) == len(observed.losses) == EPOCHS * math.ceil(4 * SHOTS / BATCH)
    for report, (logits, labels) in zip(observed.step_reports, observed.losses):
        assert report.accuracy == pytest.approx(float((logits.argmax(dim=-1) == labels).float().mean()))
        assert report.loss == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-6)
    per_epoch = len(observed.losses) // EPOCHS
    for epoch, report in enumerate(observed.epoch_reports):
        steps = observed.losses[epoch * per_epoch: (epoch + 1) * per_epoch]
        hits = sum(int((logits.argmax(dim=-1) == labels).sum()) for logits, labels in steps)
        assert report.accuracy == pytest.approx(hits / sum(len(labels) for _, labels in steps))


def test_batches_are_shuffled_and_cropped_anew_every_epoch(observed_run):
    observed, _, _ = observed_run
    per_epoch = len(observed.losses) // EPOCHS
    orders = [torch.cat([labels for _, labels in observed.losses[e * per_epoch: (e + 1) * per_epoch]]).tolist()
              for e in range(EPOCHS)]
    assert all(sorted(order) == sorted(orders[0]) for order in orders) and len(orders[0]) == 4 * SHOTS
    assert all(order != sorted(order) for order in orders)  # shuffled, not in the split's class order
    assert len({tuple(order) for order in orders}) == EPOCHS  # and differently every epoch
    training_batches = observed.batches[: len(observed.losses)]
    sums = [float(sum(b.double().sum() for b in training_batches[e * per_epoch: (e + 1) * per_epoch]))
            for e in range(EPOCHS)]
    assert len({round(s, 6) for s in sums}) == EPOCHS  # the same images, cropped differently each epoch


def test_reported_validation_accuracy_is_measured_on_the_validation_images(observed_run, tiny, fashion_train):
    _, result, config = observed_run
    split = sample_few_shot(scan_image_folder(fashion_train), SHOTS, config.seed)
    report = Predictor.from_artifact(tiny, result.artifact_dir).evaluate(split.val)
    metrics = result.metrics
    assert metrics["val_count"] == report["count"] == 4 * 4 and metrics["train_count"] == 4 * SHOTS
    assert metrics["val_accuracy"] == report["accuracy"]
    assert metrics["confusion_matrix"] == report["confusion_matrix"]


# ---- splits ------------------------------------------------------------------------------------------

def _folder(root: Path, sizes: dict[str, int]) -> Path:
    for name, size in sizes.items():
        (root / name).mkdir(parents=True)
        for index in range(size):
            Image.new("RGB", (4, 4), (index * 7 % 256, 0, 0)).save(root / name / f"{index:03d}.png")
    return root


SIZES = {"large": 30, "medium": 9, "small": 5, "three": 3, "single": 1}


@pytest.mark.parametrize("shots, expected", [
    # class: (train, validation). Validation is min(K, 4), never more than half of a small class.
    (1, {"large": (1, 1), "medium": (1, 1), "small": (1, 1), "three": (1, 1), "single": (1, 0)}),
    (2, {"large": (2, 2), "medium": (2, 2), "small": (2, 2), "three": (2, 1), "single": (1, 0)}),
    (8, {"large": (8, 4), "medium": (5, 4), "small": (3, 2), "three": (2, 1), "single": (1, 0)}),
    (16, {"large": (16, 4), "medium": (5, 4), "small": (3, 2), "three": (2, 1), "single": (1, 0)}),
    (None, {"large": (26, 4), "medium": (5, 4), "small": (3, 2), "three": (2, 1), "single": (1, 0)}),
])
def test_split_sizes_and_disjointness_for_small_and_large_classes(tmp_path, shots, expected):
    folder = scan_image_folder(_folder(tmp_path, SIZES))
    split = sample_few_shot(folder, shots, seed=1)
    for label, name in enumerate(folder.class_names):
        train = [s.path for s in split.train if s.label == label]
        val = [s.path for s in split.val if s.label == label]
        assert (len(train), len(val)) == expected[name], name
        assert not set(train) & set(val) and len(set(train)) == len(train) and len(set(val)) == len(val)
        assert all(p.parent.name == name for p in train + val)


def test_split_does_not_depend_on_file_system_order(tmp_path, monkeypatch):
    root = _folder(tmp_path, SIZES)
    before = sample_few_shot(scan_image_folder(root), 4, seed=2)
    real_iterdir = Path.iterdir

    def shuffled_iterdir(self):
        entries = list(real_iterdir(self))
        random.Random(str(self)).shuffle(entries)
        return iter(entries)

    monkeypatch.setattr(Path, "iterdir", shuffled_iterdir)
    assert sample_few_shot(scan_image_folder(root), 4, seed=2) == before
    assert sample_few_shot(scan_image_folder(root), 4, seed=3) != before


# ---- transforms and evaluation -----------------------------------------------------------------------

def test_train_augmentation_is_the_papers(tiny):
    steps = train_transform(tiny.image).transforms
    crop = next(t for t in steps if isinstance(t, T.RandomResizedCrop))
    assert crop.size == (tiny.image.size, tiny.image.size)
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == T.InterpolationMode.BICUBIC
    flip = next(t for t in steps if isinstance(t, T.RandomHorizontalFlip))
    assert flip.p == 0.5
    norm = next(t for t in steps if isinstance(t, T.Normalize))
    assert tuple(norm.mean) == tiny.image.mean and tuple(norm.std) == tiny.image.std
    assert [type(t) for t in steps].index(T.RandomResizedCrop) < [type(t) for t in steps].index(T.Normalize)


def test_evaluation_transform_resizes_the_shorter_side_and_centre_crops(tiny):
    image = Image.new("RGB", (90, 45))
    image.paste((255, 0, 0), (0, 0, 45, 45))
    out = eval_transform(tiny.image)(image)
    size = tiny.image.size
    assert out.shape == (3, size, size)
    resize = next(t for t in eval_transform(tiny.image).transforms if isinstance(t, T.Resize))
    assert resize.size == size and resize.interpolation == T.InterpolationMode.BICUBIC
    left, right = out[:, size // 2, 0], out[:, size // 2, -1]
    assert not torch.allclose(left, right)  # the centre of the wide image straddles both halves


def test_evaluation_sees_every_image_once(tiny, fashion_test):
    folder = scan_image_folder(fashion_test)
    samples = folder.samples[:11]
    predictor = Predictor.zero_shot(tiny, folder.class_names)
    report = predictor.evaluate(samples, batch_size=4)
    one_by_one = [int(predictor.logits(predictor.preprocess([Image.open(s.path)])).argmax()) for s in samples]
    assert report["count"] == len(samples) and sum(map(sum, report["confusion_matrix"])) == len(samples)
    expected = [[0] * len(folder.class_names) for _ in folder.class_names]
    for sample, predicted in zip(samples, one_by_one):
        expected[sample.label][predicted] += 1
    assert report["confusion_matrix"] == expected
