"""Serving internals in process: the byte-bounded predictor caches and the shared encoder passes."""

from __future__ import annotations

import pytest
import torch

from service.runtime import LruCache
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
