"""One image encoder shared by /classify and the API's background work, /classify first.

The API process has one serving image encoder. Its micro-batcher runs /classify's passes, and the
instant stage (`service.instant`) encodes a new task's Tip-Adapter cache with it: hundreds of
augmented views, a burst of passes that can last minutes on a CPU. The compiled encoder runs one pass
at a time, so without an order a /classify that arrived during the cache's 64-image pass waited
for all of it (about 6 s in bf16 on 2 Zen 4 cores), and for the next one too if the background
thread took the encoder again first.

Here a background pass is cut into slices of a few images. A slice starts while no /classify pass
runs or waits, and also after a /classify pass during which it waited: under sustained load the
two take turns, a pass and a slice, so a request waits for at most one slice and a background build
still advances (the batcher starts a pass as soon as the last one ends when requests are queued, so
without its turn a slice could wait for the load to end). The PyTorch encoder has no lock of its own
(its passes would share the cores instead of taking turns); through this wrapper it takes turns too,
so that /classify keeps its latency there as well.
"""

from __future__ import annotations

import threading

import torch

from upt.serving import ImageEncoder

# Images per background slice: a slice of ViT-B-16 costs ~0.7 s in bf16 on 2 Zen 4 cores (~0.2 s
# with AMX); the cache's passes lose little, as batches of 4 to 32 ran at the same images/s.
BACKGROUND_SLICE = 8


class SharedImageEncoder:
    """An `ImageEncoder` (calls are /classify's passes) with `background` for work that yields to them."""

    def __init__(self, encoder: ImageEncoder, background_slice: int = BACKGROUND_SLICE) -> None:
        self.encoder = encoder
        self.runtime = encoder.runtime
        self.background_slice = background_slice
        self._turns = threading.Condition()
        self._busy = False
        self._serving_waits = 0
        self._background_waits = 0
        self._background_turn = False  # a slice waited through a /classify pass: it goes next

    def describe(self) -> str:
        return self.encoder.describe()

    def __call__(self, images: torch.Tensor, prompts: torch.Tensor | None, normalize: bool = True,
                 depths: torch.Tensor | None = None) -> torch.Tensor:
        with self._turns:
            self._serving_waits += 1
            try:
                self._turns.wait_for(lambda: not self._busy and not (self._background_turn and self._background_waits))
            finally:
                self._serving_waits -= 1
            self._busy = True
        try:
            return self.encoder(images, prompts, normalize, depths=depths)
        finally:
            self._release(background_next=True)

    def background(self, images: torch.Tensor, prompts: torch.Tensor | None = None,
                   normalize: bool = True) -> torch.Tensor:
        """The same features as a call, computed slice by slice, each once /classify leaves the encoder free."""
        slices = []
        for start in range(0, max(len(images), 1), self.background_slice):
            with self._turns:
                self._background_waits += 1
                try:
                    self._turns.wait_for(lambda: not self._busy and (self._serving_waits == 0 or self._background_turn))
                finally:
                    self._background_waits -= 1
                self._busy, self._background_turn = True, False
            try:
                chunk = images[start:start + self.background_slice]
                slices.append(self.encoder(chunk, _rows(prompts, start, len(chunk)), normalize))
            finally:
                self._release()
        return torch.cat(slices)

    def _release(self, background_next: bool = False) -> None:
        with self._turns:
            self._busy = False
            self._background_turn = background_next and self._background_waits > 0
            self._turns.notify_all()


def _rows(prompts: torch.Tensor | None, start: int, count: int) -> torch.Tensor | None:
    """Per-sample prompts (batch, depth, n, width) follow their images; shared ones serve every slice."""
    if prompts is None or prompts.dim() == 3:
        return prompts
    return prompts[start:start + count]
