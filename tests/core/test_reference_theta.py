"""UPT's θ (equation 5) and the prompt depths, against the reference and both towers."""

from __future__ import annotations

import pytest
import torch

import reference as ref
from asymmetric import ASYMMETRIC, DEEP_TEXT, float64_backbone
from upt.errors import ConfigError
from upt.methods import PromptConfig, PromptedCLIP, UnifiedTransformerLayer


@pytest.mark.parametrize("width", [64, 128, 256])
def test_theta_is_equation_5_with_width_over_64_heads(width):
    torch.manual_seed(width)
    theta = UnifiedTransformerLayer(width, dropout=0.1).double().eval()
    with torch.no_grad():
        for parameter in theta.parameters():  # off the unit norms and zero biases of initialisation
            parameter.add_(0.2 * torch.randn_like(parameter))
    u = torch.randn(3, 8, width, dtype=torch.float64)  # three layers' U of 2m = 8 tokens
    with torch.no_grad():
        expected = ref.equation_5(u, dict(theta.named_parameters()), prefix="")
        torch.testing.assert_close(theta(u), expected, atol=1e-9, rtol=0)


def test_theta_mixes_tokens_within_a_layer_and_never_across_layers():
    torch.manual_seed(0)
    theta = UnifiedTransformerLayer(128, dropout=0.0).double().eval()
    u = torch.randn(2, 6, 128, dtype=torch.float64)
    changed = u.clone()
    changed[0, 0] += 1.0
    with torch.no_grad():
        before, after = theta(u), theta(changed)
    assert not torch.allclose(before[0, 1:], after[0, 1:])  # other tokens of the same layer moved
    torch.testing.assert_close(before[1], after[1], atol=0, rtol=0)  # the other layer's U did not


def test_theta_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    theta = UnifiedTransformerLayer(64, dropout=0.5).double()
    u = torch.randn(1, 8, 64, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.equal(theta.train()(u), theta(u))
        assert torch.equal(theta.eval()(u), theta(u))


@pytest.mark.parametrize("method", ["coop", "vpt-deep", "upt", "joint", "shared", "mlp"])
def test_prompts_start_from_a_normal_distribution_of_std_0_02(asym, method):
    """Random initialisation N(0, 0.02²) (the notes; CoOp's and VPT's), for every prompt tensor."""
    torch.manual_seed(0)
    model = PromptedCLIP(asym, ["a", "b"], PromptConfig(method, n_ctx=16, depth=2 if method != "vpt-deep" else None))
    prompts = model.generate()
    initial = [t for name, t in model.named_parameters() if name.rsplit(".", 1)[-1] in ("context", "prompts", "unified")]
    assert initial and prompts is not None
    values = torch.cat([t.detach().flatten() for t in initial])
    assert abs(float(values.mean())) < 0.002 and 0.0185 < float(values.std()) < 0.0215


@pytest.fixture(scope="module")
def asym():
    return float64_backbone(ASYMMETRIC)


@pytest.fixture(scope="module")
def deep_text():
    return float64_backbone(DEEP_TEXT)


def test_test_backbones_differ_where_upt_tiny_does_not(asym, deep_text):
    assert asym.text_width // 64 > 1 and asym.text_width != asym.vision_width
    assert asym.vision_layers > asym.text_layers and deep_text.text_layers > deep_text.vision_layers
    assert asym.clip.visual.pool_type == "avg"


@pytest.mark.parametrize("method", ["upt", "shared", "mlp"])
def test_upt_depth_is_bounded_by_both_towers(asym, deep_text, method):
    classes = ["a", "b"]
    for backbone in (asym, deep_text):
        shallower = min(backbone.text_layers, backbone.vision_layers)
        model = PromptedCLIP(backbone, classes, PromptConfig(method, depth=shallower))
        assert model.generate().text.shape[0] == shallower == model.generate().visual.shape[0]
        with pytest.raises(ConfigError, match="exceeds"):
            PromptedCLIP(backbone, classes, PromptConfig(method, depth=shallower + 1))


def test_single_tower_depths_are_bounded_by_their_own_tower(asym, deep_text):
    classes = ["a", "b"]
    assert PromptedCLIP(asym, classes, PromptConfig("vpt-deep")).generate().visual.shape[0] == asym.vision_layers
    PromptedCLIP(asym, classes, PromptConfig("vpt-deep", depth=asym.vision_layers))
    PromptedCLIP(deep_text, classes, PromptConfig("coop", depth=deep_text.text_layers))
    with pytest.raises(ConfigError, match="exceeds"):
        PromptedCLIP(asym, classes, PromptConfig("coop", depth=asym.text_layers + 1))
    with pytest.raises(ConfigError, match="exceeds"):
        PromptedCLIP(deep_text, classes, PromptConfig("vpt-deep", depth=deep_text.vision_layers + 1))
    joint = PromptedCLIP(asym, classes, PromptConfig("joint")).generate()
    assert joint.visual.shape[0] == asym.vision_layers and joint.text.shape[0] == 1
