"""Micro-batching of concurrent /classify requests through the image encoder.

Requests arriving within UPT_BATCH_WINDOW_MS of each other are concatenated into one forward pass
(up to UPT_MAX_BATCH images), which is what a GPU is good at; a lone request waits at most one window,
and requests that arrived during a pass go in the next one at once.
They are grouped by what the image encoder needs (`upt.serving.encoder_need`), not by task: zero-shot
and CoOp requests of any tasks share one pass of raw features, and VPT/UPT requests of different tasks
share one pass with prompts per sample. One thread runs all encoder passes, so concurrent requests
never contend for the device.

Fair between tenants: the images of a pass are taken from the waiting requests tenant by tenant in
turn, so one tenant's flood of 64-image requests queues behind its own and another tenant's one image
goes in the next pass. The batcher's thread runs the image encoder only: each request's head (for
CoCoOp a text-encoder pass per image over all classes) runs on the request's own thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future

import torch

from upt.backbone import Backbone
from upt.serving import ImageEncoder, TorchImageEncoder, encoder_need, features_together


MAX_REMEMBERED_TENANTS = 10_000


class MicroBatcher:
    """`encoder(backbone)` gives the image encoder that serves a backbone (PyTorch or compiled);
    `observe(n, seconds)` is called once per encoder pass with its number of images and its wall time."""

    def __init__(self, window_s: float, max_batch: int, observe: Callable[[int, float], None] | None = None,
                 encoder: Callable[[Backbone], ImageEncoder] = TorchImageEncoder) -> None:
        self.window_s = window_s
        self.max_batch = max_batch
        self.observe = observe
        self.encoder = encoder
        self._queue: queue.Queue = queue.Queue()  # (predictor, images, future, tenant)
        self._waiting: dict[Hashable, deque] = {}  # taken from the queue, by tenant, in arrival order
        self._served: dict[Hashable, int] = {}  # each tenant's latest take (a counter)
        self._takes = 0
        self._last_pass_on_gpu = False
        self._thread = threading.Thread(target=self._loop, name="classify-batcher", daemon=True)
        self._thread.start()

    def logits(self, predictor, batch: torch.Tensor, tenant: Hashable = None) -> torch.Tensor:
        """`predictor.logits(batch)`: its images encoded together with whatever else arrives meanwhile,
        taking turns with other tenants' requests, then its head here, on the caller's thread."""
        future: Future = Future()
        self._queue.put((predictor, batch, future, tenant))
        return predictor.head(future.result())

    def _loop(self) -> None:
        while True:
            # Requests that queued during the last pass: after a CPU pass they go at once, since
            # waiting for more would leave the encoder idle (5 ms of a 275 ms bf16 pass) to make a
            # pass larger that a CPU encodes at the same images/s; after a GPU pass, where a larger
            # pass costs little more, they wait the window for company too, as an idle batcher does.
            pending = self._take(time.monotonic() + (self.window_s if self._last_pass_on_gpu else 0.0))
            if not pending:
                self._hold(self._queue.get())
                pending = self._take(time.monotonic() + self.window_s)
            self._run(pending)

    def _take(self, deadline: float) -> list:
        """Waiting requests up to max_batch images, tenant by tenant in turn: those waiting now and those
        that arrive until `deadline`; the rest wait for the next pass, at the front of their tenant's line."""
        pending, size = [], 0
        while size < self.max_batch:
            while True:  # everything queued by now, into its tenant's line
                try:
                    self._hold(self._queue.get_nowait())
                except queue.Empty:
                    break
            item = self._next_in_turn()
            if item is None:
                try:  # a timeout of 0 still takes a request that is waiting
                    self._hold(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
                continue
            pending.append(item)
            size += len(item[1])
        return pending

    def _hold(self, item) -> None:
        self._waiting.setdefault(item[3], deque()).append(item)

    def _next_in_turn(self):
        """The oldest request of the waiting tenant served longest ago (never: first); ties go by
        arrival. Each take counts as that tenant's latest service."""
        if not self._waiting:
            return None
        tenant = min(self._waiting, key=lambda t: self._served.get(t, -1))
        line = self._waiting[tenant]
        item = line.popleft()
        if not line:
            del self._waiting[tenant]
        self._takes += 1
        self._served[tenant] = self._takes
        if len(self._served) > MAX_REMEMBERED_TENANTS:  # forget the longest-idle ones: they go first again
            for old in sorted(self._served, key=self._served.get)[:len(self._served) // 2]:
                del self._served[old]
        return item

    def _run(self, pending: list) -> None:
        groups: dict[Hashable, list] = {}
        for item in pending:
            groups.setdefault(encoder_need(item[0]), []).append(item)
        for items in groups.values():
            self._last_pass_on_gpu = items[0][0].backbone.device.type == "cuda"
            try:
                encoder = self.encoder(items[0][0].backbone)
                start = time.perf_counter()
                results = features_together(encoder, [(item[0], item[1]) for item in items])
            except BaseException as error:  # each waiting request gets the error, the thread lives on
                for item in items:
                    item[2].set_exception(error)
                continue
            if self.observe is not None:
                self.observe(sum(len(item[1]) for item in items), time.perf_counter() - start)
            for item, features in zip(items, results):
                item[2].set_result(features)
