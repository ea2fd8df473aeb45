"""PromptSRC: its registry entry and options, its self-regularising loss and Gaussian prompt aggregation
against the plain formulas of tests/core/reference.py (float64, 1e-6), training, resume and serving."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import reference as ref
from asymmetric import ASYMMETRIC, float64_backbone, perturbed, random_images
from upt.artifact import TENSORS_FILE, load_artifact
from upt.auto import base_config, candidate_config, method_listing
from upt.cli import build_parser
from upt.data import eval_transform, read_image_file
from upt.datasets import load_data
from upt.errors import ConfigError, TrainingCancelled
from upt.methods import PromptConfig, PromptedCLIP
from upt.methods.prompts import JointPrompts
from upt.methods.promptsrc import TEMPLATES, Regulation, SelfRegulation, gpa_weights
from upt.methods.registry import REGISTRY, methods_taking
from upt.options import UnusedOptionError
from upt.predict import Predictor
from upt.serving import TorchImageEncoder, logits_together
from upt.training import TrainCallbacks, TrainConfig, train

CLASSES = ["bag", "trouser", "ankle boot"]
OWN_OPTIONS = ("text_loss_weight", "image_loss_weight", "gpa_mean", "gpa_std")
# A short run whose Gaussian is far from uniform over its epochs (the config's μ 30, σ 30 nearly is over 4).
SHORT = {"shots": 2, "epochs": 4, "gpa_mean": 3.0, "gpa_std": 1.0}


# ---- the registry: its few-shot config as defaults, its options where users set options ------------

def test_its_few_shot_config_is_the_default():
    config = TrainConfig.of("promptsrc")
    assert (config.total_epochs, config.step_batch_size, config.step_lr) == (50, 4, 0.0025)
    assert (config.warmup_epochs, config.warmup_lr, config.lr_at(0), config.lr_at(1)) == (1, 1e-5, 1e-5, 0.0025)
    assert (config.momentum, config.weight_decay) == (0.9, 5e-4)
    assert TrainConfig.of("coop").step_lr == 0.002 and TrainConfig.of("promptsrc", lr=0.01).step_lr == 0.01
    depth = REGISTRY["promptsrc"].depth
    assert depth.resolve(None, SimpleNamespace(text_layers=12, vision_layers=12)) == 9  # ViT-B/16's 9 of 12
    assert depth.resolve(None, SimpleNamespace(text_layers=3, vision_layers=12)) == 3  # every layer of a smaller one
    with pytest.raises(ConfigError, match="depth 4 exceeds"):
        depth.resolve(4, SimpleNamespace(text_layers=3, vision_layers=12))  # a given depth is never cut
    assert Regulation.of(config, "folder") == Regulation(25.0, 10.0, 30.0, 30.0)
    assert Regulation.of(config, "dtd") == Regulation(25.0, 10.0, 45.0, 5.0)  # the config's other GPA
    given = TrainConfig.of("promptsrc", gpa_mean=20.0, text_loss_weight=1.0)
    assert Regulation.of(given, "eurosat") == Regulation(1.0, 10.0, 20.0, 5.0)
    assert len(set(TEMPLATES)) == len(TEMPLATES) == 60 and all("{}" in t for t in TEMPLATES)


def test_its_options_are_listed_flagged_checked_and_refused_by_the_other_methods():
    listed = next(row for row in method_listing() if row["name"] == "promptsrc")
    options = {option["name"]: option for option in listed["options"]}
    assert set(OWN_OPTIONS) <= set(options) and {"ctx_init", "depth", "lr", "batch_size", "epochs"} <= set(options)
    assert (options["text_loss_weight"]["default"], options["image_loss_weight"]["default"]) == (25.0, 10.0)
    assert "45" in options["gpa_mean"]["help"] and "0.0025" in options["lr"]["help"]
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {flag for action in train_parser._actions for flag in action.option_strings}
    assert {"--text-loss-weight", "--image-loss-weight", "--gpa-mean", "--gpa-std"} <= flags
    for name in OWN_OPTIONS:
        assert methods_taking(name) == ["promptsrc"]
        with pytest.raises(UnusedOptionError):
            TrainConfig.of("coop", **{name: 1.0})
    for name, bad in (("gpa_std", 0.0), ("text_loss_weight", -1.0), ("gpa_mean", float("nan"))):
        with pytest.raises(ConfigError) as raised:
            TrainConfig.of("promptsrc", **{name: bad}).validate()
        assert raised.value.field == name


def test_as_an_auto_candidate_it_keeps_its_own_recipe_unless_told_otherwise():
    """auto's shared options leave lr, batch size and epochs unset: each candidate keeps its own."""
    base = base_config(("coop", "promptsrc"), shots=2)
    coop, promptsrc = (candidate_config(base, method) for method in ("coop", "promptsrc"))
    assert (coop.step_lr, coop.step_batch_size, promptsrc.step_lr, promptsrc.step_batch_size) == (0.002, 32, 0.0025, 4)
    assert promptsrc.total_epochs == 50
    told = base_config(("coop", "promptsrc"), lr=0.01, gpa_mean=5.0)
    assert candidate_config(told, "promptsrc").step_lr == candidate_config(told, "coop").step_lr == 0.01
    assert candidate_config(told, "promptsrc").gpa_mean == 5.0 and candidate_config(told, "coop").gpa_mean is None


def test_prompts_are_deep_in_both_towers_the_text_context_from_a_photo_of_a(tiny):
    torch.manual_seed(0)
    model = PromptedCLIP(tiny, CLASSES, PromptConfig("promptsrc"))
    assert isinstance(model.prompts, JointPrompts)
    text, visual = model.prompts.text.context.detach(), model.prompts.visual.prompts.detach()
    assert text.shape == (3, 4, tiny.text_width) and visual.shape == (3, 4, tiny.vision_width)  # upt-tiny: 3 layers
    words = ref.context_from_words(tiny.clip, tiny.tokenizer, "a photo of a")
    torch.testing.assert_close(text[:1], words.float(), atol=0, rtol=0)
    for random_part in (text[1:], visual):  # N(0, 0.02²), as the released code's deeper and visual prompts
        assert 0.015 < float(random_part.std()) < 0.025 and abs(float(random_part.mean())) < 0.003


# ---- the loss and GPA against the reference's formulas ----------------------------------------------

@pytest.fixture(scope="module", params=["upt-tiny", ASYMMETRIC])
def backbone(request):
    return float64_backbone(request.param)


def _perturbed(backbone) -> PromptedCLIP:
    torch.manual_seed(0)
    return perturbed(PromptedCLIP(backbone, CLASSES, PromptConfig("promptsrc")), seed=1).train()


def _images(backbone, n: int = 3) -> torch.Tensor:
    return random_images(backbone, n, seed=2)


def _learned(model: PromptedCLIP) -> dict[str, torch.Tensor]:
    return {name.removeprefix("prompts."): p for name, p in model.named_parameters()}


def test_the_loss_terms_logits_and_gradients_are_the_papers(backbone):
    """Each weighted term (cross-entropy, both L1 distances to frozen CLIP, KL to zero-shot), the logits
    and the gradient of their sum with respect to every prompt, through both towers."""
    model = _perturbed(backbone)
    regulation = Regulation(text_loss_weight=25.0, image_loss_weight=10.0)
    objective = SelfRegulation(model, regulation, epochs=3)
    images, labels = _images(backbone), torch.tensor([0, 2, 1])
    terms, logits = objective.terms(model, images, labels)
    parameters = _learned(model)
    expected = ref.promptsrc_loss_terms(backbone.clip, backbone.tokenizer, parameters, CLASSES, images, labels,
                                        TEMPLATES, 25.0, 10.0)
    assert terms.keys() == expected.keys()
    for name, value in terms.items():
        assert value.dtype == torch.float64 and float(value.detach()) > 0, name
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")
    reference_logits = ref.logits(backbone.clip, backbone.tokenizer, "promptsrc", parameters, CLASSES, images, 4,
                                  ("a photo of a {}.",))
    torch.testing.assert_close(logits, reference_logits, atol=1e-6, rtol=0)
    loss, _ = objective.loss(model, images, labels)
    torch.testing.assert_close(loss, sum(expected.values()), atol=1e-6, rtol=1e-6)
    loss.backward()
    wanted = torch.autograd.grad(sum(expected.values()), list(parameters.values()))
    for (name, parameter), grad in zip(parameters.items(), wanted):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        torch.testing.assert_close(parameter.grad, grad, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")


def test_the_frozen_targets_do_not_move_with_the_prompts(backbone):
    """w̃₀ is computed once from frozen CLIP, and f̃₀ without prompts: neither takes gradient."""
    model = _perturbed(backbone)
    objective = SelfRegulation(model, Regulation(), epochs=1)
    before = objective.frozen_text.clone()
    terms, _ = objective.terms(model, _images(backbone), torch.tensor([0, 1, 2]))
    assert not objective.frozen_text.requires_grad
    torch.testing.assert_close(objective.frozen_text, before, atol=0, rtol=0)
    expected = ref.frozen_text_targets(backbone.clip, backbone.tokenizer, CLASSES, TEMPLATES)
    torch.testing.assert_close(objective.frozen_text, expected, atol=1e-6, rtol=0)


def test_the_loss_under_autocast_is_finite_and_close_to_float32(tiny):
    """As on a GPU (bfloat16 autocast on the CPU here): the terms are computed from widened features."""
    torch.manual_seed(0)
    model = PromptedCLIP(tiny, CLASSES, PromptConfig("promptsrc")).train()
    objective = SelfRegulation(model, Regulation(), epochs=1)
    images, labels = torch.randn(4, 3, tiny.image.size, tiny.image.size), torch.tensor([0, 1, 2, 0])
    exact, _ = objective.loss(model, images, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms, logits = objective.terms(model, images, labels)
    assert all(value.dtype == torch.float32 and torch.isfinite(value) for value in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    assert float(sum(terms.values()).detach()) == pytest.approx(float(exact.detach()), rel=0.05)


@pytest.mark.parametrize("epochs, mean, std", [(50, 30.0, 30.0), (50, 45.0, 5.0), (7, 3.0, 2.0), (4, 1.0, 0.5)])
def test_gpa_weights_are_the_normalised_gaussian_density(epochs, mean, std):
    weights = gpa_weights(epochs, mean, std)
    torch.testing.assert_close(weights, torch.tensor(ref.gpa_weights(epochs, mean, std), dtype=torch.float64),
                               atol=1e-12, rtol=1e-9)


def test_gpa_weights_stay_finite_far_from_the_mean():
    """μ 45, σ 1 over 5 epochs: the density underflows to 0 at every epoch; the weights still sum to 1."""
    weights = gpa_weights(5, 45.0, 1.0)
    assert torch.isfinite(weights).all() and float(weights.sum()) == pytest.approx(1.0)
    assert float(weights[-1]) == pytest.approx(1.0)  # all on the epoch nearest the mean


class _Recorder(TrainCallbacks):
    def __init__(self, stop_after: int | None = None):
        self.epochs = []
        self.stop_after = stop_after

    def on_epoch_end(self, report) -> None:
        self.epochs.append(report.epoch)

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.epochs) >= self.stop_after


@pytest.fixture()
def per_epoch_prompts(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """The prompts after each epoch, as GPA receives them."""
    recorded: list[dict[str, torch.Tensor]] = []
    real = SelfRegulation.epoch_done

    def recording(self, epoch, model):
        recorded.append({name: value.detach().clone() for name, value in model.state_dict().items()})
        return real(self, epoch, model)

    monkeypatch.setattr(SelfRegulation, "epoch_done", recording)
    return recorded


def test_the_trained_prompts_are_the_gaussian_weighted_average_of_each_epochs(tiny, fashion_train, tmp_path,
                                                                              per_epoch_prompts):
    result = train(tiny, fashion_train, TrainConfig.of("promptsrc", **SHORT), tmp_path / "a")
    assert len(per_epoch_prompts) == 4 and result.metrics["epochs"] == 4
    expected = ref.gaussian_prompt_aggregation(per_epoch_prompts, SHORT["gpa_mean"], SHORT["gpa_std"])
    tensors = load_file(str(result.artifact_dir / TENSORS_FILE))
    assert {f"prompt.{name}" for name in expected} == {name for name in tensors if name.startswith("prompt.")}
    for name, value in expected.items():
        torch.testing.assert_close(tensors[f"prompt.{name}"], value, atol=1e-6, rtol=0)
        assert not torch.allclose(tensors[f"prompt.{name}"], per_epoch_prompts[-1][name], atol=1e-6)
    # the served classifier and visual prompts are those of the aggregated prompts
    model = PromptedCLIP(tiny, load_artifact(result.artifact_dir).class_names, PromptConfig("promptsrc"))
    model.load_state_dict(expected)
    exported = model.export()
    torch.testing.assert_close(tensors["classifier"], exported["classifier"], atol=1e-6, rtol=0)
    torch.testing.assert_close(tensors["visual_prompts"], exported["visual_prompts"], atol=1e-6, rtol=0)
    recorded = json.loads((result.artifact_dir / "adapter_config.json").read_text())
    assert recorded["regulation"] == {"text_loss_weight": 25.0, "image_loss_weight": 10.0, "gpa_mean": 3.0,
                                      "gpa_std": 1.0}


# ---- training, resume and serving -------------------------------------------------------------------

def test_resume_from_an_epoch_checkpoint_gives_the_same_artifact(tiny, fashion_train, tmp_path):
    """GPA's running sum is in the checkpoint: the resumed run's aggregate is the uninterrupted one's."""
    config = TrainConfig.of("promptsrc", **SHORT)
    whole = train(tiny, fashion_train, config, tmp_path / "whole")
    with pytest.raises(TrainingCancelled):
        train(tiny, fashion_train, config, tmp_path / "resumed", _Recorder(stop_after=2), tmp_path / "ckpt")
    checkpoint = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=False)
    assert checkpoint["epochs_done"] == 2
    assert checkpoint["objective"]["aggregate"].keys() == checkpoint["prompts"].keys()
    recorder = _Recorder()
    resumed = train(tiny, fashion_train, config, tmp_path / "resumed", recorder, tmp_path / "ckpt")
    assert recorder.epochs == [3, 4]
    a, b = (load_file(str(r.artifact_dir / TENSORS_FILE)) for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]


def test_it_trains_on_the_pretrained_tiny_clip_and_its_artifact_serves_it(pretrained_tiny, fashion_train,
                                                                          fashion_test, tmp_path):
    result = train(pretrained_tiny, fashion_train, TrainConfig.of("promptsrc", shots=4, epochs=3), tmp_path / "a")
    assert result.metrics["trainable_parameters"] == 3 * 4 * (pretrained_tiny.text_width + pretrained_tiny.vision_width)
    assert all(h["loss"] > 0 for h in result.history) and result.history[-1]["lr"] < 0.0025
    predictor = Predictor.from_artifact(pretrained_tiny, result.artifact_dir)
    assert predictor.visual_prompts.shape == (3, 4, pretrained_tiny.vision_width)
    artifact = load_artifact(result.artifact_dir)
    model = PromptedCLIP(pretrained_tiny, artifact.class_names, PromptConfig("promptsrc"))
    model.load_state_dict(artifact.prompt_state())
    paths = sorted(fashion_test.glob("*/*.png"))[::7][:4]
    images = torch.stack([eval_transform(pretrained_tiny.image)(read_image_file(p)) for p in paths])
    with torch.no_grad():
        torch.testing.assert_close(predictor.logits(images), model.eval()(images), atol=1e-5, rtol=0)
        # served in one pass beside a task of another depth (the service's shared encoder), the same logits
        other = PromptedCLIP(pretrained_tiny, artifact.class_names, PromptConfig("vpt-deep", depth=1))
        shallow = Predictor(pretrained_tiny, artifact.class_names, **{
            k: v for k, v in other.export().items() if k in ("classifier", "visual_prompts")})
        together = logits_together(TorchImageEncoder(pretrained_tiny), [(predictor, images), (shallow, images[:2])])
        torch.testing.assert_close(together[0], predictor.logits(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(together[1], shallow.logits(images[:2]), atol=1e-5, rtol=0)


def test_it_beats_zero_shot_on_images_frozen_clip_gets_wrong(pretrained_tiny, fashion_train, fashion_test,
                                                             tmp_path):
    """Rotated by 90°, the fixture's images fool the pretrained tiny CLIP (below chance); five epochs of
    PromptSRC's recipe on 8 shots per class do better, its pull towards frozen CLIP notwithstanding."""
    for split, folder in (("train", fashion_train), ("test", fashion_test)):
        for path in sorted(folder.glob("*/*.png")):
            rotated = tmp_path / split / path.parent.name / path.name
            rotated.parent.mkdir(parents=True, exist_ok=True)
            read_image_file(path).rotate(90).save(rotated)
    test = load_data(tmp_path / "test")
    zero_shot = Predictor.zero_shot(pretrained_tiny, test.class_names).evaluate(test.test)
    result = train(pretrained_tiny, tmp_path / "train", TrainConfig.of("promptsrc", shots=8, epochs=5), tmp_path / "a")
    tuned = Predictor.from_artifact(pretrained_tiny, result.artifact_dir).evaluate(test.test)
    assert zero_shot["accuracy"] < 0.25 and tuned["accuracy"] >= zero_shot["accuracy"] + 0.15, (tuned, zero_shot)


def _upt(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "upt", *args, "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_command_line_trains_evaluates_and_predicts_with_its_options(tiny_checkpoint, fashion_train,
                                                                         fashion_test, tmp_path):
    out = tmp_path / "artifact"
    model = ["--model", "upt-tiny", "--pretrained", str(tiny_checkpoint)]
    trained = _upt("train", "--data", str(fashion_train), "--method", "promptsrc", "--shots", "2", "--epochs", "2",
                   "--gpa-mean", "2", "--gpa-std", "1", "--text-loss-weight", "5", "--image-loss-weight", "2",
                   *model, "--out", str(out), "--eval-data", str(fashion_test), "--quiet")
    assert trained["method"] == "promptsrc" and trained["eval"]["count"] == 40
    assert json.loads((out / "adapter_config.json").read_text())["regulation"] == {
        "text_loss_weight": 5.0, "image_loss_weight": 2.0, "gpa_mean": 2.0, "gpa_std": 1.0}
    evaluated = _upt("eval", "--artifact", str(out), "--data", str(fashion_test))
    assert evaluated["accuracy"] == trained["eval"]["accuracy"]
    image = next(Path(fashion_test).glob("*/*.png"))
    predicted = _upt("predict", "--artifact", str(out), "--top-k", "2", str(image))
    assert len(predicted["predictions"]) == 1 and len(predicted["predictions"][0]["top"]) == 2
