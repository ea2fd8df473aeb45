from __future__ import annotations

import open_clip
import pytest
import torch

from upt.backbone import Backbone, _image_spec
from upt.errors import ConfigError
from upt.methods import PROMPT_METHODS, PromptConfig, PromptedCLIP, UnifiedTransformerLayer, template_classifier
from upt.parameters import trainable_parameters_by_method

CLASSES = ["bag", "trouser", "sneaker"]


def _images(backbone: Backbone, n: int = 4) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(n, 3, backbone.image.size, backbone.image.size)


def test_upt_self_attention_mixes_the_prompt_tokens():
    torch.manual_seed(0)
    theta = UnifiedTransformerLayer(width=64, dropout=0.0).eval()
    u = torch.randn(1, 8, 64)
    changed = u.clone()
    changed[0, 0] += 1.0
    with torch.no_grad():
        before, after = theta(u), theta(changed)
    others = slice(1, None)
    assert not torch.allclose(before[0, others], after[0, others])  # token 0 reached every other token


@pytest.mark.parametrize("method, mixes", [("upt", True), ("mlp", False)])
def test_a_text_token_of_u_reaches_the_visual_prompts_only_through_attention(tiny, method, mixes):
    model = PromptedCLIP(tiny, CLASSES, PromptConfig(method, dropout=0.0)).eval()
    with torch.no_grad():
        before = model.generate().visual.clone()
        model.prompts.unified[0, 0] += 1.0  # the first text-side token of U
        after = model.generate().visual
    assert torch.allclose(before, after) is not mixes


@pytest.mark.parametrize("method", PROMPT_METHODS[1:])
def test_mixed_precision_forward_and_backward(tiny, method):
    """Autocast as on a GPU (bfloat16 on the CPU here): low-precision logits, float32 gradients."""
    model = PromptedCLIP(tiny, CLASSES, PromptConfig(method, depth=2 if method != "vpt-shallow" else None))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(_images(tiny))
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1, 2, 0])).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_mlp_ablation_does_not_mix_tokens(tiny):
    model = PromptedCLIP(tiny, CLASSES, PromptConfig("mlp", dropout=0.0)).eval()
    mlp = model.prompts.mixer
    u = torch.randn(1, 8, tiny.text_width)
    changed = u.clone()
    changed[0, 0] += 1.0
    with torch.no_grad():
        torch.testing.assert_close(mlp(u)[0, 1:], mlp(changed)[0, 1:])


def test_upt_generator_runs_once_per_step_for_both_towers(tiny):
    model = PromptedCLIP(tiny, CLASSES, PromptConfig("upt"))
    calls = []
    model.prompts.mixer.register_forward_hook(lambda *args: calls.append(1))
    model.train()
    loss = model(_images(tiny)).logsumexp(dim=-1).mean()
    loss.backward()
    assert len(calls) == 1


def test_coop_initialised_from_a_template_starts_at_zero_shot(tiny):
    zero_shot = PromptedCLIP(tiny, CLASSES, PromptConfig("zero-shot", templates=("a photo of a {}.",)))
    coop = PromptedCLIP(tiny, CLASSES, PromptConfig("coop", ctx_init="a photo of a"))
    images = _images(tiny)
    with torch.no_grad():
        torch.testing.assert_close(coop(images), zero_shot(images), atol=1e-5, rtol=0)
    assert coop.n_ctx == 4


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_only_prompt_parameters_receive_gradients(tiny, method):
    model = PromptedCLIP(tiny, CLASSES, PromptConfig(method))
    logits = model(_images(tiny))
    assert logits.shape == (4, len(CLASSES))
    if method == "zero-shot":
        assert model.trainable_parameters() == 0
        return
    logits.logsumexp(dim=-1).mean().backward()
    assert all(not p.requires_grad and p.grad is None for p in tiny.clip.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_depth_gives_layer_wise_prompts(tiny):
    deep = PromptedCLIP(tiny, CLASSES, PromptConfig("upt", depth=3)).generate()
    assert deep.text.shape == (3, 4, tiny.text_width)
    assert deep.visual.shape == (3, 4, tiny.vision_width)
    vpt = PromptedCLIP(tiny, CLASSES, PromptConfig("vpt-deep")).generate()
    assert vpt.visual.shape == (tiny.vision_layers, 4, tiny.vision_width) and vpt.text is None
    joint = PromptedCLIP(tiny, CLASSES, PromptConfig("joint", n_ctx=2)).generate()
    assert joint.text.shape == (1, 2, tiny.text_width) and joint.visual.shape[0] == tiny.vision_layers
    with pytest.raises(ConfigError, match="exceeds"):
        PromptedCLIP(tiny, CLASSES, PromptConfig("upt", depth=tiny.vision_layers + 1))


@pytest.mark.parametrize("options, message", [
    ({"method": "nope"}, "Unknown method"),
    ({"method": "coop", "n_ctx": 0}, "n_ctx"),
    ({"method": "vpt-shallow", "depth": 2}, "vpt-deep"),
    ({"method": "upt", "ctx_init": "a photo of a"}, "ctx_init"),
    ({"method": "zero-shot", "templates": ("no placeholder",)}, "template"),
])
def test_bad_prompt_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        PromptConfig(**options)


@pytest.mark.slow
def test_trainable_parameter_counts_on_vit_b_16():
    d_t, d_v, m, layers = 512, 768, 4, 12
    theta = (4 * d_t * d_t + 4 * d_t) + 2 * 2 * d_t + (d_t * 4 * d_t + 4 * d_t + 4 * d_t * d_t + d_t)
    to_vision = d_t * d_v + d_v
    expected = {
        "zero-shot": 0,
        "coop": m * d_t,
        "vpt-shallow": m * d_v,
        "vpt-deep": layers * m * d_v,
        "upt": 2 * m * d_t + theta + to_vision,
        "joint": m * d_t + layers * m * d_v,
        "shared": m * d_t + to_vision,
        "mlp": 2 * m * d_t + 2 * (d_t * d_t + d_t) + to_vision,
        "tip-adapter": 0,
        "tip-adapter-f": None,  # one key of the embedding width (512) per cached image: data-dependent
        "gda": 0,  # a closed form: its W and b are computed, not trained
        # CoOp's context plus the meta-net: Linear(512 -> 512/16), ReLU, Linear(512/16 -> text width).
        "cocoop": m * d_t + (512 * 32 + 32) + (32 * d_t + d_t),
        # 4 text and 4 visual tokens at each of its 9 layers
        "promptsrc": 9 * m * (d_t + d_v),
        # rank-2 A (2 x width) and B (width x 2) on q, k and v of every block of both towers
        "clip-lora": layers * 3 * (2 * 2 * d_t + 2 * 2 * d_v),
    }
    assert trainable_parameters_by_method("ViT-B-16") == expected
    assert trainable_parameters_by_method("ViT-B-16", cached_images=10 * 16)["tip-adapter-f"] == 10 * 16 * 512


@pytest.mark.parametrize("chunk", [5, 256])
def test_template_classifier_batches_all_prompts_into_the_same_classifier(tiny, monkeypatch, chunk):
    """One batched (chunked, length-sorted) text pass gives the classifier of one pass per class."""
    from upt.encoders import encode_text
    from upt.methods import ENSEMBLE_TEMPLATES
    from upt.methods import model as model_module

    names = ["cat", "golden_retriever", "a very long class name with many words in it", "dog", "sea lion"]
    monkeypatch.setattr(model_module, "TEXT_CHUNK", chunk)
    batched = template_classifier(tiny, names, ENSEMBLE_TEMPLATES)
    expected = []
    with torch.no_grad():
        for name in names:
            texts = [t.format(name.replace("_", " ")) for t in ENSEMBLE_TEMPLATES]
            features = encode_text(tiny.clip, tiny.tokenizer(texts), normalize=True)
            expected.append(torch.nn.functional.normalize(features.mean(dim=0), dim=-1))
    assert batched.shape == (len(names), tiny.clip.text_projection.shape[1])
    assert (batched - torch.stack(expected)).abs().max().item() < 1e-6


def test_template_classifier_never_pads_a_prompt_to_a_longer_one(tiny, monkeypatch):
    """Each text pass holds prompts of one length, so none runs positions past its own end of text."""
    from upt.methods import ENSEMBLE_TEMPLATES
    from upt.methods import model as model_module

    passes = []

    def recording(clip, token_ids, *args, **kwargs):
        passes.append(token_ids.argmax(dim=-1).tolist())
        return encode(clip, token_ids, *args, **kwargs)

    encode = model_module.encode_text
    monkeypatch.setattr(model_module, "encode_text", recording)
    names = ["cat", "golden_retriever", "a very long class name with many words in it", "dog", "sea lion"]
    template_classifier(tiny, names, ENSEMBLE_TEMPLATES)
    assert all(len(set(ends)) == 1 for ends in passes)
    assert sum(len(ends) for ends in passes) == len(names) * len(ENSEMBLE_TEMPLATES)
