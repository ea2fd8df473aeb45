"""Every method, end to end through the `upt` command line, on real Fashion-MNIST images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from upt.auto import auto_options
from upt.methods import CACHE_METHODS, METHODS, REGISTRY

# Random tiny weights (zero-shot is chance): each tuned method must learn. The Tip-Adapter methods use
# the paper's own recipe (training-free, or 20 AdamW epochs over cached features). The README's table
# is made on the pretrained tiny CLIP by scripts/fashion_table.py.
TRAIN_OPTIONS = ["--shots", "16", "--epochs", "100", "--lr", "0.05", "--batch-size", "16", "--seed", "1"]
SPLIT_OPTIONS = ["--shots", "16", "--seed", "1"]  # zero-shot and the cache methods: no SGD options (refused)
# CoCoOp encodes the class prompts once per image: 20 epochs (its paper runs 10) keep it within the timeout.
COCOOP_OPTIONS = ["--shots", "16", "--epochs", "20", "--lr", "0.05", "--batch-size", "16", "--seed", "1"]
# CLIP-LoRA counts iterations (its paper's 500 x 16 would take an hour on a CPU): 100, at AdamW's lr 0.01.
LORA_OPTIONS = ["--shots", "16", "--iterations", "100", "--lr", "0.01", "--batch-size", "16", "--seed", "1"]


def train_options(method: str) -> list[str]:
    if method == "cocoop":
        return COCOOP_OPTIONS
    if method == "clip-lora":
        return LORA_OPTIONS
    return SPLIT_OPTIONS if method in CACHE_METHODS or method == "zero-shot" else TRAIN_OPTIONS


def upt_cli(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "upt", *args, "--json"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def train_and_evaluate(method: str, tiny_checkpoint: Path, train_dir: Path, test_dir: Path, out: Path) -> dict:
    return upt_cli("train", "--data", str(train_dir), "--method", method, *train_options(method), "--model", "upt-tiny",
                   "--pretrained", str(tiny_checkpoint), "--out", str(out), "--eval-data", str(test_dir), "--quiet")


@pytest.fixture(scope="module")
def zero_shot_accuracy(tiny_checkpoint, fashion_train, fashion_test, tmp_path_factory) -> float:
    out = tmp_path_factory.mktemp("zero-shot")
    return train_and_evaluate("zero-shot", tiny_checkpoint, fashion_train, fashion_test, out)["eval"]["accuracy"]


# PromptSRC is pulled towards frozen CLIP's zero-shot predictions, chance here: it stays at chance on random
# weights (tests/core/test_promptsrc.py shows it beating zero-shot on the pretrained tiny CLIP).
@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("zero-shot", "promptsrc")])
def test_each_tuned_method_beats_zero_shot(method, tiny_checkpoint, fashion_train, fashion_test, tmp_path,
                                           zero_shot_accuracy):
    result = train_and_evaluate(method, tiny_checkpoint, fashion_train, fashion_test, tmp_path / method)
    assert result["method"] == method and (result["trainable_parameters"] > 0) is REGISTRY[method].trains
    assert result["eval"]["count"] == 40
    assert result["eval"]["accuracy"] > zero_shot_accuracy, (method, result["eval"]["accuracy"], zero_shot_accuracy)


@pytest.mark.slow
def test_eval_and_predict_agree_with_training(tiny_checkpoint, fashion_train, fashion_test, tmp_path):
    trained = upt_cli("train", "--data", str(fashion_train), "--method", "coop", "--shots", "4", "--epochs", "2",
                      "--model", "upt-tiny", "--pretrained", str(tiny_checkpoint), "--out", str(tmp_path / "a"),
                      "--eval-data", str(fashion_test))
    assert upt_cli("eval", "--artifact", str(tmp_path / "a"), "--data", str(fashion_test)) == trained["eval"]
    image = sorted((fashion_test / "bag").iterdir())[0]
    predicted = upt_cli("predict", "--artifact", str(tmp_path / "a"), "--top-k", "2", str(image))
    top = predicted["predictions"][0]["top"]
    assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"]


def test_zero_shot_command_ranks_every_class(tiny_checkpoint, fashion_test):
    image = sorted((fashion_test / "sneaker").iterdir())[0]
    result = upt_cli("zero-shot", "--model", "upt-tiny", "--pretrained", str(tiny_checkpoint),
                     "--classes", "bag,sneaker,trouser", "--ensemble", str(image))
    top = result["predictions"][0]["top"]
    assert sorted(p["label"] for p in top) == ["bag", "sneaker", "trouser"]
    assert sum(p["probability"] for p in top) == pytest.approx(1.0, abs=1e-5)


def test_analyze_reports_both_variances(tiny_checkpoint, fashion_test):
    result = upt_cli("analyze", "--data", str(fashion_test), "--model", "upt-tiny",
                     "--pretrained", str(tiny_checkpoint))
    assert result["classes"] == 4 and result["images"] == 40
    assert 0 < result["intra_class_visual"] < 2 and 0 < result["inter_class_text"] < 2
    assert result["interpretation"]


def test_errors_are_one_line_and_json(tmp_path):
    result = subprocess.run([sys.executable, "-m", "upt", "eval", "--artifact", str(tmp_path), "--data",
                             str(tmp_path), "--json"], capture_output=True, text=True)
    assert result.returncode == 2
    assert json.loads(result.stdout)["error"]["type"] == "ArtifactError"
    assert "adapter_config.json is missing" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("method, flags, flag", [
    ("cocoop", ["--depth", "12"], "--depth"),
    ("zero-shot", ["--lr", "0.1"], "--lr"),
    ("zero-shot", ["--epochs", "5"], "--epochs"),
    ("tip-adapter", ["--n-ctx", "8"], "--n-ctx"),
    ("auto", ["--candidates", "tip-adapter,zero-shot", "--shots", "2", "--depth", "3"], "--depth"),
])
def test_train_refuses_a_flag_its_method_does_not_use(method, flags, flag, fashion_train, tmp_path):
    """Refused as argparse refuses a bad flag (exit 2), before the backbone loads: these weights do not exist."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "upt", "train", "--data", str(fashion_train), "--method", method,
                             *flags, "--model", "upt-tiny", "--pretrained", str(tmp_path / "missing.pt"),
                             "--out", str(out), "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("usage: upt train") and result.stdout == "" and not out.exists()
    auto = method == "auto"
    takes = [o.flag for o in (auto_options(("tip-adapter", "zero-shot")) if auto else REGISTRY[method].options)]
    who = "auto with candidates tip-adapter, zero-shot" if auto else method
    assert flag not in takes
    assert result.stderr.splitlines()[-1] == (f"upt train: error: argument {flag}: {who} does not use this option; "
                                              f"its options are {', '.join(takes)}.")
