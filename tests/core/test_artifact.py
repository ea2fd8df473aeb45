from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from upt.artifact import CONFIG_FILE, TENSORS_FILE, load_artifact, load_serving_artifact
from upt.backbone import load_backbone
from upt.data import eval_transform, scan_image_folder
from upt.errors import ArtifactError, BackboneMismatchError
from upt.methods import PromptConfig, PromptedCLIP
from upt.predict import Predictor
from upt.tiny import TINY_MODEL, write_tiny_checkpoint
from upt.training import TrainConfig, train


@pytest.fixture(scope="module")
def trained(tiny, fashion_train, tmp_path_factory):
    config = TrainConfig.of("upt", shots=4, epochs=2, lr=0.05, batch_size=8)
    return train(tiny, fashion_train, config, tmp_path_factory.mktemp("artifact") / "upt")


def test_loading_an_artifact_reproduces_the_trained_logits(tiny, trained, fashion_test):
    artifact = load_artifact(trained.artifact_dir)
    model = PromptedCLIP(tiny, artifact.class_names, PromptConfig.from_dict(artifact.config["prompt"]))
    model.load_state_dict(artifact.prompt_state())
    model.eval()
    samples = scan_image_folder(fashion_test, artifact.class_names).samples[::5]
    transform = eval_transform(tiny.image)
    with Image.open(samples[0].path) as probe:
        assert probe.size == (28, 28)
    batch = torch.stack([transform(Image.open(s.path).convert("RGB")) for s in samples])
    with torch.no_grad():
        expected = model(batch)
    served = Predictor.from_artifact(tiny, trained.artifact_dir).logits(batch)
    assert torch.equal(served, expected)


def test_artifact_records_what_produced_it(tiny, trained):
    config = json.loads((trained.artifact_dir / CONFIG_FILE).read_text())
    assert config["method"] == "upt"
    assert config["backbone"] == tiny.describe()
    assert config["class_names"] == ["bag", "pullover", "sneaker", "trouser"]
    assert config["train"]["shots"] == 4 and config["prompt"]["n_ctx"] == 4
    assert config["metrics"]["trainable_parameters"] > 0 and config["library_version"]


def test_loading_on_another_backbone_fails_clearly(trained, tmp_path):
    other = load_backbone(TINY_MODEL, str(write_tiny_checkpoint(tmp_path / "other.pt", seed=7)), "cpu")
    with pytest.raises(BackboneMismatchError, match="trained on upt-tiny"):
        Predictor.from_artifact(other, trained.artifact_dir)


def test_corrupted_or_incomplete_artifacts_fail_clearly(tiny, trained, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CONFIG_FILE).write_bytes((trained.artifact_dir / CONFIG_FILE).read_bytes())
    with pytest.raises(ArtifactError, match="prompts.safetensors is missing"):
        load_artifact(broken)
    data = bytearray((trained.artifact_dir / TENSORS_FILE).read_bytes())
    data[-3] ^= 0xFF  # one flipped bit in a tensor
    (broken / TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupted"):
        Predictor.from_artifact(tiny, broken)
    (broken / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupted"):
        load_artifact(broken)


def _tensor_bytes(tensors_file, name: str) -> tuple[int, int]:
    """Where tensor `name` lies in a safetensors file (start, end), from the file's own header."""
    data = tensors_file.read_bytes()
    header_size = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + header_size])[name]["data_offsets"]
    return 8 + header_size + start, 8 + header_size + end


def _copy_with_flipped_byte(source, target, tensor: str):
    target.mkdir()
    (target / CONFIG_FILE).write_bytes((source / CONFIG_FILE).read_bytes())
    data = bytearray((source / TENSORS_FILE).read_bytes())
    start, end = _tensor_bytes(source / TENSORS_FILE, tensor)
    data[(start + end) // 2] ^= 0x01
    (target / TENSORS_FILE).write_bytes(bytes(data))
    return target


def test_serving_reads_only_the_serving_tensors_without_hashing_the_file(tiny, trained, monkeypatch):
    from upt import artifact as artifact_module

    config = json.loads((trained.artifact_dir / CONFIG_FILE).read_text())
    assert set(config["tensor_sha256"]) >= {"classifier", "visual_prompts", "prompt.prompts.unified"}

    def whole_file_hashed(path):
        raise AssertionError(f"a serving load hashed all of {path}")

    monkeypatch.setattr(artifact_module, "_sha256", whole_file_hashed)
    served = load_serving_artifact(trained.artifact_dir)
    assert set(served.tensors) == {"classifier", "visual_prompts"}
    monkeypatch.undo()
    full = load_artifact(trained.artifact_dir)
    for name in ("classifier", "visual_prompts"):
        assert torch.equal(served.tensors[name], full.tensors[name])


def test_serving_checks_each_serving_tensor_and_ignores_a_damaged_parameter(tiny, trained, tmp_path):
    for tensor in ("classifier", "visual_prompts"):
        broken = _copy_with_flipped_byte(trained.artifact_dir, tmp_path / tensor, tensor)
        with pytest.raises(ArtifactError, match=f"tensor '{tensor}' does not match its sha256"):
            Predictor.from_artifact(tiny, broken)
    theta = next(n for n in load_artifact(trained.artifact_dir).tensors if n.startswith("prompt.prompts.mixer."))
    damaged = _copy_with_flipped_byte(trained.artifact_dir, tmp_path / "theta", theta)
    Predictor.from_artifact(tiny, damaged)  # serving never reads θ...
    with pytest.raises(ArtifactError, match="corrupted"):
        load_artifact(damaged)  # ...while resuming or inspecting reads and checks all of it


def test_an_artifact_without_per_tensor_hashes_is_checked_whole(tiny, trained, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((trained.artifact_dir / CONFIG_FILE).read_text())
    del config["tensor_sha256"]  # as written before per-tensor hashes
    (old / CONFIG_FILE).write_text(json.dumps(config))
    data = (trained.artifact_dir / TENSORS_FILE).read_bytes()
    (old / TENSORS_FILE).write_bytes(data)
    served = load_serving_artifact(old)
    assert set(served.tensors) == {"classifier", "visual_prompts"}
    damaged = bytearray(data)
    damaged[-3] ^= 0x01
    (old / TENSORS_FILE).write_bytes(bytes(damaged))
    with pytest.raises(ArtifactError, match="its sha256 does not match"):
        load_serving_artifact(old)
