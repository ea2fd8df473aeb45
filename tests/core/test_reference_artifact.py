"""Export, save, load and serve: the served logits are the reference model's, in the artifact's class order."""

from __future__ import annotations

import pytest
import torch

import reference as ref
from asymmetric import ASYMMETRIC, register_test_configs
from upt.artifact import load_artifact, save_artifact
from upt.backbone import random_backbone
from upt.methods import PromptConfig, PromptedCLIP
from upt.predict import Predictor

CLASSES = ["zebra", "apple", "mango"]  # deliberately not sorted


@pytest.fixture(scope="module", params=["upt-tiny", ASYMMETRIC])
def backbone(request):
    register_test_configs()
    return random_backbone(request.param, "cpu", seed=3)


@pytest.mark.parametrize("method, options", [
    ("upt", {"dropout": 0.3}),
    ("mlp", {"dropout": 0.3}),
    ("vpt-deep", {"templates": ("a photo of a {}.", "art of the {}.")}),
    ("coop", {"depth": 2}),
    ("zero-shot", {"templates": ("a photo of a {}.", "art of the {}.")}),
    ("promptsrc", {}),
])
def test_exported_and_reloaded_artifact_serves_the_reference_logits(backbone, tmp_path, method, options):
    """Exported in eval mode whatever the model's mode (dropout off), saved, loaded, served."""
    torch.manual_seed(0)
    model = PromptedCLIP(backbone, CLASSES, PromptConfig(method, **options))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    model.train()  # as the model is right after the last training step
    exported = model.export()
    assert model.training  # export() does not change the caller's mode
    tensors = {f"prompt.{k}": v for k, v in model.state_dict().items()} | exported
    save_artifact(tmp_path / "a", backbone=backbone, method=method, class_names=CLASSES, tensors=tensors, options={})
    predictor = Predictor.from_artifact(backbone, tmp_path / "a")
    assert predictor.class_names == CLASSES
    images = torch.randn(2, 3, backbone.image.size, backbone.image.size)
    learned = {name.removeprefix("prompts."): p.detach() for name, p in model.named_parameters()}
    n_ctx = options.get("n_ctx", 4)
    expected = ref.logits(backbone.clip, backbone.tokenizer, method, learned, CLASSES, images, n_ctx,
                          options.get("templates", ("a photo of a {}.",)))
    torch.testing.assert_close(predictor.logits(images), expected, atol=2e-4, rtol=0)


def test_artifact_keeps_a_custom_class_order(backbone, tmp_path):
    classifier = torch.eye(3, backbone.clip.text_projection.shape[1])
    save_artifact(tmp_path / "a", backbone=backbone, method="coop", class_names=CLASSES,
                  tensors={"classifier": classifier}, options={})
    artifact = load_artifact(tmp_path / "a")
    assert artifact.class_names == CLASSES
    predictor = Predictor.from_artifact(backbone, artifact)
    ranked = predictor.rank(torch.tensor([[0.0, 5.0, 1.0], [9.0, 0.0, 1.0]]), top_k=3)
    assert [row[0].label for row in ranked] == ["apple", "zebra"]
    assert [p.label for p in ranked[0]] == ["apple", "mango", "zebra"]
    torch.testing.assert_close(predictor.classifier, classifier)
