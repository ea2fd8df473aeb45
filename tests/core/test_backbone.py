from __future__ import annotations

import os
import subprocess
import sys

import open_clip
import pytest
import torch

from upt.backbone import load_backbone
from upt.errors import WeightsUnavailableError
from upt.tiny import TINY_MODEL, write_tiny_checkpoint


def test_tiny_checkpoint_loads_through_the_real_checkpoint_path(tiny, tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)
    for name, tensor in tiny.clip.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert tiny.text_width != tiny.vision_width  # every projection is exercised
    assert all(not p.requires_grad for p in tiny.clip.parameters())


def test_safetensors_and_torch_files_of_the_same_weights_have_one_fingerprint(tiny, tmp_path):
    path = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    assert load_backbone(TINY_MODEL, str(path), "cpu").weights_sha256 == tiny.weights_sha256
    other = write_tiny_checkpoint(tmp_path / "other.pt", seed=1)
    assert load_backbone(TINY_MODEL, str(other), "cpu").weights_sha256 != tiny.weights_sha256


def test_missing_checkpoint_file_says_what_to_do(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist.*checkpoint"):
        load_backbone("ViT-B-16", str(tmp_path / "missing.safetensors"))


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(WeightsUnavailableError, match="openai"):
        load_backbone("ViT-B-16", "no-such-tag")


def test_openai_weights_get_quick_gelu(monkeypatch):
    seen = {}

    def fake_create_model(name, **kwargs):  # records what the real factory would be asked for
        seen.update(kwargs)
        raise RuntimeError("stop before downloading")

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    with pytest.raises(WeightsUnavailableError):
        load_backbone("ViT-B-16", "openai")
    assert seen["force_quick_gelu"] is True and seen["require_pretrained"] is True


def test_unreachable_pretrained_weights_fail_with_advice(fashion_test):
    """No network here: the real download of OpenAI's ViT-B-16 fails, and the CLI says how to fix it."""
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    image = next((fashion_test / "bag").iterdir())
    result = subprocess.run(
        [sys.executable, "-m", "upt", "zero-shot", "--model", "ViT-B-16", "--pretrained", "openai",
         "--classes", "bag,shoe", str(image)], capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 2
    assert "--pretrained /path/to/" in result.stderr and "Traceback" not in result.stderr
