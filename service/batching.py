"""Micro-batching of concurrent /classify requests through the image encoder.

Requests arriving within UPT_BATCH_WINDOW_MS of each other are concatenated into one forward pass
(up to UPT_MAX_BATCH images), which is what a GPU is good at; a lone request waits at most one window.
They are grouped by what the image encoder needs (`upt.serving.encoder_need`), not by task: zero-shot
and CoOp requests of any tasks share one pass of raw features, and VPT/UPT requests of different tasks
share one pass with prompts per sample. One thread runs all encoder passes, so concurrent requests
never contend for the device.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future

import torch

from upt.backbone import Backbone
from upt.serving import ImageEncoder, TorchImageEncoder, encoder_need, logits_together


class MicroBatcher:
    """`encoder(backbone)` gives the image encoder that serves a backbone (PyTorch or compiled);
    `observe(n, seconds)` is called once per encoder pass with its number of images and its wall time."""

    def __init__(self, window_s: float, max_batch: int, observe: Callable[[int, float], None] | None = None,
                 encoder: Callable[[Backbone], ImageEncoder] = TorchImageEncoder) -> None:
        self.window_s = window_s
        self.max_batch = max_batch
        self.observe = observe
        self.encoder = encoder
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="classify-batcher", daemon=True)
        self._thread.start()

    def logits(self, predictor, batch: torch.Tensor) -> torch.Tensor:
        """`predictor.logits(batch)`, computed together with whatever else arrives meanwhile."""
        future: Future = Future()
        self._queue.put((predictor, batch, future))
        return future.result()

    def _loop(self) -> None:
        while True:
            pending = [self._queue.get()]
            size = len(pending[0][1])
            deadline = time.monotonic() + self.window_s
            while size < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                pending.append(item)
                size += len(item[1])
            self._run(pending)

    def _run(self, pending: list) -> None:
        groups: dict[Hashable, list] = {}
        for item in pending:
            groups.setdefault(encoder_need(item[0]), []).append(item)
        for items in groups.values():
            try:
                encoder = self.encoder(items[0][0].backbone)
                start = time.perf_counter()
                results = logits_together(encoder, [(predictor, batch) for predictor, batch, _ in items])
            except BaseException as error:  # each waiting request gets the error, the thread lives on
                for _, _, future in items:
                    future.set_exception(error)
                continue
            if self.observe is not None:
                self.observe(sum(len(batch) for _, batch, _ in items), time.perf_counter() - start)
            for (_, _, future), logits in zip(items, results):
                future.set_result(logits)
