"""The paper's experiment grids: which runs `upt reproduce` trains and evaluates."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..datasets import FEW_SHOT_DATASETS, IMAGENET_VARIANTS, dataset
from ..errors import ConfigError
from ..methods.config import METHODS, ZERO_SHOT

SHOTS: tuple[int, ...] = (1, 2, 4, 8, 16)
SEEDS: tuple[int, ...] = (1, 2, 3)
# Table 2 (and Figure 4, which adds zero-shot CLIP): the 11 data sets, each method at every shot count.
FEW_SHOT_METHODS: tuple[str, ...] = (ZERO_SHOT, "coop", "vpt-shallow", "vpt-deep", "joint", "shared", "mlp", "upt")
# Table 1: trained on ImageNet at 16 shots, evaluated on it and its four variants.
DG_METHODS: tuple[str, ...] = ("coop", "cocoop", "vpt-shallow", "vpt-deep", "upt")
DG_SHOTS = 16
GRIDS = ("few-shot", "dg")


@dataclass(frozen=True)
class Run:
    """One training run and the test sets it is evaluated on (its data set's first)."""

    dataset: str
    method: str
    shots: int  # 0 for zero-shot, which trains nothing: one run per data set
    seed: int
    evaluate_on: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.method}/{self.shots}shot/seed{self.seed}"

    def folder(self, out_dir: Path) -> Path:
        return out_dir / "runs" / self.key

    @property
    def test_sets(self) -> tuple[str, ...]:
        return (self.dataset, *self.evaluate_on)


@dataclass(frozen=True)
class GridSpec:
    """A grid by name ("few-shot": Table 2 and Figure 4; "dg": Table 1), narrowed by any axis given."""

    name: str
    datasets: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    shots: tuple[int, ...] | None = None
    seeds: tuple[int, ...] | None = None

    def runs(self) -> list[Run]:
        if self.name not in GRIDS:
            raise ConfigError(f"Unknown grid {self.name!r}; choose one of: {', '.join(GRIDS)}.")
        dg = self.name == "dg"
        datasets = self.datasets or (("imagenet",) if dg else FEW_SHOT_DATASETS)
        methods = self.methods or tuple(m for m in (DG_METHODS if dg else FEW_SHOT_METHODS) if m in METHODS)
        shots = self.shots or ((DG_SHOTS,) if dg else SHOTS)
        seeds = self.seeds or SEEDS
        _check(datasets, methods, shots, seeds)
        runs: dict[str, Run] = {}
        for name in datasets:
            variants = IMAGENET_VARIANTS if dg and name == "imagenet" else ()
            for method in methods:
                for k in shots:
                    for seed in seeds:
                        run = Run(name, method, k, seed, variants)
                        if method == ZERO_SHOT:  # the same model whatever the shots and seed
                            run = replace(run, shots=0, seed=1)
                        runs.setdefault(run.key, run)
        return list(runs.values())


    def unavailable_methods(self) -> tuple[str, ...]:
        """The paper's methods of this grid that this version of upt does not implement (left out)."""
        if self.methods:
            return ()
        return tuple(m for m in (DG_METHODS if self.name == "dg" else FEW_SHOT_METHODS) if m not in METHODS)


def default_epochs(run: Run) -> int | None:
    """The paper's schedule (CoOp's): ImageNet 50 epochs at every shot count for the methods on that
    schedule; None otherwise: the method's own (by shots; CoCoOp's 10, Tip-Adapter's recipe)."""
    on_schedule = run.method in FEW_SHOT_METHODS and run.method != ZERO_SHOT
    return 50 if run.dataset == "imagenet" and on_schedule else None


def _check(datasets: tuple[str, ...], methods: tuple[str, ...], shots: tuple[int, ...], seeds: tuple[int, ...]) -> None:
    for name in datasets:
        if not dataset(name).trains:
            raise ConfigError(f"{name} is an evaluation set; the dg grid evaluates an ImageNet model on it.")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"Unknown method(s) {', '.join(unknown)}; choose from: {', '.join(METHODS)}.")
    if any(k < 1 for k in shots) or any(s < 0 for s in seeds):
        raise ConfigError("shots must be at least 1 and seeds non-negative.")
