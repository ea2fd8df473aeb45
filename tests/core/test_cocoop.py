"""CoCoOp: CoOp's context shifted per image by a meta-net; trained, saved and served."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from coop_layout import FASHION

from upt.artifact import load_artifact
from upt.data import eval_transform, read_image_file
from upt.methods import PromptConfig, PromptedCLIP
from upt.predict import Predictor
from upt.training import TrainConfig, train

CLASSES = ["handbag", "pullover sweater", "sneaker shoe", "pair of trousers"]


def _images(tiny, count: int = 3) -> torch.Tensor:
    paths = sorted((FASHION / "test").glob("*/*.png"))[::13][:count]
    return torch.stack([eval_transform(tiny.image)(read_image_file(p)) for p in paths])


def test_the_papers_settings_are_the_defaults(tiny):
    config = TrainConfig.of("cocoop")
    assert (config.step_batch_size, config.step_lr, config.total_epochs, config.warmup_lr) == (1, 0.002, 10, 1e-5)
    assert TrainConfig.of("coop").step_batch_size == 32
    model = PromptedCLIP(tiny, CLASSES, PromptConfig("cocoop"))
    assert model.n_ctx == 4  # "a photo of a"
    d = tiny.clip.visual.output_dim
    first, _, last = model.prompts.meta_net
    assert (first.in_features, first.out_features, last.out_features) == (d, d // 16, tiny.text_width)


def test_meta_net_and_context_get_gradients_the_backbone_none(tiny):
    torch.manual_seed(0)
    model = PromptedCLIP(tiny, CLASSES, PromptConfig("cocoop")).train()
    loss = F.cross_entropy(model(_images(tiny)), torch.tensor([0, 1, 2]))
    loss.backward()
    for name, parameter in model.prompts.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in tiny.clip.parameters())
    assert {name for name, _ in model.named_parameters()} == {f"prompts.{n}" for n, _ in model.prompts.named_parameters()}


def test_with_the_meta_net_output_at_zero_it_is_coop(tiny):
    torch.manual_seed(0)
    cocoop = PromptedCLIP(tiny, CLASSES, PromptConfig("cocoop")).eval()
    coop = PromptedCLIP(tiny, CLASSES, PromptConfig("coop", ctx_init="a photo of a")).eval()
    images = _images(tiny)
    with torch.no_grad():
        coop.prompts.context.copy_(cocoop.prompts.context)
        assert not torch.allclose(cocoop(images), coop(images), atol=1e-4)  # the meta-net shifts the context
        last = cocoop.prompts.meta_net[2]
        last.weight.zero_()
        last.bias.zero_()
        assert torch.allclose(cocoop(images), coop(images), atol=1e-5)


def test_trained_artifact_serves_the_per_image_context(tiny, tmp_path):
    result = train(tiny, FASHION, TrainConfig.of("cocoop", shots=1, epochs=1), tmp_path / "a")
    assert result.metrics["train_count"] == 4 and result.metrics["epochs"] == 1
    artifact = load_artifact(tmp_path / "a")
    model = PromptedCLIP(tiny, CLASSES, PromptConfig("cocoop")).eval()
    model.load_state_dict(artifact.prompt_state())
    predictor = Predictor.from_artifact(tiny, tmp_path / "a")
    images = _images(tiny, 4)
    with torch.no_grad():
        expected = model(images)
    assert predictor.conditional is not None
    assert torch.allclose(predictor.logits(images), expected, atol=1e-4)
    subset = predictor.for_classes(["sneaker shoe", "handbag"])
    assert torch.allclose(subset.logits(images), expected[:, [2, 0]], atol=1e-4)
