"""Running a grid: each run trains, is evaluated on its test sets and writes `result.json` last, so a
run with that file is finished and skipped when the grid runs again (an interrupted run resumes from
its epoch checkpoint)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..backbone import Backbone
from ..datasets import DataSource, dataset, dataset_folder, expected_path, load_data, resolve_templates
from ..errors import ConfigError
from ..methods.registry import method_spec
from ..predict import Predictor
from ..training import EpochReport, TrainCallbacks, TrainConfig, train
from .grid import Run, default_epochs

RESULT_FILE = "result.json"
ARTIFACT = "artifact"
CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class RunOptions:
    """Overrides of the paper's training options for every run of a grid whose method takes them (None:
    the method's default)."""

    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None


@dataclass
class Plan:
    """What a grid would do: runs finished, runs to do, and the data sets missing under the root."""

    done: list[Run] = field(default_factory=list)
    todo: list[Run] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)  # data set -> the path that was looked for

    def as_dict(self) -> dict[str, Any]:
        return {"done": [r.key for r in self.done], "todo": [r.key for r in self.todo], "missing": self.missing,
                "runs": len(self.done) + len(self.todo)}


def plan(runs: list[Run], root: Path, out_dir: Path) -> Plan:
    result = Plan()
    for run in runs:
        (result.done if _finished(run, out_dir) else result.todo).append(run)
        for name in run.test_sets:
            spec = dataset(name)
            if name not in result.missing and dataset_folder(spec, root) is None:
                result.missing[name] = str(expected_path(spec, root))
    return result


def run_grid(backbone: Backbone, runs: list[Run], root: Path, out_dir: Path, options: RunOptions = RunOptions(),
             show_progress: bool = True) -> list[dict[str, Any]]:
    """Every run of `runs` not finished yet; returns the results of all of them."""
    todo = plan(runs, root, out_dir)
    needed = {name for run in todo.todo for name in run.test_sets}
    missing = {name: path for name, path in todo.missing.items() if name in needed}
    if missing:
        raise ConfigError("Data set(s) missing (CoOp's layout, see README \"Reproducing the paper\"): "
                          + "; ".join(f"{name} at {path}" for name, path in missing.items()))
    for run in todo.done:
        _check_backbone(read_result(run, out_dir), backbone, out_dir)
    sources: dict[str, DataSource] = {}
    bar = tqdm(total=len(runs), initial=len(todo.done), unit="run", file=sys.stderr, disable=not show_progress,
               desc="reproduce")
    try:
        for run in todo.todo:
            bar.set_postfix_str(run.key)
            for name in run.test_sets:
                if name not in sources:
                    sources[name] = load_data(root, name)
            execute(backbone, run, sources, out_dir, options, _RunProgress(bar, run))
            bar.update(1)
    finally:
        bar.close()
    return [read_result(run, out_dir) for run in runs]


def execute(backbone: Backbone, run: Run, sources: dict[str, DataSource], out_dir: Path, options: RunOptions,
            callbacks: TrainCallbacks | None = None) -> dict[str, Any]:
    """Train one run, evaluate it on its test sets, then write its result (last: the run is finished)."""
    folder = run.folder(out_dir)
    if (folder / RESULT_FILE).is_file():  # trained by another grid (the few-shot one's ImageNet runs, say)
        result = read_result(run, out_dir)
        _check_backbone(result, backbone, out_dir)
    else:
        source = sources[run.dataset]
        config = run_config(run, source, options)
        started = time.monotonic()
        trained = train(backbone, source, config, folder / ARTIFACT, callbacks, folder / CHECKPOINT)
        result = asdict(run) | {
            "evaluate_on": [],
            "accuracy": {},
            "val_accuracy": trained.metrics["val_accuracy"],
            "train_count": trained.metrics["train_count"],
            "epochs": trained.metrics["epochs"],
            "train_seconds": round(time.monotonic() - started, 2),
            "templates": list(config.templates),
            "backbone": backbone.describe(),
        }
    predictor = Predictor.from_artifact(backbone, folder / ARTIFACT)
    for name in run.test_sets:
        if name not in result["accuracy"]:
            test = sources[name]
            result["accuracy"][name] = predictor.for_classes(test.class_names).evaluate(test.test)["accuracy"]
    result["evaluate_on"] = [name for name in result["accuracy"] if name != run.dataset]
    tmp = folder / f".{RESULT_FILE}.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, folder / RESULT_FILE)
    shutil.rmtree(folder / CHECKPOINT, ignore_errors=True)  # finished: the checkpoint is no longer needed
    return result


def run_config(run: Run, source: DataSource, options: RunOptions) -> TrainConfig:
    """The paper's options for one run (the data set's own template, CoOp's epochs), with overrides."""
    spec = method_spec(run.method)
    # A grid's override goes to the runs whose method uses it (zero-shot takes no epochs, no lr):
    # TrainConfig.of refuses an option its method does not use.
    overrides = {key: value for key, value in asdict(options).items() if value is not None and spec.takes(key)}
    epochs = overrides.pop("epochs", default_epochs(run))
    return TrainConfig.of(run.method, shots=run.shots or 1, seed=run.seed, epochs=epochs,
                          templates=resolve_templates(None, False, source), **overrides).validate()


def _finished(run: Run, out_dir: Path) -> bool:
    path = run.folder(out_dir) / RESULT_FILE
    return path.is_file() and set(run.test_sets) <= set(json.loads(path.read_text())["accuracy"])


def read_result(run: Run, out_dir: Path) -> dict[str, Any]:
    return json.loads((run.folder(out_dir) / RESULT_FILE).read_text())


def _check_backbone(result: dict[str, Any], backbone: Backbone, out_dir: Path) -> None:
    recorded = result["backbone"]["weights_sha256"]
    if recorded != backbone.weights_sha256:
        raise ConfigError(f"{out_dir} holds results of another backbone ({result['backbone']['model']}, "
                          f"{result['backbone']['pretrained']}); use another --out to compare backbones.")


class _RunProgress(TrainCallbacks):
    """The grid's one bar: the run in progress and its epoch."""

    def __init__(self, bar: tqdm, run: Run):
        self.bar = bar
        self.run = run

    def on_epoch_end(self, report: EpochReport) -> None:
        self.bar.set_postfix_str(f"{self.run.key} epoch {report.epoch}/{report.epochs}")


