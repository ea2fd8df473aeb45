"""Tip-Adapter's served logits and its α, β search against the formula of its paper (UPT-NOTES.md):

    logits = s · f Wᵀ + α · exp(−β (1 − f Kᵀ)) V

f the normalised image feature, W the zero-shot classifier, K the cache keys (L2-normalised features
of the shots), V their one-hot labels; α and β the best validation accuracy on the released grid
(β from 0.1 towards 7 in 200 steps, α from 0.1 towards 3 in 20).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import reference as ref
from upt.artifact import TENSORS_FILE
from upt.data import eval_transform, sample_few_shot, scan_image_folder
from upt.predict import Predictor
from upt.training import TrainConfig, train

SHOTS = 2


def reference_features(backbone, samples) -> torch.Tensor:
    transform = eval_transform(backbone.image)
    images = torch.stack([transform(Image.open(s.path).convert("RGB")) for s in samples])
    with torch.no_grad():
        return F.normalize(ref.image_features(backbone.clip, images, None), dim=-1)


def tip_logits(backbone, features, classifier, keys, values, alpha, beta) -> torch.Tensor:
    scale = backbone.clip.logit_scale.exp()
    return scale * features @ classifier.T + alpha * torch.exp(-beta * (1 - features @ keys.T)) @ values


@pytest.fixture(scope="module", params=["tip-adapter", "tip-adapter-f"])
def trained(request, tiny, fashion_train, tmp_path_factory):
    config = TrainConfig.of(request.param, shots=SHOTS, augment_views=2, templates=("a photo of a {}.", "art of the {}."),
                            epochs=2 if request.param.endswith("f") else None)
    result = train(tiny, fashion_train, config, tmp_path_factory.mktemp("tip") / "artifact")
    return request.param, config, result


def test_cache_holds_the_shots_normalised_keys_and_one_hot_labels(trained, fashion_train):
    method, config, result = trained
    tensors = load_file(str(result.artifact_dir / TENSORS_FILE))
    split = sample_few_shot(scan_image_folder(fashion_train), SHOTS, config.seed)
    labels = torch.tensor([s.label for s in split.train])
    assert torch.equal(tensors["cache_values"], F.one_hot(labels, 4).float())
    keys = tensors["cache_keys"]
    assert keys.shape == (len(split.train), keys.shape[1])
    if method == "tip-adapter":  # views averaged, then normalised (Tip-Adapter-F trains its keys freely)
        torch.testing.assert_close(keys.norm(dim=-1), torch.ones(len(keys)), atol=1e-5, rtol=0)


def test_served_logits_are_the_papers_formula(trained, tiny, fashion_test):
    _, config, result = trained
    tensors = load_file(str(result.artifact_dir / TENSORS_FILE))
    classifier = ref.template_classifier(tiny.clip, tiny.tokenizer, ["bag", "pullover", "sneaker", "trouser"],
                                         config.templates)
    torch.testing.assert_close(tensors["classifier"], classifier, atol=1e-5, rtol=0)
    samples = scan_image_folder(fashion_test).samples[::7]
    features = reference_features(tiny, samples)
    expected = tip_logits(tiny, features, classifier, tensors["cache_keys"], tensors["cache_values"],
                          float(tensors["cache_alpha"]), float(tensors["cache_beta"]))
    predictor = Predictor.from_artifact(tiny, result.artifact_dir)
    images = torch.stack([predictor.transform(Image.open(s.path).convert("RGB")) for s in samples])
    torch.testing.assert_close(predictor.logits(images), expected, atol=1e-4, rtol=1e-5)


def test_alpha_and_beta_are_searched_on_the_shots_never_on_the_validation_images(trained, tiny, fashion_train):
    method, config, result = trained
    tensors = load_file(str(result.artifact_dir / TENSORS_FILE))
    split = sample_few_shot(scan_image_folder(fashion_train), SHOTS, config.seed)
    labels = torch.tensor([s.label for s in split.train])
    keys, values, classifier = tensors["cache_keys"], tensors["cache_values"], tensors["classifier"]
    betas = [0.1 + i * (7.0 - 0.1) / 200 for i in range(200)]
    alphas = [0.1 + i * (3.0 - 0.1) / 20 for i in range(20)]
    alpha, beta = float(tensors["cache_alpha"]), float(tensors["cache_beta"])
    assert any(abs(alpha - a) < 1e-9 for a in alphas) and any(abs(beta - b) < 1e-9 for b in betas)
    cache = result.metrics["cache"]
    assert cache["alpha"] == alpha and cache["beta"] == beta and cache["searched_on"] == len(split.train)
    if method == "tip-adapter":  # its keys are the shots' queries: leave-one-out over the whole grid
        scale = float(tiny.clip.logit_scale.exp())
        hits = {(a, b): ref.tip_leave_one_out_hits(keys, values, labels, classifier, scale, a, b)
                for b in betas[::20] for a in alphas[::4]}
        assert max(hits.values()) <= cache["held_out_accuracy"] * len(labels)
        exact = ref.tip_leave_one_out_hits(keys, values, labels, classifier, scale, alpha, beta)
        assert exact == round(cache["held_out_accuracy"] * len(labels))
