"""The OpenVINO image encoder serves the features of the PyTorch tower, and the runtime is chosen
(and falls back) as the settings say."""

from __future__ import annotations

import pytest
import torch

from upt import compiled
from upt.serving import TorchImageEncoder, build_image_encoder

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def encoders(tiny, tmp_path_factory):
    cache = tmp_path_factory.mktemp("compiled")
    return compiled.OpenVinoImageEncoder(tiny, "fp32", cache), TorchImageEncoder(tiny), cache


def _images(tiny, n: int) -> torch.Tensor:
    return torch.randn(n, 3, tiny.image.size, tiny.image.size, generator=torch.Generator().manual_seed(n))


def test_openvino_fp32_features_equal_pytorch(tiny, encoders):
    openvino, pytorch, _ = encoders
    images = _images(tiny, 5)
    torch.testing.assert_close(openvino(images, None), pytorch(images, None), atol=2e-6, rtol=0)
    for depth in (1, 2, tiny.vision_layers):
        for n in (1, 4, 7):  # one compiled graph for every prompt count and depth
            shared = torch.randn(depth, n, tiny.vision_width) * 0.1
            torch.testing.assert_close(openvino(images, shared), pytorch(images, shared), atol=2e-6, rtol=0)
            per_sample = torch.randn(5, depth, n, tiny.vision_width) * 0.1
            torch.testing.assert_close(openvino(images, per_sample), pytorch(images, per_sample), atol=2e-6, rtol=0)


def test_the_compiled_model_is_cached_on_disk_and_read_back(tiny, encoders, monkeypatch):
    _, pytorch, cache = encoders
    saved = sorted(p.name for p in next(cache.iterdir()).iterdir())
    assert saved == ["blobs", "plain.bin", "plain.xml", "prompted.bin", "prompted.xml"]

    def no_conversion(self, ov, kind):
        raise AssertionError("converted again although the cache holds the model")

    monkeypatch.setattr(compiled.OpenVinoImageEncoder, "_convert", no_conversion)
    again = compiled.OpenVinoImageEncoder(tiny, "fp32", cache)
    images = _images(tiny, 2)
    torch.testing.assert_close(again(images, None), pytorch(images, None), atol=2e-6, rtol=0)


def test_bf16_features_stay_close(tiny, encoders):
    if not compiled.cpu_has_bf16():
        pytest.skip("this CPU has no bf16 units")
    _, pytorch, cache = encoders
    images, prompts = _images(tiny, 4), torch.randn(1, 4, tiny.vision_width) * 0.1
    bf16 = compiled.OpenVinoImageEncoder(tiny, "bf16", cache)(images, prompts)
    exact = pytorch(images, prompts)
    assert 0 < (bf16 - exact).abs().max() < 0.05  # rounded, but the same features
    assert torch.nn.functional.cosine_similarity(bf16, exact, dim=-1).min() > 0.999


def test_runtime_selection_and_fallback(tiny, encoders, tmp_path, monkeypatch):
    encoder, note = build_image_encoder(tiny, "auto", "auto", encoders[2])
    assert encoder.runtime == "openvino" and note == ""
    assert encoder.precision == ("bf16" if compiled.cpu_has_amx() else "fp32")
    encoder, note = build_image_encoder(tiny, "pytorch", "auto", tmp_path)
    assert (encoder.runtime, encoder.precision, note) == ("pytorch", "fp32", "")

    monkeypatch.setattr(compiled, "openvino_available", lambda: False)  # as without the service extra
    encoder, note = build_image_encoder(tiny, "auto", "auto", tmp_path)
    assert (encoder.runtime, encoder.precision, note) == ("pytorch", "fp32", "")
    encoder, note = build_image_encoder(tiny, "openvino", "fp32", tmp_path)
    assert encoder.runtime == "pytorch" and note == "OpenVINO is not installed"
    monkeypatch.undo()

    def broken(self, ov, kind):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(compiled.OpenVinoImageEncoder, "_convert", broken)
    encoder, note = build_image_encoder(tiny, "openvino", "fp32", tmp_path / "fresh")
    assert encoder.runtime == "pytorch" and "OpenVINO failed (RuntimeError: unsupported operation)" in note
    with pytest.raises(ValueError, match="runtime must be one of"):
        build_image_encoder(tiny, "tensorrt", "auto", tmp_path)
