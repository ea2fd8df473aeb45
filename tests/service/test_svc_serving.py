"""Serving internals in process: the byte-bounded predictor caches and the shared encoder passes."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch

from service.serving_cache import LruCache
from service.settings import Settings
from upt.predict import Predictor


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    from upt.backbone import load_backbone
    from upt.tiny import TINY_MODEL

    return load_backbone(TINY_MODEL, str(tiny_checkpoint), "cpu")


def test_predictor_caches_are_bounded_by_bytes_not_a_count(tiny):
    small = [Predictor(tiny, ["a", "b"], torch.randn(2, 32)) for _ in range(100)]
    weight = small[0].nbytes
    cache = LruCache(max_bytes=50 * weight, weigh=lambda p: getattr(p, "nbytes", weight))
    for index, predictor in enumerate(small):
        cache.get_or_create(index, lambda p=predictor: p)
    assert len(cache) == 50 and cache.bytes <= 50 * weight  # far more than the old count of 8
    assert cache.get_or_create(99, lambda: None) is small[99]  # the most recent are kept
    assert cache.get_or_create(0, lambda: "rebuilt") == "rebuilt"  # the oldest were evicted
    big = Predictor(tiny, [str(i) for i in range(150)], torch.randn(150, 32))
    assert 10 * weight < big.nbytes < 50 * weight
    cache.get_or_create("big", lambda: big)
    assert cache.bytes <= 50 * weight and cache.get_or_create("big", lambda: None) is big
    assert len(cache) < 50  # one large predictor displaced many small ones
    cache.discard("big")
    assert "big" not in cache._items and cache.bytes == sum(w for _, w in cache._items.values())


def test_ten_thousand_tuned_tasks_fit_in_the_default_cache(tiny):
    upt_shallow = Predictor(tiny, [f"class {i}" for i in range(10)], torch.randn(10, 512),
                            torch.randn(1, 4, 768))  # a 10-class UPT task on ViT-B-16: W and 4 visual tokens
    assert 10_000 * upt_shallow.nbytes < Settings().predictor_cache_bytes < 1024 ** 3


def _mixed_requests(tiny):
    """Zero-shot, a CoOp-like task (W only), and visual-prompt tasks of 4 tokens: four shallow, two deep."""
    generator = torch.Generator().manual_seed(0)
    width, dim = tiny.vision_width, tiny.clip.text_projection.shape[1]
    names = ["a", "b", "c"]

    def tuned(prompt_shape=None):
        prompts = None if prompt_shape is None else torch.randn(*prompt_shape, width, generator=generator) * 0.1
        return Predictor(tiny, names, torch.nn.functional.normalize(torch.randn(3, dim, generator=generator), dim=-1),
                         prompts)

    deep = (tiny.vision_layers, 4)
    predictors = [Predictor.zero_shot(tiny, names), tuned(), tuned((1, 4)), tuned((1, 4)), tuned((1, 4)),
                  tuned(deep), tuned((1, 4)), tuned(deep)]
    size = tiny.image.size
    return [(p, torch.randn(n, 3, size, size, generator=generator))
            for p, n in zip(predictors, (2, 1, 3, 1, 2, 2, 1, 1))]


def test_one_pass_serves_many_tasks_with_the_results_of_the_per_task_path(tiny):
    """Bit for bit what each task's own prompts and classifier give on the same pass's images.

    (A matrix product's last bits depend on the batch size on CPU, so a request computed alone can
    differ from one micro-batched with others in the last float bits, tested here to 1e-5; that was
    already so when only requests of one task were batched together.)
    """
    from upt.encoders import encode_image

    from service.batching import MicroBatcher

    requests = _mixed_requests(tiny)
    passes = []
    images = sum(len(batch) for _, batch in requests)
    # The window closes when all have come.
    batcher = MicroBatcher(window_s=30, max_batch=images, observe=lambda n, seconds: passes.append(n))
    futures = []
    for predictor, batch in requests:  # queued before the batcher's window closes: one round
        future = Future()
        futures.append(future)
        batcher._queue.put((predictor, batch, future, None))
    # The batcher encodes; each request's head runs on its own thread, as MicroBatcher.logits does.
    results = [predictor.head(future.result(timeout=60)) for (predictor, _), future in zip(requests, futures)]
    # raw features (zero-shot + W-only: 3 images), 4 prompt tokens of six tasks, shallow and deep (10)
    assert sorted(passes) == [3, 10]

    def need(predictor):
        return None if predictor.visual_prompts is None else tuple(predictor.visual_prompts.shape[1:])

    for index, (predictor, batch) in enumerate(requests):
        group = [i for i, (p, _) in enumerate(requests) if need(p) == need(predictor)]
        same_pass = torch.cat([requests[i][1] for i in group])
        start = sum(len(requests[i][1]) for i in group[:group.index(index)])
        with torch.no_grad():
            own = encode_image(tiny.clip, same_pass, predictor.visual_prompts, normalize=True)
        assert torch.equal(results[index], predictor.head(own[start:start + len(batch)]))
        assert torch.allclose(results[index], predictor.logits(batch), atol=1e-5)


def test_requests_that_queue_during_a_pass_go_in_the_next_one_at_once(tiny):
    """After a CPU pass the next starts at once with what queued meanwhile: waiting the window for more
    only left the encoder idle. (The 60 s window here would have held them for a minute.)"""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from service.batching import MicroBatcher
    from svc_helpers import wait_until

    passes: list[int] = []
    holding, release = threading.Event(), threading.Event()
    classifier = torch.randn(2, 32)  # the tiny backbone's embedding width

    def encoder(images, prompts, normalize=True, depths=None):
        passes.append(len(images))
        if len(passes) == 1:  # the first pass runs until the later requests have queued
            holding.set()
            assert release.wait(30)
        return torch.zeros(len(images), classifier.shape[1])

    predictor = Predictor(tiny, ["a", "b"], classifier)
    batcher = MicroBatcher(window_s=60, max_batch=4, encoder=lambda backbone: encoder)
    image = torch.zeros(1, 3, tiny.image.size, tiny.image.size)
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(batcher.logits, predictor, image.expand(4, -1, -1, -1))  # a full pass: no window
        assert holding.wait(30)
        later = [pool.submit(batcher.logits, predictor, image) for _ in range(2)]
        wait_until(lambda: batcher._queue.qsize() == 2, "two requests queued during the pass")
        release.set()
        assert first.result(timeout=30).shape == (4, 2)
        assert [future.result(timeout=20).shape for future in later] == [(1, 2), (1, 2)]
    assert passes == [4, 2]
