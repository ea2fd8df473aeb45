"""Every method's logits against the plain re-implementation of tests/core/reference.py, to 1e-6.

Backbones: `upt-tiny`, `upt-asym` (towers that differ in width, heads, depth and pooling) and, marked
slow, ViT-B-16; all with random weights in float64. The learned tensors are perturbed away from their
initial values first, so that no parameter (a layer norm's unit weight, a zero bias) hides a swap.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import reference as ref
from asymmetric import ASYMMETRIC, float64_backbone, perturbed, random_images
from upt.methods import PromptConfig, PromptedCLIP

CLASSES = ["bag", "trouser", "ankle boot"]
ENSEMBLE = ("a photo of a {}.", "itap of a {}.", "art of the {}.")

# (method, prompt options): every method, with the options that move prompts to other places.
CASES = [
    ("zero-shot", {}),
    ("zero-shot", {"templates": ENSEMBLE}),
    ("coop", {}),
    ("coop", {"depth": 2, "n_ctx": 3}),
    ("coop", {"ctx_init": "a photo of a"}),
    ("vpt-shallow", {"templates": ENSEMBLE}),
    ("vpt-deep", {"n_ctx": 3}),
    ("vpt-deep", {"depth": 2, "templates": ENSEMBLE}),
    ("upt", {}),
    ("upt", {"depth": 2, "n_ctx": 2}),
    ("joint", {}),
    ("shared", {}),
    ("shared", {"ctx_init": "a photo of a", "depth": 2}),
    ("mlp", {}),
    ("cocoop", {}),
    ("promptsrc", {}),
    ("promptsrc", {"depth": 2, "n_ctx": 3}),
]


def _case_id(case) -> str:
    method, options = case
    return "-".join([method] + [f"{k}={len(v) if isinstance(v, tuple) else v}" for k, v in options.items()])


@pytest.fixture(scope="module", params=["upt-tiny", ASYMMETRIC])
def backbone(request):
    return float64_backbone(request.param)


def project_model(backbone, method: str, options: dict, class_names=CLASSES, seed: int = 0) -> PromptedCLIP:
    """The project's model with its learned tensors moved off their initial values (seeded), float64."""
    torch.manual_seed(seed)
    return perturbed(PromptedCLIP(backbone, class_names, PromptConfig(method, **options)), seed + 1).eval()


def learned(model: PromptedCLIP) -> dict[str, torch.Tensor]:
    """The model's learned tensors by their names inside its prompt generator (the artifact's names)."""
    return {name.removeprefix("prompts."): p for name, p in model.named_parameters()}


def reference_logits(backbone, model: PromptedCLIP, method: str, options: dict, images: torch.Tensor,
                     class_names=CLASSES) -> torch.Tensor:
    config = PromptConfig(method, **options)
    n_ctx = len(ref.context_from_words(backbone.clip, backbone.tokenizer, config.ctx_init)[0]) \
        if config.ctx_init else config.n_ctx
    return ref.logits(backbone.clip, backbone.tokenizer, method, learned(model), class_names,
                      images, n_ctx, config.templates)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_logits_match_the_reference(backbone, case):
    method, options = case
    model = project_model(backbone, method, options)
    images = random_images(backbone)
    with torch.no_grad():
        expected = reference_logits(backbone, model, method, options, images)
        actual = model(images)
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["coop", "vpt-deep", "upt", "joint", "shared", "mlp", "cocoop", "promptsrc"])
def test_gradients_match_the_reference(backbone, method):
    """The gradient of the cross-entropy with respect to every learned tensor, through both towers."""
    options = {"depth": 2} if method not in ("vpt-deep", "cocoop") else {}
    model = project_model(backbone, method, options)
    images, labels = random_images(backbone), torch.tensor([0, 2, 1])
    parameters = learned(model)
    F.cross_entropy(model(images), labels).backward()
    expected = torch.autograd.grad(F.cross_entropy(reference_logits(backbone, model, method, options, images), labels),
                                   list(parameters.values()))
    for (name, parameter), grad in zip(parameters.items(), expected):
        assert parameter.grad is not None, f"{name} receives no gradient"
        torch.testing.assert_close(parameter.grad, grad, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("method", ["upt", "mlp", "shared"])
def test_the_image_tower_alone_trains_the_shared_prompt_and_its_generator(backbone, method):
    """The visual half of θ(U) carries gradient to U and θ: a loss on the image features alone must reach
    U's visual tokens, every parameter of the generator and the map to the vision width."""
    model = project_model(backbone, method, {})
    prompts = model.generate()
    model.image_features(random_images(backbone), prompts).sum().backward()
    grads = {name: p.grad for name, p in learned(model).items()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), \
        [name for name, g in grads.items() if g is None or g.abs().sum() == 0]
    visual_tokens = slice(model.n_ctx, None) if method != "shared" else slice(None)
    assert grads["unified"][:, visual_tokens].abs().sum() > 0


def test_the_text_tower_alone_does_not_reach_the_map_to_vision(backbone):
    model = project_model(backbone, "upt", {})
    model.classifier(model.generate()).sum().backward()
    grads = {name: p.grad for name, p in learned(model).items()}
    assert grads["to_vision.weight"] is None or grads["to_vision.weight"].abs().sum() == 0
    assert grads["unified"].abs().sum() > 0 and grads["mixer.norm_mid.weight"].abs().sum() > 0


@pytest.mark.parametrize("method", ["upt", "mlp", "shared", "joint", "coop", "vpt-deep", "promptsrc"])
def test_generated_prompts_match_the_reference(backbone, method):
    """The split of θ(U): the first m tokens are the text context, the last m (mapped) the visual prompts."""
    model = project_model(backbone, method, {"depth": 2})
    with torch.no_grad():
        prompts = model.generate()
        expected = ref.method_prompts(method, learned(model), model.n_ctx)
    for actual, wanted in ((prompts.text, expected.text), (prompts.visual, expected.visual)):
        assert (actual is None) == (wanted is None)
        if wanted is not None:
            torch.testing.assert_close(actual, wanted, atol=1e-9, rtol=0)


@pytest.mark.parametrize("method", ["coop", "joint", "shared"])
def test_ctx_init_starts_the_text_context_from_the_words(backbone, method):
    """A context initialised from "a photo of a" gives exactly the classifier of "a photo of a {}."; with
    layer-wise prompts, the first layer's context is the one initialised."""
    torch.manual_seed(0)
    words = ref.context_from_words(backbone.clip, backbone.tokenizer, "a photo of a")
    for depth in (1, 2):
        model = PromptedCLIP(backbone, CLASSES, PromptConfig(method, ctx_init="a photo of a", depth=depth))
        with torch.no_grad():
            torch.testing.assert_close(model.double().eval().generate().text[:1], words, atol=1e-6, rtol=0)
    with torch.no_grad():
        model = PromptedCLIP(backbone, CLASSES, PromptConfig(method, ctx_init="a photo of a")).double().eval()
        expected = ref.template_classifier(backbone.clip, backbone.tokenizer, CLASSES, ("a photo of a {}.",))
        torch.testing.assert_close(model.export()["classifier"].double(), expected, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def vit_b_16():
    return float64_backbone("ViT-B-16")


VIT_CASES = [CASES[i] for i in (1, 3, 5, 6, 9, 10, 12, 13, 14, 15)]  # each method once, its deep form where it has one


@pytest.mark.slow
@pytest.mark.parametrize("case", VIT_CASES, ids=_case_id)
def test_vit_b_16_logits_match_the_reference(vit_b_16, case):
    method, options = case
    model = project_model(vit_b_16, method, options)
    images = random_images(vit_b_16, n=1)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference_logits(vit_b_16, model, method, options, images),
                                   atol=1e-6, rtol=0)
