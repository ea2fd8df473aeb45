"""The OpenVINO image encoder serves the features of the PyTorch tower, and the runtime is chosen
(and falls back) as the settings say."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from upt import compiled
from upt.data import read_image_file, scan_image_folder
from upt.encoders import encode_image
from upt.errors import DataError
from upt.predict import Predictor
from upt.serving import TorchImageEncoder, build_image_encoder, calibration_images

ov = pytest.importorskip("openvino")

FASHION = Path(__file__).resolve().parents[1] / "fixtures" / "fashion_mnist"
# int8's bar, the issue's for any serving precision: top-1 agreement with PyTorch fp32 of at least
# 99.5 %. Its logits (13.8 × cosine on the pretrained tiny model) moved by at most 0.67 in
# bench/encoder_runtimes.py (README, Speed); a bound of 1.5 catches a broken quantization, not rounding.
INT8_MIN_AGREEMENT, INT8_MAX_LOGIT_CHANGE = 0.995, 1.5


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
            depths = torch.tensor([1, depth, 1, depth, max(1, depth - 1)])  # tasks of several depths, one pass
            torch.testing.assert_close(openvino(images, per_sample, depths=depths),
                                       pytorch(images, per_sample, depths=depths), atol=2e-6, rtol=0)


def test_raw_features_are_the_pytorch_towers_before_normalisation(tiny, encoders):
    """Tip-Adapter's cache averages raw features over views before normalising, so the instant stage
    asks the serving encoder for raw ones: the graph gives them, and normalising is the caller's."""
    openvino, pytorch, _ = encoders
    images = _images(tiny, 4)
    raw = openvino(images, None, normalize=False)
    expected = encode_image(tiny.clip, images, None, normalize=False)
    torch.testing.assert_close(raw, expected, atol=2e-6 * float(expected.norm(dim=-1).max()), rtol=0)
    assert float(raw.norm(dim=-1).min()) > 1.5 or float(raw.norm(dim=-1).max()) < 0.5  # not unit-length
    torch.testing.assert_close(openvino(images, None), F.normalize(raw, dim=-1), atol=1e-7, rtol=0)
    torch.testing.assert_close(pytorch(images, None, normalize=False), expected, atol=0, rtol=0)


def test_graphs_of_an_earlier_format_are_not_read(tiny):
    """The cache folder's name says what its graphs compute: one written when they gave normalised
    features, took one replace mask for the whole batch, or ran the last block at every token, is
    another folder, never read as this release's."""
    assert compiled._cache_key(tiny).endswith("-sample-depths-cls-last")


def test_graphs_saved_by_another_release_are_removed_and_others_kept(tiny, tmp_path):
    """An upgrade must not leave the previous release's graphs behind (over 1 GB for ViT-B-16): the
    folders of the same backbone and weights saved by another release go, any other backbone's stay."""
    current = compiled._cache_key(tiny)
    stale = [tmp_path / f"{tiny.name}-{tiny.weights_sha256[:16]}-upt0.0.1",  # an older release
             tmp_path / current.removesuffix("-sample-depths-cls-last"),  # this release before raw features
             tmp_path / current.replace("-sample-depths-cls-last", "-raw-features"),  # ... depths per sample
             tmp_path / current.removesuffix("-cls-last")]  # ... or the last block at [CLS] only
    kept = [tmp_path / f"ViT-B-16-{'0' * 16}-upt0.0.1", tmp_path / f"{tiny.name}-{'f' * 16}-upt0.0.1"]
    for folder in stale + kept:
        folder.mkdir()
        (folder / "plain.bin").write_bytes(b"weights")
    compiled.OpenVinoImageEncoder(tiny, "fp32", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([current, *(k.name for k in kept)])


def test_a_damaged_cached_graph_is_converted_again_and_replaced(tiny, tmp_path):
    compiled.OpenVinoImageEncoder(tiny, "fp32", tmp_path)
    (next(tmp_path.iterdir()) / "plain.xml").write_text("<net version=")  # cut short, as by a crash
    encoder = compiled.OpenVinoImageEncoder(tiny, "fp32", tmp_path)
    assert encoder.cache_problems == ["plain.xml unreadable (RuntimeError), converted again"]
    images = _images(tiny, 2)
    torch.testing.assert_close(encoder(images, None), TorchImageEncoder(tiny)(images, None), atol=2e-6, rtol=0)
    assert compiled.OpenVinoImageEncoder(tiny, "fp32", tmp_path).cache_problems == []  # the file was replaced


def test_each_precision_keeps_its_own_blobs_and_a_restart_imports_them(tiny, tmp_path):
    """OpenVINO's blob key leaves the precision hint out: with one blob folder a bf16 encoder imported
    the blob an exact-fp32 start had compiled (ViT-B-16 then gave NaN features, three times slower).
    And a first start compiled the converted model, whose key no restart's saved model matched."""
    def blobs() -> dict[str, list[str]]:
        root = next(tmp_path.iterdir()) / "blobs"
        return {folder.name: sorted(p.name for p in folder.iterdir()) for folder in root.iterdir() if folder.is_dir()}

    compiled.OpenVinoImageEncoder(tiny, "fp32", tmp_path)
    first = blobs()
    assert len(first) == 1 and len(next(iter(first.values()))) == 2  # the plain and the prompted graph
    compiled.OpenVinoImageEncoder(tiny, "fp32", tmp_path)
    assert blobs() == first  # imported, not compiled again
    compiled.OpenVinoImageEncoder(tiny, "bf16", tmp_path)
    both = blobs()
    assert len(both) == 2 and both.items() >= first.items()  # bf16 compiled its own, beside fp32's
    assert all(name.startswith(("f32-", "bf16-")) for name in both)


def test_blobs_of_the_single_folder_layout_are_removed(tiny, tmp_path):
    compiled.OpenVinoImageEncoder(tiny, "fp32", tmp_path)
    stale = next(tmp_path.iterdir()) / "blobs" / "1234.blob"  # as an earlier release kept them
    stale.write_bytes(b"a blob of some precision")
    compiled.OpenVinoImageEncoder(tiny, "fp32", tmp_path)
    assert not stale.exists()


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


def test_bf16_is_chosen_only_on_the_measured_kinds_of_bf16_units(monkeypatch):
    """AMX or AVX-512 BF16 in /proc/cpuinfo, and OpenVINO's bf16 capability: nothing else."""
    import openvino as ov

    reported = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    for flags, expected in (("fpu avx2 avx_vnni", False), ("fpu avx512f avx512_bf16", reported),
                            ("fpu amx_tile amx_bf16", reported)):
        monkeypatch.setattr(compiled.Path, "read_text", lambda self, flags=flags: f"flags\t\t: {flags}\n")
        assert compiled.cpu_has_bf16() is expected, flags


def test_runtime_selection_and_fallback(tiny, encoders, tmp_path, monkeypatch):
    encoder, note = build_image_encoder(tiny, "auto", "auto", encoders[2])
    assert encoder.runtime == "openvino" and note == ""
    assert encoder.precision == ("bf16" if compiled.cpu_has_bf16() else "fp32")
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


def test_a_compiled_encoder_that_disagrees_with_pytorch_at_start_does_not_serve(tiny, tmp_path, monkeypatch):
    """A fault that raises nothing (a compiled blob of another precision gave NaN features) is caught
    at start, and PyTorch serves; exact fp32 is held to exact."""
    real_call = compiled.OpenVinoImageEncoder.__call__

    def nan(self, images, prompts, normalize=True, depths=None):
        return real_call(self, images, prompts, normalize, depths=depths) * float("nan")

    monkeypatch.setattr(compiled.OpenVinoImageEncoder, "__call__", nan)
    encoder, note = build_image_encoder(tiny, "openvino", "bf16", tmp_path)
    assert encoder.runtime == "pytorch" and "at start, its unprompted features are not finite" in note

    def bf16_rounded(self, images, prompts, normalize=True, depths=None):
        return real_call(self, images, prompts, normalize, depths=depths).bfloat16().float()

    monkeypatch.setattr(compiled.OpenVinoImageEncoder, "__call__", bf16_rounded)
    encoder, note = build_image_encoder(tiny, "openvino", "fp32", tmp_path)
    assert encoder.runtime == "pytorch" and "from PyTorch fp32's in 1 - cosine (at most 1e-06)" in note
    encoder, note = build_image_encoder(tiny, "openvino", "bf16", tmp_path)  # within bf16's own tolerance
    assert (encoder.runtime, note) == ("openvino", "")


@pytest.fixture(scope="module")
def int8(pretrained_tiny, tmp_path_factory):
    pytest.importorskip("nncf", reason="int8 needs NNCF (pip install nncf, the int8 extra: pip install 'upt[service,int8]')")
    cache = tmp_path_factory.mktemp("int8")
    calibration = calibration_images(pretrained_tiny, FASHION / "train")  # 64 real images, none tested on
    encoder, note = build_image_encoder(pretrained_tiny, "openvino", "int8", cache, calibration)
    assert (encoder.runtime, encoder.precision, note) == ("openvino", "int8", "")
    return encoder, cache, calibration


def _fashion_test_images(backbone) -> tuple[torch.Tensor, list[str]]:
    """The fixture's 40 held-out Fashion-MNIST test images, and the same mirrored: 80."""
    folder = scan_image_folder(FASHION / "test")
    images = Predictor.zero_shot(backbone, folder.class_names).preprocess(
        [read_image_file(sample.path) for sample in folder.samples])
    return torch.cat([images, images.flip(-1)]), folder.class_names


def test_int8_agrees_with_fp32_on_the_pretrained_tiny_model(pretrained_tiny, int8):
    encoder, _, _ = int8
    images, class_names = _fashion_test_images(pretrained_tiny)
    predictor = Predictor.zero_shot(pretrained_tiny, class_names)
    deep = torch.randn(pretrained_tiny.vision_layers, 4, pretrained_tiny.vision_width,
                       generator=torch.Generator().manual_seed(0)) * 0.15  # a trained VPT-deep's scale
    for prompts in (None, deep):
        exact = predictor.head(TorchImageEncoder(pretrained_tiny)(images, prompts))
        served = predictor.head(encoder(images, prompts))
        agreement = (served.argmax(-1) == exact.argmax(-1)).float().mean().item()
        change = (served - exact).abs().max().item()
        assert agreement >= INT8_MIN_AGREEMENT and 0 < change < INT8_MAX_LOGIT_CHANGE, (agreement, change)


def test_the_int8_model_is_cached_per_calibration_set(pretrained_tiny, int8, monkeypatch):
    encoder, cache, calibration = int8
    images = _fashion_test_images(pretrained_tiny)[0][:4]

    def no_quantization(self, model, kind):
        raise AssertionError("quantized again although the cache holds the int8 model")

    monkeypatch.setattr(compiled.OpenVinoImageEncoder, "_quantize", no_quantization)
    again = compiled.OpenVinoImageEncoder(pretrained_tiny, "int8", cache, calibration=calibration)
    torch.testing.assert_close(again(images, None), encoder(images, None), atol=1e-6, rtol=0)  # the same graph
    with pytest.raises(AssertionError, match="quantized again"):  # other images: other ranges
        compiled.OpenVinoImageEncoder(pretrained_tiny, "int8", cache, calibration=calibration[:8])


def test_int8_quantizes_graphs_whose_last_block_runs_at_every_position(pretrained_tiny, tmp_path, monkeypatch):
    """Quantized with the last block at [CLS] only, int8 agreed with fp32 less (VPT-deep 98.75 % of
    400 views against 99.50 %, bench/encoder_runtimes.py), so its graphs keep that block whole; the
    fp32 and bf16 graphs do not."""
    pytest.importorskip("nncf")
    quantized = []

    def keep_unquantized(self, model, kind):
        quantized.append(model)
        return model

    monkeypatch.setattr(compiled.OpenVinoImageEncoder, "_quantize", keep_unquantized)
    calibration = calibration_images(pretrained_tiny, FASHION / "train", limit=2)
    compiled.OpenVinoImageEncoder(pretrained_tiny, "int8", tmp_path, calibration=calibration)
    compiled.OpenVinoImageEncoder(pretrained_tiny, "fp32", tmp_path)
    fp32 = ov.Core().read_model(next(tmp_path.rglob("plain.xml")))
    last_mlp = f"resblocks.{pretrained_tiny.vision_layers - 1}.mlp.c_fc"
    tokens = 1 + (pretrained_tiny.image.size // pretrained_tiny.clip.visual.patch_size[0]) ** 2

    def last_mlp_positions(model) -> set:
        return {op.get_output_partial_shape(0)[1].get_length() for op in model.get_ops()
                if op.get_type_name() == "MatMul" and last_mlp in op.get_friendly_name()}

    assert len(quantized) == 2  # the plain graph and the prompted one
    assert last_mlp_positions(quantized[0]) == {tokens} and last_mlp_positions(fp32) == {1}


def test_int8_is_asked_for_by_name_with_images_and_falls_back_without_nncf(pretrained_tiny, tmp_path, monkeypatch):
    calibration = calibration_images(pretrained_tiny, FASHION / "train", limit=8)
    assert calibration.shape == (8, 3, pretrained_tiny.image.size, pretrained_tiny.image.size)
    with pytest.raises(ValueError, match="needs calibration images"):
        build_image_encoder(pretrained_tiny, "openvino", "int8", tmp_path)
    with pytest.raises(ValueError, match="OpenVINO only"):
        build_image_encoder(pretrained_tiny, "pytorch", "int8", tmp_path, calibration)
    with pytest.raises(DataError, match="No images"):
        calibration_images(pretrained_tiny, tmp_path)
    monkeypatch.setattr(compiled, "nncf_available", lambda: False)
    encoder, note = build_image_encoder(pretrained_tiny, "auto", "int8", tmp_path, calibration)
    assert (encoder.runtime, encoder.precision) == ("openvino", "fp32") and "int8 needs NNCF" in note
