from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from upt.artifact import CONFIG_FILE, TENSORS_FILE, load_artifact
from upt.backbone import load_backbone
from upt.data import eval_transform, scan_image_folder
from upt.errors import ArtifactError, BackboneMismatchError
from upt.methods import PromptConfig, PromptedCLIP
from upt.predict import Predictor
from upt.tiny import TINY_MODEL, write_tiny_checkpoint
from upt.training import TrainConfig, train


@pytest.fixture(scope="module")
def trained(tiny, fashion_train, tmp_path_factory):
    config = TrainConfig("upt", shots=4, epochs=2, lr=0.05, batch_size=8)
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
