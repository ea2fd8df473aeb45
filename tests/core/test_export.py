"""Export: every method with a fixed classifier becomes one ONNX / OpenVINO model whose top-1 on
held-out images equals the Predictor's, and which ONNX Runtime runs without upt or torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T

from upt.artifact import load_serving_artifact
from upt.cli import main as cli_main
from upt.data import read_image_file, scan_image_folder
from upt.errors import ConfigError
from upt.export import INPUT, export_artifact, export_predictor
from upt.methods.registry import SPECS
from upt.predict import Predictor
from upt.training import TrainConfig, train

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

STANDALONE = Path(__file__).with_name("standalone_onnx.py")
# Every method of the registry: a new one is tested here without a line added.
EXPORTABLE = [spec.name for spec in SPECS]
LARGE_BATCH = 300
# fp32 graphs of the same arithmetic: logits agree to float rounding (|logit| ≲ 15 on the tiny model).
LOGIT_ATOL = 1e-3


# A brief training, in the options of every method that takes them; the others keep the method's defaults.
BRIEF = {"shots": 2, "seed": 1, "epochs": 1, "iterations": 30, "batch_size": 8, "augment_views": 2}


def _options(spec) -> dict:
    """BRIEF's options the method takes, with prompts two layers deep where it allows (the tiny
    towers have three)."""
    options = {name: value for name, value in BRIEF.items() if spec.takes(name)}
    if spec.takes("depth") and (spec.depth.maximum or 2) >= 2:
        options["depth"] = 2
    return options


@pytest.fixture(scope="module", params=EXPORTABLE)
def trained(request, pretrained_tiny, fashion_train, tmp_path_factory):
    spec = next(s for s in SPECS if s.name == request.param)
    config = TrainConfig.of(spec.name, **_options(spec))
    result = train(pretrained_tiny, fashion_train, config, tmp_path_factory.mktemp(spec.name) / "artifact")
    return spec.name, result.artifact_dir


@pytest.fixture(scope="module")
def held_out(fashion_test) -> tuple[list[Path], list]:
    paths = [sample.path for sample in scan_image_folder(fashion_test).samples]
    return paths, [read_image_file(path) for path in paths]


def _pixels(backbone, images) -> torch.Tensor:
    """The exported model's input: the eval transform without its normalisation (the graph has it)."""
    spec = backbone.image
    transform = T.Compose([T.Resize(spec.size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(spec.size),
                           T.ToTensor()])
    return torch.stack([transform(image) for image in images])


def test_the_onnx_model_gives_the_predictors_top_1_and_logits(trained, pretrained_tiny, held_out, tmp_path):
    method, artifact_dir = trained
    paths, images = held_out
    predictor = Predictor.from_artifact(pretrained_tiny, artifact_dir)
    batch = predictor.preprocess(images)
    expected = predictor.logits(batch)
    # What the method adds beyond its classifier (prompts, adapters, a cache) moves the logits far more
    # than the tolerance, so a graph that left it out would fail; CoOp and zero-shot add nothing.
    added = float((expected - Predictor(pretrained_tiny, predictor.class_names, predictor.classifier).logits(batch))
                  .abs().max())
    assert added == 0 or added > 10 * LOGIT_ATOL, (method, added)
    model, = export_artifact(artifact_dir, "onnx", tmp_path / "model.onnx", backbone=pretrained_tiny)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits, probabilities = session.run(["logits", "probabilities"], {INPUT: _pixels(pretrained_tiny, images).numpy()})
    assert torch.equal(torch.from_numpy(logits).argmax(dim=1), expected.argmax(dim=1)), method
    torch.testing.assert_close(torch.from_numpy(logits), expected.float(), atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(torch.from_numpy(probabilities), expected.float().softmax(dim=1), atol=1e-4, rtol=0)

    # A batch larger than any the predictor chunks by (CoCoOp: 1024 text prompts a pass): the graph
    # was traced on 2 images and must not keep that trace's chunk count.
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (pretrained_tiny.image.mean, pretrained_tiny.image.std))
    large = torch.rand(LARGE_BATCH, 3, pretrained_tiny.image.size, pretrained_tiny.image.size,
                       generator=torch.Generator().manual_seed(0))
    logits, = session.run(["logits"], {INPUT: large.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), predictor.logits((large - mean) / std).float(),
                               atol=LOGIT_ATOL, rtol=0)

    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["class_names"]) == predictor.class_names
    assert metadata["method"] == load_serving_artifact(artifact_dir).config["method"]
    standalone = subprocess.run([sys.executable, str(STANDALONE), str(model), *map(str, paths)],
                                capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert standalone.returncode == 0, standalone.stderr
    answer = json.loads(standalone.stdout)
    assert answer["loaded"] == []
    assert answer["labels"] == [predictor.class_names[i] for i in expected.argmax(dim=1)], method
    torch.testing.assert_close(torch.tensor(answer["logits"]), expected.float(), atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("method", [m for m in ("vpt-deep", "upt", "tip-adapter-f") if m in EXPORTABLE])
def test_the_openvino_model_gives_the_predictors_top_1(method, pretrained_tiny, fashion_train, held_out, tmp_path):
    ov = pytest.importorskip("openvino")
    spec = next(s for s in SPECS if s.name == method)
    artifact_dir = train(pretrained_tiny, fashion_train, TrainConfig.of(method, **_options(spec)),
                         tmp_path / "artifact").artifact_dir
    _, images = held_out
    predictor = Predictor.from_artifact(pretrained_tiny, artifact_dir)
    expected = predictor.logits(predictor.preprocess(images))
    xml, binary = export_artifact(artifact_dir, "openvino", tmp_path / "model", backbone=pretrained_tiny)
    assert xml.name == "model.xml" and binary.is_file()
    model = ov.Core().read_model(xml)
    assert json.loads(model.get_rt_info(["upt", "class_names"]).astype(str)) == predictor.class_names
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    logits = torch.from_numpy(compiled([_pixels(pretrained_tiny, images).numpy()])["logits"].copy())
    assert torch.equal(logits.argmax(dim=1), expected.argmax(dim=1))
    torch.testing.assert_close(logits, expected.float(), atol=LOGIT_ATOL, rtol=0)


def test_an_unknown_format_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match="onnx, openvino") as raised:
        export_artifact(tmp_path / "no-such-artifact", "tflite", tmp_path / "model")
    assert raised.value.field == "format"


def test_upt_export_writes_the_model(tiny, fashion_train, tmp_path, capsys):
    artifact_dir = train(tiny, fashion_train, TrainConfig.of("zero-shot"), tmp_path / "a").artifact_dir
    code = cli_main(["export", "--artifact", str(artifact_dir), "--format", "onnx", "--out",
                     str(tmp_path / "m.onnx"), "--pretrained", tiny.pretrained, "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out) == {"format": "onnx", "files": [str(tmp_path / "m.onnx")]}
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "probabilities"]


def assert_runs_as_the_predictor(model, predictor: Predictor, seed: int) -> None:
    """ONNX Runtime's logits of 5 random images in [0, 1] equal the predictor's of the same images
    normalised as the model's metadata says (the graph normalises them itself), with a dynamic batch."""
    spec = predictor.backbone.image
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    pixels = torch.rand(5, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(seed))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (spec.mean, spec.std))
    logits, = session.run(["logits"], {INPUT: pixels.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), predictor.logits((pixels - mean) / std), atol=LOGIT_ATOL,
                               rtol=0)


def test_a_predictor_built_in_python_exports_too(tiny, tmp_path):
    """Not only artifacts: any predictor, e.g. zero-shot over class names, with the batch left dynamic."""
    predictor = Predictor.zero_shot(tiny, ["cat", "dog", "bird"])
    model, = export_predictor(predictor, "onnx", tmp_path / "zero-shot.onnx")
    assert_runs_as_the_predictor(model, predictor, seed=0)


def test_a_tower_whose_attention_takes_pytorchs_fast_path_exports(tmp_path):
    """In eval mode without gradients, nn.MultiheadAttention runs a fused kernel (an even head count,
    as ViT-B-16's 12) that the ONNX exporter cannot write: the export turns that path off. upt-asym
    has four vision heads (upt-tiny three) and average-pools its patches (upt-tiny takes [CLS])."""
    from asymmetric import ASYMMETRIC, register_test_configs
    from upt.backbone import random_backbone

    register_test_configs()
    backbone = random_backbone(ASYMMETRIC, "cpu", seed=1)
    names = ["cat", "dog", "bird"]
    prompts = torch.randn(backbone.vision_layers, 4, backbone.vision_width,
                          generator=torch.Generator().manual_seed(1)) * 0.02
    predictor = Predictor(backbone, names, Predictor.zero_shot(backbone, names).classifier, prompts)
    model, = export_predictor(predictor, "onnx", tmp_path / "fast-path.onnx")
    assert_runs_as_the_predictor(model, predictor, seed=2)
    assert torch.backends.mha.get_fastpath_enabled()  # turned back on for serving

