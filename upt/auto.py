"""`method=auto`: train several candidate methods on one split, keep the best on validation.

Every candidate trains with the same seed and shots, hence on the same few-shot split (sampling is a
function of the folder, the shots and the seed), so their validation accuracies are comparable. The
winner is the best validation accuracy; ties go to fewer trainable parameters, then to the earlier
candidate. Its artifact is written with the leaderboard in `adapter_config.json` under `auto`.

The pieces (`candidate_config`, `leaderboard_row`, `pick_winner`, `record_choice`) are separate so the
service can train the candidates as separate jobs and choose the same way.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .artifact import annotate_artifact
from .backbone import Backbone
from .datasets import DataSource
from .errors import ConfigError
from .methods.config import CACHE_METHODS, METHODS
from .training import SGD_OPTIONS, TrainCallbacks, TrainConfig, TrainResult, train

AUTO = "auto"
DEFAULT_CANDIDATES: tuple[str, ...] = ("tip-adapter-f", "coop", "vpt-deep", "upt")


def parse_candidates(text: str | None) -> tuple[str, ...]:
    """"a,b,c" -> ("a", "b", "c"), checked: known methods, no repeats, at least one."""
    if text is None or not text.strip():
        return DEFAULT_CANDIDATES
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ConfigError(f"Unknown candidate method(s) {', '.join(unknown)}; choose among: {', '.join(METHODS)}.")
    if len(set(names)) != len(names):
        raise ConfigError("A candidate method is listed twice.")
    if not names:
        raise ConfigError("Give at least one candidate method.")
    return names


def candidate_config(base: TrainConfig, method: str) -> TrainConfig:
    """`base`'s options for `method`. The SGD options and epochs apply to the prompt methods; the
    cache methods keep Tip-Adapter's own recipe, so one command line can serve every candidate."""
    if method in CACHE_METHODS:
        defaults = TrainConfig(method)
        kept = {name: getattr(defaults, name) for name in (*SGD_OPTIONS, "epochs", "n_ctx", "depth", "ctx_init")}
        return dataclasses.replace(base, method=method, **kept).validate()
    return dataclasses.replace(base, method=method).validate()


@dataclass(frozen=True)
class LeaderboardRow:
    method: str
    val_accuracy: float | None
    val_count: int
    per_class_accuracy: dict[str, float | None]
    trainable_parameters: int
    training_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def leaderboard_row(method: str, metrics: dict[str, Any], training_seconds: float) -> LeaderboardRow:
    return LeaderboardRow(method, metrics["val_accuracy"], metrics["val_count"], dict(metrics["per_class_accuracy"]),
                          int(metrics["trainable_parameters"]), round(training_seconds, 3))


def pick_winner(rows: list[LeaderboardRow]) -> LeaderboardRow:
    """Best validation accuracy; ties: fewer trainable parameters, then the earlier candidate."""
    if not rows:
        raise ConfigError("No candidate was trained.")
    return min(rows, key=lambda row: (-(row.val_accuracy if row.val_accuracy is not None else -1.0),
                                      row.trainable_parameters, rows.index(row)))


def choice_record(rows: list[LeaderboardRow], winner: LeaderboardRow) -> dict[str, Any]:
    """What `adapter_config.json` (under `auto`) and `--json` say about the choice."""
    return {
        "winner": winner.method,
        "candidates": [row.method for row in rows],
        "val_count": winner.val_count,  # every candidate was validated on the same images
        "leaderboard": [row.as_dict() for row in rows],
        "rule": "best validation accuracy; ties: fewer trainable parameters, then candidate order",
    }


def record_choice(artifact_dir: Path, rows: list[LeaderboardRow], winner: LeaderboardRow) -> dict[str, Any]:
    choice = choice_record(rows, winner)
    annotate_artifact(artifact_dir, {"auto": choice})
    return choice


@dataclass
class AutoResult:
    artifact_dir: Path
    winner: TrainResult
    choice: dict[str, Any]


def train_auto(backbone: Backbone, data_dir: str | Path | DataSource, base: TrainConfig, candidates: tuple[str, ...],
               out_dir: str | Path, work_dir: str | Path,
               callbacks_for: Callable[[str], TrainCallbacks] = lambda method: TrainCallbacks()) -> AutoResult:
    """Train each candidate into `work_dir/<method>`, then copy the winner's artifact to `out_dir`."""
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    results: dict[str, TrainResult] = {}
    rows = []
    for method in candidates:
        config = candidate_config(base, method)
        started = time.monotonic()
        results[method] = train(backbone, data_dir, config, work_dir / method, callbacks_for(method))
        rows.append(leaderboard_row(method, results[method].metrics, time.monotonic() - started))
    if len({row.val_count for row in rows}) != 1:  # a guard on the promise above, not expected to fire
        raise ConfigError("The candidates were validated on different images; they cannot be compared.")
    winner = pick_winner(rows)
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(results[winner.method].artifact_dir, out_dir)
    choice = record_choice(out_dir, rows, winner)
    return AutoResult(out_dir, results[winner.method], choice)
