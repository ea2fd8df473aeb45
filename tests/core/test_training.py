from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from upt.artifact import TENSORS_FILE
from upt.data import sample_few_shot, scan_image_folder
from upt.errors import ConfigError, DataError, TrainingCancelled
from upt.training import TrainCallbacks, TrainConfig, epochs_for_shots, train


def _config(method: str = "upt", **overrides) -> TrainConfig:
    return TrainConfig.of(method, **({"shots": 4, "epochs": 3, "lr": 0.05, "batch_size": 8} | overrides))


def _tensors(artifact_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(artifact_dir / TENSORS_FILE))


def test_paper_schedule():
    assert [epochs_for_shots(k) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    config = TrainConfig.of("coop", epochs=10)
    assert config.lr_at(0) == 1e-5  # one warm-up epoch at a constant 1e-5
    assert config.lr_at(1) == 0.002  # then Dassl's cosine, counted from the end of the warm-up
    assert config.lr_at(2) == pytest.approx(0.5 * 0.002 * (1 + math.cos(math.pi / 10)))
    assert config.lr_at(9) == pytest.approx(0.5 * 0.002 * (1 + math.cos(8 * math.pi / 10)))
    defaults = TrainConfig.of("upt")
    assert (defaults.step_lr, defaults.momentum, defaults.weight_decay) == (0.002, 0.9, 5e-4)
    assert defaults.step_batch_size == 32


def test_few_shot_split_holds_out_validation(fashion_train):
    folder = scan_image_folder(fashion_train)
    split = sample_few_shot(folder, shots=4, seed=1)
    assert len(split.train) == 4 * 4 and len(split.val) == 4 * 4
    assert not {s.path for s in split.train} & {s.path for s in split.val}
    assert sample_few_shot(folder, 4, seed=1) == split
    assert sample_few_shot(folder, 4, seed=2) != split
    one_shot = sample_few_shot(folder, shots=1, seed=1)
    assert len(one_shot.train) == 4 and len(one_shot.val) == 4  # min(K, 4) = 1 per class


def test_backbone_is_bit_identical_after_training(tiny, fashion_train, tmp_path):
    before = {name: tensor.clone() for name, tensor in tiny.clip.state_dict().items()}
    train(tiny, fashion_train, _config("joint"), tmp_path / "artifact")
    for name, tensor in tiny.clip.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_same_seed_gives_the_same_artifact(tiny, fashion_train, tmp_path):
    first = train(tiny, fashion_train, _config(), tmp_path / "a")
    second = train(tiny, fashion_train, _config(), tmp_path / "b")
    other = train(tiny, fashion_train, _config(seed=2), tmp_path / "c")
    a, b, c = (_tensors(r.artifact_dir) for r in (first, second, other))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier"], c["classifier"])


class _StopAfter(TrainCallbacks):
    def __init__(self, epochs: int):
        self.epochs_done = 0
        self.limit = epochs
        self.reports = []

    def on_epoch_end(self, report) -> None:
        self.epochs_done = report.epoch
        self.reports.append(report)

    def should_stop(self) -> bool:
        return self.epochs_done >= self.limit


def test_resume_from_an_epoch_checkpoint_reaches_the_same_result(tiny, fashion_train, tmp_path):
    config = _config(epochs=4)
    uninterrupted = train(tiny, fashion_train, config, tmp_path / "whole")
    stopper = _StopAfter(2)
    with pytest.raises(TrainingCancelled):
        train(tiny, fashion_train, config, tmp_path / "resumed", stopper, checkpoint_dir=tmp_path / "ckpt")
    assert not (tmp_path / "resumed" / TENSORS_FILE).exists()
    recorder = _StopAfter(99)
    resumed = train(tiny, fashion_train, config, tmp_path / "resumed", recorder, checkpoint_dir=tmp_path / "ckpt")
    assert [r.epoch for r in recorder.reports] == [3, 4]  # the first two epochs are not repeated
    a, b = _tensors(uninterrupted.artifact_dir), _tensors(resumed.artifact_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    def same_numbers(history):
        return [(h["epoch"], h["loss"], h["accuracy"], h["lr"]) for h in history]

    assert same_numbers(resumed.history) == same_numbers(uninterrupted.history)


def test_a_checkpoint_of_another_run_is_refused(tiny, fashion_train, fashion_test, tmp_path):
    train(tiny, fashion_train, _config(epochs=1), tmp_path / "a", checkpoint_dir=tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="options differ"):
        train(tiny, fashion_train, _config(epochs=2), tmp_path / "b", checkpoint_dir=tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="training images differ"):
        train(tiny, fashion_test, _config(epochs=1), tmp_path / "c", checkpoint_dir=tmp_path / "ckpt")


def test_progress_reports_reach_the_end(tiny, fashion_train, tmp_path):
    class Recorder(TrainCallbacks):
        steps, epochs = [], []

        def on_step(self, report):
            self.steps.append(report)

        def on_epoch_end(self, report):
            self.epochs.append(report)

    recorder = Recorder()
    result = train(tiny, fashion_train, _config("coop"), tmp_path / "a", recorder)
    assert [e.epoch for e in recorder.epochs] == [1, 2, 3]
    assert recorder.epochs[-1].progress == 1.0 and recorder.epochs[-1].eta_s == 0
    assert all(0 < s.progress <= 1 for s in recorder.steps)
    metrics = result.metrics
    assert metrics["val_count"] == 16 and len(metrics["confusion_matrix"]) == 4
    assert sum(map(sum, metrics["confusion_matrix"])) == 16
    assert set(metrics["per_class_accuracy"]) == {"bag", "pullover", "sneaker", "trouser"}
    variances = metrics["variances"]  # the paper's two numbers, for the few-shot images of this run
    assert variances["images"] == 32 and variances["intra_class_visual"] > 0 and variances["inter_class_text"] > 0


def test_bad_training_options_and_data_are_refused(tiny, tmp_path, fashion_train):
    with pytest.raises(ConfigError, match="shots"):
        train(tiny, fashion_train, _config(shots=0), tmp_path / "a")
    with pytest.raises(ConfigError, match="lr"):
        train(tiny, fashion_train, _config(lr=-1.0), tmp_path / "a")
    (tmp_path / "one" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="at least two"):
        train(tiny, tmp_path / "one", _config(), tmp_path / "a")
    (tmp_path / "one" / "dog").mkdir()
    with pytest.raises(DataError, match="no images"):
        train(tiny, tmp_path / "one", _config(), tmp_path / "a")
