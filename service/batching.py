"""Micro-batching of concurrent /classify requests through the image encoder.

Requests arriving within UPT_BATCH_WINDOW_MS of each other are concatenated into one forward pass
(up to UPT_MAX_BATCH images), which is what a GPU is good at; a lone request waits at most one window,
and requests that arrived during a pass go in the next one at once.
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
        self._last_pass_on_gpu = False
        self._thread = threading.Thread(target=self._loop, name="classify-batcher", daemon=True)
        self._thread.start()

    def logits(self, predictor, batch: torch.Tensor) -> torch.Tensor:
        """`predictor.logits(batch)`, computed together with whatever else arrives meanwhile."""
        future: Future = Future()
        self._queue.put((predictor, batch, future))
        return future.result()

    def _loop(self) -> None:
        while True:
            # Requests that queued during the last pass: after a CPU pass they go at once, since
            # waiting for more would leave the encoder idle (5 ms of a 275 ms bf16 pass) to make a
            # pass larger that a CPU encodes at the same images/s; after a GPU pass, where a larger
            # pass costs little more, they wait the window for company too, as an idle batcher does.
            pending = self._take(time.monotonic() + (self.window_s if self._last_pass_on_gpu else 0.0))
            if not pending:
                first = self._queue.get()
                pending = self._take(time.monotonic() + self.window_s, [first])
            self._run(pending)

    def _take(self, deadline: float, pending: list | None = None) -> list:
        """`pending` and the queued requests up to max_batch images: those waiting now and those that
        arrive until `deadline`."""
        pending = pending or []
        size = sum(len(batch) for _, batch, _ in pending)
        while size < self.max_batch:
            try:  # a timeout of 0 still takes a request that is waiting
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            pending.append(item)
            size += len(item[1])
        return pending

    def _run(self, pending: list) -> None:
        groups: dict[Hashable, list] = {}
        for item in pending:
            groups.setdefault(encoder_need(item[0]), []).append(item)
        for items in groups.values():
            self._last_pass_on_gpu = items[0][0].backbone.device.type == "cuda"
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
