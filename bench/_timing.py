"""Shared timing helpers for the benchmarks: median wall time of repeated calls, and ratios to a
yardstick timed in the same rounds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads"


@dataclass(frozen=True)
class Ratio:
    """A contender's speed against the yardstick: yardstick seconds / contender seconds per round."""
    median: float
    low: float
    high: float
    seconds: float  # the contender's median seconds per call


def interleaved_ratios(yardstick: Callable[[], object], contenders: Mapping[str, Callable[[], object]],
                       rounds: int = 5) -> tuple[float, dict[str, Ratio]]:
    """The yardstick's median seconds, and each contender's speed as a ratio to it, timed in rounds
    that call the yardstick and then every contender once, so that each ratio compares calls made
    seconds apart. On a shared virtual machine one call's time drifts by tens of per cent within
    minutes (ViT-B-16 batch 32: 6.3 s, then 8.9 s ten minutes later), and ratios of medians timed
    one after another measure that drift as much as the code."""
    calls = {"yardstick": yardstick, **contenders}
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for fn in calls.values():
            fn()  # warm-up
        for _ in range(rounds):
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - start)
    ratios = {}
    for name in contenders:
        per_round = [base / own for base, own in zip(seconds["yardstick"], seconds[name])]
        ratios[name] = Ratio(statistics.median(per_round), min(per_round), max(per_round),
                             statistics.median(seconds[name]))
    return statistics.median(seconds["yardstick"]), ratios
