"""A terminal progress bar fed by the training callbacks."""

from __future__ import annotations

import sys

from tqdm import tqdm

from .training import EpochReport, TrainCallbacks


class EpochProgressBar(TrainCallbacks):
    """tqdm over epochs on stderr, with the running loss and train accuracy."""

    def __init__(self, total: int, enabled: bool = True, description: str | None = None):
        self.bar = tqdm(total=total, unit="epoch", file=sys.stderr, disable=not enabled or total == 0,
                        desc=description)

    def on_epoch_end(self, report: EpochReport) -> None:
        self.bar.total = report.epochs  # CLIP-LoRA's epochs are known once its split is drawn
        self.bar.n = report.epoch
        self.bar.set_postfix(loss=f"{report.loss:.3f}", acc=f"{report.accuracy:.2f}", refresh=False)
        self.bar.refresh()

    def __enter__(self) -> "EpochProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.bar.close()
