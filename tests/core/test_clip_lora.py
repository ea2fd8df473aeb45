"""CLIP-LoRA: its adapters against the plain re-implementation of tests/core/reference.py (float64, to
1e-6: logits, gradients, the exported and reloaded artifact's served logits), its start at zero-shot,
its recipe, training, resume, artifact, serving and the options it takes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import reference as ref
from asymmetric import ASYMMETRIC, float64_backbone, perturbed, random_images
from upt.artifact import TENSORS_FILE, load_artifact, load_serving_artifact, save_artifact
from upt.encoders import QkvLora
from upt.errors import ArtifactError, ConfigError, TrainingCancelled
import upt.lora_training as upt_lora_training
from upt.lora_training import LoraLoop
from upt.methods import REGISTRY
from upt.methods.lora import EpochPlan, LoraCLIP, LoraOptions, adapter_parameters, serving_lora
from upt.options import UnusedOptionError
from upt.parameters import trainable_parameters_by_method
from upt.predict import Predictor
from upt.serving import TorchImageEncoder, encoder_need, logits_together
from upt.training import TrainCallbacks, TrainConfig, train

CLASSES = ["bag", "trouser", "ankle boot"]
ENSEMBLE = ("a photo of a {}.", "art of the {}.")
FOLDERS = ["bag", "pullover", "sneaker", "trouser"]
SWAPPED = ["pullover", "bag", "trouser", "sneaker"]  # each folder's images named as another class


@pytest.fixture(scope="module", params=["upt-tiny", ASYMMETRIC])
def backbone(request):
    return float64_backbone(request.param)


def lora_model(backbone, options: LoraOptions = LoraOptions(), templates=("a photo of a {}.",), seed: int = 0,
               perturb: bool = True) -> LoraCLIP:
    """The project's model in float64, its adapters moved off their initial values (B off zero)."""
    torch.manual_seed(seed)
    model = LoraCLIP(backbone, CLASSES, options, templates)
    return (perturbed(model, seed + 1) if perturb else model.double()).eval()


def reference_logits(backbone, model: LoraCLIP, images: torch.Tensor) -> torch.Tensor:
    options = model.options
    return ref.lora_logits(backbone.clip, backbone.tokenizer, dict(model.named_parameters()), CLASSES, images,
                           model.templates, options.alpha, options.rank)


# ---- the reference, in float64 ------------------------------------------------------------------------

@pytest.mark.parametrize("options, templates", [
    (LoraOptions(), ("a photo of a {}.",)),
    (LoraOptions(rank=3, alpha=2.0), ENSEMBLE),
], ids=["paper", "rank3-alpha2-ensemble"])
def test_logits_match_the_reference(backbone, options, templates):
    model = lora_model(backbone, options, templates)
    images = random_images(backbone)
    with torch.no_grad():
        actual, expected = model(images), reference_logits(backbone, model, images)
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


def test_gradients_match_the_reference(backbone):
    """The cross-entropy's gradient with respect to A and B of both towers."""
    model = lora_model(backbone)
    images, labels = random_images(backbone), torch.tensor([0, 2, 1])
    parameters = dict(model.named_parameters())
    F.cross_entropy(model(images), labels).backward()
    expected = torch.autograd.grad(F.cross_entropy(reference_logits(backbone, model, images), labels),
                                   list(parameters.values()))
    for (name, parameter), grad in zip(parameters.items(), expected):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"{name} receives no gradient"
        torch.testing.assert_close(parameter.grad, grad, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")


def test_exported_and_reloaded_artifact_serves_the_reference_logits(backbone, tmp_path):
    """Exported in eval mode from train mode, saved, loaded for serving (the image adapters and W with the
    text adapters folded in), served: the reference model's logits."""
    model = lora_model(backbone).train()
    exported = model.export()
    assert model.training
    tensors = {f"prompt.{k}": v for k, v in model.state_dict().items()} | exported
    save_artifact(tmp_path / "a", backbone=backbone, method="clip-lora", class_names=CLASSES, tensors=tensors,
                  options={})
    served = load_serving_artifact(tmp_path / "a")
    assert not any(name.startswith("prompt.") for name in served.tensors)  # the text adapters stay on disk
    predictor = Predictor.from_artifact(backbone, served)
    images = random_images(backbone)
    expected = reference_logits(backbone, model, images)
    torch.testing.assert_close(predictor.logits(images), expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), expected, atol=1e-6, rtol=0)  # eval mode: dropout off


def test_an_untrained_model_is_zero_shot_clip(backbone):
    """B starts at zero (A Kaiming-uniform, as nn.Linear's weights): the logits are zero-shot CLIP's,
    also in train mode, where dropout touches the adapters' input only."""
    model = lora_model(backbone, perturb=False)
    for tower in (model.text, model.visual):
        assert torch.count_nonzero(tower.up) == 0
        width = tower.down.shape[-1]
        assert tower.down.abs().max() <= 1 / math.sqrt(width) and tower.down.std() > 0.4 / math.sqrt(width)
    images = random_images(backbone)
    zero_shot = ref.template_classifier(backbone.clip, backbone.tokenizer, CLASSES, ("a photo of a {}.",))
    expected = backbone.clip.logit_scale.exp() * F.normalize(ref.image_features(backbone.clip, images, None),
                                                             dim=-1) @ zero_shot.T
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(model.train()(images), expected, atol=1e-6, rtol=0)


def test_dropout_drops_the_adapters_input_while_training_only(backbone):
    model = lora_model(backbone, LoraOptions(dropout=0.5))
    images = random_images(backbone)
    with torch.no_grad():
        evaluated = model.eval()(images)
        torch.manual_seed(1)
        trained = model.train()(images)
    torch.testing.assert_close(evaluated, reference_logits(backbone, model, images), atol=1e-6, rtol=0)
    assert (trained - evaluated).abs().max() > 1e-3


def test_an_update_is_the_scaled_low_rank_product_and_dropout_masks_each_projection_unbiased():
    torch.manual_seed(0)
    width, rank = 16, 2
    down, up = torch.randn(1, 3, rank, width), torch.randn(1, 3, width, rank)
    down[0, 1], up[0, 1] = down[0, 0], up[0, 0]  # the query and the key share one adapter
    x = torch.randn(4, width)
    exact = QkvLora(down, up, 0.5).update(0, x, slice(0, 3))
    expected = torch.cat([0.5 * x @ (up[0, p] @ down[0, p]).T for p in range(3)], dim=-1)
    torch.testing.assert_close(exact, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(QkvLora(down, up, 0.5).update(0, x, slice(1, 3)), expected[:, width:], atol=1e-5,
                               rtol=0)
    dropped = QkvLora(down, up, 0.5, dropout=0.25)
    draws = torch.stack([dropped.update(0, x, slice(0, 3)) for _ in range(4000)])
    assert not torch.allclose(draws[..., :width], draws[..., width:2 * width])  # a mask of its own per projection
    torch.testing.assert_close(draws.mean(dim=0), exact, atol=0.05 * float(exact.abs().max()), rtol=0)


def test_mixed_precision_forward_and_backward(tiny):
    """Autocast as on a GPU (bfloat16 on the CPU here): low-precision logits, float32 gradients for every adapter."""
    model = LoraCLIP(tiny, CLASSES, LoraOptions(), ("a photo of a {}.",)).train()
    with torch.no_grad():  # B off zero, else A gets no gradient (as in the first step of training)
        for tower in (model.text, model.visual):
            tower.up.add_(0.1 * torch.randn_like(tower.up))
    images = torch.randn(4, 3, tiny.image.size, tiny.image.size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits.float(), torch.tensor([0, 1, 2, 0])).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
               for p in model.parameters())
    assert all(not p.requires_grad and p.grad is None for p in tiny.clip.parameters())


# ---- options and registry ---------------------------------------------------------------------------

def test_the_registry_holds_the_papers_recipe_and_refuses_the_prompt_options():
    spec = REGISTRY["clip-lora"]
    assert spec.learns_adapters and not spec.learns_text and not spec.uses_cache and spec.recipe
    assert [o.name for o in spec.options] == ["shots", "seed", "lora_rank", "lora_alpha", "lora_dropout", "iterations",
                                              "lr", "batch_size"]
    config = TrainConfig.of("clip-lora", shots=4).validate()
    assert LoraOptions.of(config) == LoraOptions(rank=2, alpha=1.0, dropout=0.25)
    assert LoraOptions.of(config).scale == pytest.approx(2 ** -0.5)  # alpha / √rank, the released code's
    assert (config.step_lr, config.step_batch_size) == (2e-4, 32)
    assert LoraOptions.of(TrainConfig.of("clip-lora", lora_rank=4, lora_alpha=2.0, lora_dropout=0.0)) == \
        LoraOptions(4, 2.0, 0.0)
    for name, value in (("epochs", 3), ("n_ctx", 8), ("depth", 1), ("augment_views", 2)):
        with pytest.raises(UnusedOptionError) as raised:
            TrainConfig.of("clip-lora", **{name: value})
        assert raised.value.field == name
    for name, value in (("momentum", 0.5), ("weight_decay", 0.1), ("warmup_epochs", 0)):  # SGD's, not its own
        with pytest.raises(ConfigError) as raised:
            TrainConfig.holding("clip-lora", **{name: value}).validate()
        assert raised.value.field == name
    TrainConfig.of("clip-lora", lr=1e-3, batch_size=8).validate()  # its own
    with pytest.raises(UnusedOptionError):
        TrainConfig.of("coop", lora_rank=4)
    for name, bad in (("lora_rank", 0), ("lora_alpha", 0.0), ("lora_dropout", 1.0), ("iterations", -1)):
        with pytest.raises(ConfigError) as raised:
            TrainConfig.of("clip-lora", **{name: bad}).validate()
        assert raised.value.field == name


def test_epochs_are_passes_over_the_shots_grouped_to_at_most_200():
    assert TrainConfig.of("clip-lora", shots=4, iterations=150, class_names=["a", "b", "c"]).total_epochs == 150
    config = TrainConfig.of("clip-lora", shots=4, class_names=["a", "b", "c"])  # 12 images: one step a pass
    assert config.total_epochs == 200  # 2000 passes, 10 an epoch
    # 160 images at batch 32: 5 steps a pass, 1600 passes, 8 an epoch, 40 steps an epoch
    assert TrainConfig.of("clip-lora", shots=16, class_names=[str(i) for i in range(10)]).total_epochs == 200
    assert EpochPlan.of(8000, 160, 32) == EpochPlan(8000, 5, 8) and EpochPlan.of(8000, 160, 32).steps_per_epoch == 40
    assert EpochPlan.of(7, 8, 4).epochs == 4  # the last epoch one step
    assert TrainConfig.of("clip-lora", shots=4).total_epochs == 0  # not known before the class names


def test_grouped_passes_are_each_shuffled_and_the_last_epoch_cut(pretrained_tiny, fashion_train, monkeypatch,
                                                                  tmp_path):
    import upt.methods.lora as lora

    monkeypatch.setattr(lora, "MAX_EPOCHS", 2)  # 3 passes of 2 steps (8 images at batch 4): 2 passes an epoch
    recorder = Recorder()
    seeds = []
    real_seed = upt_lora_training._seed_everything
    monkeypatch.setattr(upt_lora_training, "_seed_everything", lambda seed, index: (seeds.append(index),
                                                                                     real_seed(seed, index))[1])
    result = train(pretrained_tiny, fashion_train, TrainConfig.of("clip-lora", shots=2, iterations=6, batch_size=4),
                   tmp_path / "lora", recorder)
    assert [(r.epoch, r.step, r.steps_per_epoch) for r in recorder.steps] == [
        (1, 1, 4), (1, 2, 4), (1, 3, 4), (1, 4, 4), (2, 1, 2), (2, 2, 2)]
    assert [r.epoch for r in recorder.epochs] == [1, 2] and len(result.history) == 2
    assert seeds == [-1, 0, 1, 2]  # the adapters' initialisation, then one seed per pass


def test_trainable_parameters_are_the_adapters(tiny):
    model = LoraCLIP(tiny, CLASSES, LoraOptions(), ("a photo of a {}.",))
    assert model.trainable_parameters() == adapter_parameters(tiny) == trainable_parameters_by_method("upt-tiny")[
        "clip-lora"]


# ---- training -----------------------------------------------------------------------------------------

class Recorder(TrainCallbacks):
    def __init__(self, stop_after_epochs: int | None = None):
        self.steps, self.epochs, self.stop_after = [], [], stop_after_epochs

    def on_step(self, report):
        self.steps.append(report)

    def on_epoch_end(self, report):
        self.epochs.append(report)

    def should_stop(self):
        return self.stop_after is not None and len(self.epochs) >= self.stop_after


def test_the_optimiser_is_adamw_with_a_cosine_over_the_iterations(pretrained_tiny, fashion_train, monkeypatch):
    from upt.datasets import few_shot_split, load_data

    source = load_data(fashion_train)
    config = TrainConfig.of("clip-lora", shots=4, iterations=5, batch_size=8).validate()
    split = few_shot_split(source, config.shots, config.seed)
    model = LoraCLIP(pretrained_tiny, source.class_names, LoraOptions.of(config), config.templates)
    loop = LoraLoop(model, split, config, Recorder(), None)
    group = loop.optimizer.param_groups[0]
    assert isinstance(loop.optimizer, torch.optim.AdamW)
    assert (group["weight_decay"], group["betas"]) == (1e-2, (0.9, 0.999))
    assert (loop.steps_per_epoch, loop.epochs) == (2, 3)  # 16 images at batch 8; the last epoch cut short
    assert LoraLoop(model, split, TrainConfig.of("clip-lora", shots=4), Recorder(), None).iterations == 2000
    lrs = []
    original = loop._step
    monkeypatch.setattr(loop, "_step", lambda images, labels: (lrs.append(group["lr"]), original(images, labels))[1])
    history = loop.run()
    expected = [1e-6 + (2e-4 - 1e-6) * (1 + math.cos(math.pi * t / 5)) / 2 for t in range(5)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert [h["epoch"] for h in history] == [1, 2, 3] and not model.training


def test_training_learns_where_zero_shot_fails(pretrained_tiny, fashion_train, tmp_path):
    """Class names swapped between the folders: zero-shot gets every validation image wrong; the adapters
    learn the new names (loss falls, every adapter moves) and the reports count iterations."""
    names = {"class_names": SWAPPED}
    recorder = Recorder()
    result = train(pretrained_tiny, fashion_train, TrainConfig.of("clip-lora", shots=4, iterations=20, lr=0.03,
                                                                  **names),
                   tmp_path / "lora", recorder, class_folders=FOLDERS)
    zero_shot = train(pretrained_tiny, fashion_train, TrainConfig.of("zero-shot", shots=4, **names), tmp_path / "zs",
                      class_folders=FOLDERS)
    assert zero_shot.metrics["val_accuracy"] == 0.0
    assert result.metrics["val_accuracy"] >= 0.5
    assert result.history[-1]["loss"] < result.history[0]["loss"] / 2
    assert result.metrics["iterations"] == 20 and len(recorder.steps) == 20 and len(result.history) == 20
    assert recorder.steps[-1].progress == 1.0 and recorder.epochs[-1].epochs == 20
    artifact = load_artifact(result.artifact_dir)
    assert artifact.config["method"] == "clip-lora" and artifact.config["lora"]["scale"] == pytest.approx(2 ** -0.5)
    for name in ("prompt.text.up", "prompt.visual.up"):
        assert artifact.tensors[name].abs().sum() > 0, name
    assert (result.artifact_dir / TENSORS_FILE).stat().st_size < 200_000
    served = Predictor.from_artifact(pretrained_tiny, result.artifact_dir)
    assert served.evaluate(load_samples(fashion_train, FOLDERS, SWAPPED))["accuracy"] > 0.5


def load_samples(folder, folders, names):
    from upt.datasets import load_data

    source = load_data(folder, class_names=names, class_folders=folders)
    return source.train


def test_a_resumed_run_ends_with_the_same_artifact(pretrained_tiny, fashion_train, tmp_path):
    config = TrainConfig.of("clip-lora", shots=2, iterations=6, batch_size=4)
    whole = train(pretrained_tiny, fashion_train, config, tmp_path / "whole")
    with pytest.raises(TrainingCancelled):
        train(pretrained_tiny, fashion_train, config, tmp_path / "cut", Recorder(stop_after_epochs=2),
              checkpoint_dir=tmp_path / "checkpoint")
    recorder = Recorder()
    resumed = train(pretrained_tiny, fashion_train, config, tmp_path / "cut", recorder,
                    checkpoint_dir=tmp_path / "checkpoint")
    assert [report.epoch for report in recorder.epochs] == [3]  # 8 images at batch 4: 2 steps an epoch
    def measured(history):
        return [(h["epoch"], h["loss"], h["accuracy"], h["lr"]) for h in history]

    assert measured(resumed.history) == measured(whole.history) and len(whole.history) == 3
    a, b = load_artifact(whole.artifact_dir).tensors, load_artifact(resumed.artifact_dir).tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="another run"):
        train(pretrained_tiny, fashion_train, TrainConfig.of("clip-lora", shots=2, iterations=7, batch_size=4),
              tmp_path / "other", checkpoint_dir=tmp_path / "checkpoint")


def test_zero_iterations_leave_zero_shot(pretrained_tiny, fashion_train, tmp_path):
    lora = train(pretrained_tiny, fashion_train, TrainConfig.of("clip-lora", shots=2, iterations=0), tmp_path / "l")
    zero_shot = train(pretrained_tiny, fashion_train, TrainConfig.of("zero-shot", shots=2), tmp_path / "z")
    assert lora.history == [] and lora.metrics["val_accuracy"] == zero_shot.metrics["val_accuracy"]
    torch.testing.assert_close(load_artifact(lora.artifact_dir).classifier,
                               load_artifact(zero_shot.artifact_dir).classifier, atol=1e-6, rtol=0)


# ---- artifact and serving -----------------------------------------------------------------------------

def test_incomplete_image_adapters_are_refused(tiny):
    model = LoraCLIP(tiny, CLASSES, LoraOptions(), ("a photo of a {}.",))
    exported = model.export()
    assert serving_lora(exported) is not None and serving_lora({"classifier": exported["classifier"]}) is None
    for missing in ("lora.visual.up", "lora.scale"):
        with pytest.raises(ArtifactError):
            serving_lora({k: v for k, v in exported.items() if k != missing})
    with pytest.raises(ArtifactError):
        serving_lora(exported | {"lora.visual.up": exported["lora.visual.up"][:, :, :-1]})


def adapted_predictor(backbone) -> Predictor:
    """A CLIP-LoRA predictor whose image adapters moved off zero (seeded), as serving loads it."""
    torch.manual_seed(0)
    model = LoraCLIP(backbone, CLASSES, LoraOptions(), ("a photo of a {}.",))
    with torch.no_grad():
        model.visual.up.add_(0.1 * torch.randn_like(model.visual.up))
    exported = model.export()
    return Predictor(backbone, CLASSES, exported["classifier"], lora=serving_lora(exported))


def test_a_lora_task_takes_a_pass_of_its_own_beside_the_shared_ones(pretrained_tiny):
    """Grouped as the micro-batcher groups requests: the LoRA predictor's pass carries its adapters,
    the zero-shot requests share theirs; each result is what its predictor computes alone."""
    lora = adapted_predictor(pretrained_tiny)
    zero_shot = Predictor.zero_shot(pretrained_tiny, CLASSES)
    other = Predictor.zero_shot(pretrained_tiny, ["pullover", "sneaker"])
    size = pretrained_tiny.image.size
    batches = [torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n)) for n in (2, 3, 1)]
    requests = list(zip((lora, zero_shot, other), batches))
    assert encoder_need(lora) != encoder_need(zero_shot) == encoder_need(other)
    encoder = TorchImageEncoder(pretrained_tiny)
    groups: dict = {}
    for request in requests:
        groups.setdefault(encoder_need(request[0]), []).append(request)
    results = {id(batch): out for group in groups.values()
               for (_, batch), out in zip(group, logits_together(encoder, group))}
    for predictor, batch in requests:
        torch.testing.assert_close(results[id(batch)], predictor.logits(batch), atol=1e-5, rtol=0)
    assert not torch.allclose(lora.logits(batches[0]), zero_shot.logits(batches[0]), atol=1e-3)
    narrowed = lora.for_classes(CLASSES[:2])
    torch.testing.assert_close(narrowed.logits(batches[0]), lora.logits(batches[0])[:, :2], atol=1e-5, rtol=0)


def test_an_exported_onnx_model_carries_the_image_adapters(pretrained_tiny, tmp_path):
    """`upt export` traces `Predictor.logits`: the ONNX graph runs the adapted image tower."""
    ort = pytest.importorskip("onnxruntime")
    export = pytest.importorskip("upt.export")
    predictor = adapted_predictor(pretrained_tiny)
    path, = export.export_predictor(predictor, "onnx", tmp_path / "model.onnx")
    spec = pretrained_tiny.image
    pixels = torch.rand(2, 3, spec.size, spec.size)
    normalised = (pixels - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    expected = predictor.logits(normalised)
    logits = ort.InferenceSession(str(path)).run(["logits"], {"pixels": pixels.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-4, rtol=0)
    unadapted = Predictor(pretrained_tiny, CLASSES, predictor.classifier).logits(normalised)
    assert (unadapted - expected).abs().max() > 1e-2
