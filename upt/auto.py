"""`method=auto`: train several candidate methods on one split, keep the best on validation.

Every candidate trains with the same seed and shots, hence on the same few-shot split (sampling is a
function of the folder, the shots and the seed), so their validation accuracies are comparable, image
by image. None of them chose a hyper-parameter on those images (the training-free methods search
theirs on the shots: upt.methods.crossfit), so none is flattered by them. The winner is the cheapest
candidate within one paired standard error of the best (`RULE`): with 40 validation images one seed's
accuracy varies by several points, and a costlier method must win by more than that. Its artifact is
written with the leaderboard (each accuracy with its standard error) in `adapter_config.json` under
`auto`.

The pieces (`candidate_config`, `leaderboard_row`, `pick_winner`, `record_choice`) are separate so the
service can train the candidates as separate jobs, on several workers at once, and choose the same way.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .artifact import annotate_artifact, load_artifact
from .backbone import Backbone
from .datasets import DataSource
from .errors import ConfigError
from .methods.config import METHODS
from .methods.registry import REGISTRY, refuse_unused, registry_as_dicts, train_options
from .options import OptionSpec
from .training import SGD_OPTIONS, TrainCallbacks, TrainConfig, TrainResult, train

AUTO = "auto"
# The training-free GDA first: it costs seconds, and the rule keeps it unless a trained one wins by more
# than the noise. CLIP-LoRA and PromptSRC train for far longer (500 × K iterations; 50 epochs): they are
# candidates to name, not defaults.
DEFAULT_CANDIDATES: tuple[str, ...] = ("gda", "tip-adapter-f", "coop", "vpt-deep", "upt")
CANDIDATES = OptionSpec("candidates", str, f"auto: comma-separated methods to train (default: "
                        f"{','.join(DEFAULT_CANDIDATES)}); the SGD options and epochs apply to the prompt methods, "
                        f"Tip-Adapter keeps its own recipe; an option that no candidate uses is refused",
                        default=",".join(DEFAULT_CANDIDATES))
AUTO_TITLE = "Auto (pick for me)"
AUTO_DESCRIPTION = ("Trains the candidates (GDA, Tip-Adapter-F, CoOp, VPT deep and UPT) on the same images and keeps "
                    "the cheapest one that no other beats by more than the noise of the held-out images.")


def method_listing() -> list[dict[str, Any]]:
    """Every method as `upt methods --json` and `GET /methods` list it: auto first, then the registry's.
    Auto's options are those it takes with its default candidates (`auto_options`)."""
    auto = {"name": AUTO, "title": AUTO_TITLE, "description": AUTO_DESCRIPTION, "learns": [], "conditional": False,
            "uses_cache": False, "default_depth": None,
            "options": [option.as_dict() for option in auto_options(DEFAULT_CANDIDATES)]}
    return [auto] + registry_as_dicts()


def _passed_on(method: str) -> set[str]:
    """The options a candidate takes from auto's shared ones: those it uses, except that a method with
    its own recipe (the cache methods) keeps that recipe's epochs (see CANDIDATES' help)."""
    spec = REGISTRY[method]
    return {option.name for option in spec.options} - ({"epochs"} if spec.recipe is not None else set())


def auto_options(candidates: tuple[str, ...]) -> list[OptionSpec]:
    """What method=auto takes with these candidates: `candidates`, and every option that at least one
    candidate is passed (`_passed_on`), as the general spec, in the registry's order.

    At least one, not every one: one command line or form serves all the candidates, and an option
    that one of them uses changes that candidate's result, hence possibly the winner, so it matters
    and is accepted; each candidate receives only the options it uses (`candidate_config`). An
    option that no candidate uses could change nothing and is refused, as for a single method."""
    used = set().union(*(_passed_on(method) for method in candidates))
    return [CANDIDATES] + [option for option in train_options() if option.name in used]


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
    """`base`'s options for `method`: those it is passed (`_passed_on`); the others keep the method's
    own defaults, as do the SGD options of a method with its own recipe (the cache methods), so one
    command line can serve every candidate."""
    dropped = {option.name for option in train_options()} - _passed_on(method)
    if REGISTRY[method].recipe is not None:
        dropped |= set(SGD_OPTIONS)
    options = {name: value for name, value in base.to_dict().items() if name != "method" and name not in dropped}
    return TrainConfig.of(method, **options).validate()


def base_config(candidates: tuple[str, ...], **options: Any) -> TrainConfig:
    """The options shared by `candidates`; an option that none of them uses is refused
    (UnusedOptionError, as `TrainConfig.of` refuses one for a single method)."""
    refuse_unused(f"auto with candidates {', '.join(candidates)}", auto_options(candidates), options)
    return _shared_config(candidates, options)


def _shared_config(candidates: tuple[str, ...], options: dict[str, Any]) -> TrainConfig:
    """Held as the first candidate's that has no recipe of its own and takes ctx_init, else the first
    without a recipe: its prompt config then accepts every prompt option (the cache methods refuse
    them, most prompt methods refuse ctx_init). It may hold an option that only another candidate
    uses, which `candidate_config` passes on."""
    holder = min(candidates, key=lambda m: (REGISTRY[m].recipe is not None, not REGISTRY[m].takes("ctx_init")))
    return TrainConfig.holding(holder, **options)


@dataclass
class AutoConfig:
    """A `method=auto` run: the shared options (`base`) and the candidates, as stored in a task row."""

    base: TrainConfig
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES

    method = AUTO

    def configs(self) -> list[TrainConfig]:
        return [candidate_config(self.base, method) for method in self.candidates]

    def validate(self) -> "AutoConfig":
        self.configs()
        return self

    @property
    def epochs(self) -> int | None:
        return self.base.epochs

    @property
    def total_epochs(self) -> int:
        return sum(config.total_epochs for config in self.configs())

    @property
    def class_names(self) -> list[str] | None:
        return self.base.class_names

    @class_names.setter
    def class_names(self, names: list[str] | None) -> None:
        self.base.class_names = names

    def to_dict(self) -> dict[str, Any]:
        return self.base.to_dict() | {"method": AUTO, "candidates": list(self.candidates)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AutoConfig":
        candidates = tuple(data.get("candidates") or DEFAULT_CANDIDATES)
        options = {key: value for key, value in data.items() if key not in ("candidates", "method")}
        return cls(_shared_config(candidates, options), candidates)  # as stored, every option: not judged


def config_from_dict(data: dict[str, Any]) -> "TrainConfig | AutoConfig":
    """A task row's stored options: one method's, or auto's."""
    return AutoConfig.from_dict(data) if data.get("method") == AUTO else TrainConfig.from_dict(data)


@dataclass(frozen=True)
class LeaderboardRow:
    method: str
    val_accuracy: float | None
    val_count: int
    per_class_accuracy: dict[str, float | None]
    trainable_parameters: int
    training_seconds: float
    val_correct: list[int] | None = None  # 1 or 0 per validation image, in split order (None: not recorded)

    @property
    def val_stderr(self) -> float | None:
        """The standard error of its validation accuracy, √(p(1 − p)/n): the spread of one seed's figure."""
        if self.val_accuracy is None or self.val_count < 2:
            return None
        return math.sqrt(self.val_accuracy * (1 - self.val_accuracy) / self.val_count)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LeaderboardRow":
        """A row as `as_dict` or a recorded choice's leaderboard wrote it (whose derived figures are left out)."""
        return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls) if field.name in data})


def leaderboard_row(method: str, metrics: dict[str, Any], training_seconds: float) -> LeaderboardRow:
    return LeaderboardRow(method, metrics["val_accuracy"], metrics["val_count"], dict(metrics["per_class_accuracy"]),
                          int(metrics["trainable_parameters"]), round(training_seconds, 3), metrics.get("val_correct"))


RULE = ("the cheapest candidate (fewest trainable parameters, then candidate order) whose validation accuracy is "
        "below the best by no more than one standard error of their paired difference on the same images")


def paired_gap(best: LeaderboardRow, other: LeaderboardRow) -> tuple[float, float]:
    """How far `other` is below `best` on the same validation images, and the standard error of that
    gap: d_i = best's hit − other's hit per image, SE = sd(d) / √n (0 when every d_i is the same)."""
    gap = (best.val_accuracy or 0.0) - (other.val_accuracy or 0.0)
    if best.val_correct is None or other.val_correct is None or len(best.val_correct) < 2:
        return gap, 0.0
    differences = [a - b for a, b in zip(best.val_correct, other.val_correct)]
    n = len(differences)
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1)
    return gap, math.sqrt(variance / n)


def pick_winner(rows: list[LeaderboardRow]) -> LeaderboardRow:
    """`RULE`: a costlier candidate must beat the cheaper ones by more than the noise of the images
    the choice rests on (40 images make one seed's accuracy vary by several points). With no
    validation image there is no evidence at all: the cheapest candidate."""
    if not rows:
        raise ConfigError("No candidate was trained.")
    by_cost = sorted(rows, key=lambda row: (row.trainable_parameters, rows.index(row)))
    if all(row.val_accuracy is None for row in rows):
        return by_cost[0]
    best = min(rows, key=lambda row: (-(row.val_accuracy if row.val_accuracy is not None else -1.0),
                                      row.trainable_parameters, rows.index(row)))
    for row in by_cost:
        if row.val_accuracy is None:
            continue
        gap, stderr = paired_gap(best, row)
        if gap <= stderr:
            return row
    return best


def choice_record(rows: list[LeaderboardRow], winner: LeaderboardRow) -> dict[str, Any]:
    """What `adapter_config.json` (under `auto`) and `--json` say about the choice: each candidate's
    accuracy with its standard error and its gap below the best, and the images the choice rests on."""
    best = max(rows, key=lambda row: row.val_accuracy if row.val_accuracy is not None else -1.0)
    board = []
    for row in rows:
        gap, stderr = paired_gap(best, row) if row.val_accuracy is not None else (None, None)
        board.append(row.as_dict() | {"val_stderr": row.val_stderr, "gap_to_best": gap, "gap_stderr": stderr})
    return {
        "winner": winner.method,
        "candidates": [row.method for row in rows],
        "val_count": winner.val_count,  # every candidate was validated on the same images
        "rests_on": f"{winner.val_count} validation images",
        "leaderboard": board,
        "rule": RULE if winner.val_count else "no validation image: the cheapest candidate",
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
               callbacks_for: Callable[[str], TrainCallbacks] = lambda method: TrainCallbacks(),
               class_folders: list[str] | None = None, resume: bool = False,
               on_candidate: Callable[[int, LeaderboardRow, bool], None] = lambda index, row, reused: None,
               ) -> AutoResult:
    """Train each candidate into `work_dir/<method>`, then copy the winner's artifact to `out_dir`.

    With `resume`, a candidate whose artifact is already in `work_dir` is not trained again, and one
    that was interrupted resumes from its epoch checkpoint: a run that died half-way (a worker killed)
    ends with every candidate trained once. A candidate's folder appears whole (renamed into place)."""
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    results: dict[str, TrainResult] = {}
    rows = []
    for index, method in enumerate(candidates):
        config = candidate_config(base, method)
        final = work_dir / method
        finished = _finished_candidate(final, config) if resume else None
        if finished is not None:
            results[method], row = finished
            rows.append(row)
            on_candidate(index, row, True)
            continue
        partial = work_dir / f"{method}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        started = time.monotonic()
        result = train(backbone, data_dir, config, partial, callbacks_for(method),
                       checkpoint_dir=work_dir / f"{method}.checkpoint" if resume else None,
                       class_folders=class_folders)
        row = leaderboard_row(method, result.metrics, time.monotonic() - started)
        annotate_artifact(partial, {"auto_candidate": row.as_dict()})
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        shutil.rmtree(work_dir / f"{method}.checkpoint", ignore_errors=True)
        results[method] = TrainResult(final, result.metrics, config, result.history)
        rows.append(row)
        on_candidate(index, row, False)
    if len({row.val_count for row in rows}) != 1:  # a guard on the promise above, not expected to fire
        raise ConfigError("The candidates were validated on different images; they cannot be compared.")
    winner = pick_winner(rows)
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(results[winner.method].artifact_dir, out_dir)
    choice = record_choice(out_dir, rows, winner)
    return AutoResult(out_dir, results[winner.method], choice)


def _finished_candidate(folder: Path, config: TrainConfig) -> tuple[TrainResult, LeaderboardRow] | None:
    """A candidate trained by an earlier attempt of the same run, if its artifact is there."""
    from .artifact import CONFIG_FILE

    if not (folder / CONFIG_FILE).is_file():
        return None
    recorded = load_artifact(folder).config
    if recorded.get("train") != config.to_dict() or "auto_candidate" not in recorded:
        return None  # another run's: trained again
    row = LeaderboardRow(**recorded["auto_candidate"])
    return TrainResult(folder, recorded["metrics"], config), row
