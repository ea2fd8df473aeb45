"""GDA against its paper's formulas (tests/core/reference.py, float64), its α cross-fitted on the shots,
its artifact and what it does with one shot."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import reference as ref
from upt.artifact import TENSORS_FILE
from upt.data import sample_few_shot, scan_image_folder
from upt.methods.gda import ALPHAS, GdaHead, GdaOptions, cross_fit_alpha, fit_linear
from upt.methods.model import template_classifier
from upt.methods.tip_adapter import CacheOptions, encode_views
from upt.predict import Predictor
from upt.training import TrainConfig, train

CLASSES = ["bag", "pullover", "sneaker", "trouser"]


@pytest.fixture(scope="module")
def shots(tiny, fashion_train):
    """Raw features of 3 augmented views of 4 shots per class (the visual shift's: GDA matters there)."""
    folder = scan_image_folder(fashion_train.parent.parent / "fashion_mnist_visual_shift" / "train")
    split = sample_few_shot(folder, 4, seed=3)
    views = encode_views(tiny, split.train, CacheOptions(augment_views=3), seed=3)
    labels = torch.tensor([s.label for s in split.train])
    return views.double(), labels


def test_w_and_b_are_the_papers_in_float64(shots):
    views, labels = shots
    weights, bias = fit_linear(views, labels, 4)
    expected_w, expected_b = ref.gda_linear(views, labels, 4)
    assert weights.dtype == torch.float64
    torch.testing.assert_close(weights, expected_w, atol=1e-6, rtol=1e-9)
    torch.testing.assert_close(bias, expected_b, atol=1e-6, rtol=1e-9)


def test_unequal_classes_are_centred_on_their_own_means(shots):
    views, labels = shots
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[(labels == 0).nonzero().flatten()[:2]] = False  # class 0 keeps 2 shots, the others 4
    weights, bias = fit_linear(views[:, keep], labels[keep], 4)
    expected_w, expected_b = ref.gda_linear(views[:, keep], labels[keep], 4)
    torch.testing.assert_close(weights, expected_w, atol=1e-6, rtol=1e-9)
    torch.testing.assert_close(bias, expected_b, atol=1e-6, rtol=1e-9)


def test_alpha_is_cross_fitted_on_the_shots(tiny, shots):
    views, labels = shots
    classifier = template_classifier(tiny, CLASSES, ("a photo of a {}.",)).double()
    scale = tiny.logit_scale
    alpha, search = cross_fit_alpha(views, labels, classifier, scale, GdaOptions())
    index, hits = ref.gda_cross_fit_alpha(views, labels, classifier, scale, ALPHAS)
    assert len(set(hits)) > 1  # α matters on these shots
    assert alpha == ALPHAS[index] and search.hits == max(hits) and search.count == len(labels)


def test_one_shot_keeps_the_initial_alpha_and_one_view_is_zero_shot(tiny, fashion_train):
    split = sample_few_shot(scan_image_folder(fashion_train), 1, seed=1)
    labels = torch.tensor([s.label for s in split.train])
    classifier = template_classifier(tiny, CLASSES, ("a photo of a {}.",))
    views = encode_views(tiny, split.train, CacheOptions(augment_views=1), seed=1)
    alpha, search = cross_fit_alpha(views, labels, classifier, tiny.logit_scale, GdaOptions())
    assert alpha == GdaOptions().init_alpha and search.index is None and search.accuracy is None
    weights, bias = fit_linear(views, labels, 4)  # one view of one shot: no spread to estimate
    assert torch.count_nonzero(weights) == 0
    torch.testing.assert_close(bias, torch.full((4,), float(torch.log(torch.tensor(0.25)))))


@pytest.fixture(scope="module")
def trained(tiny, fashion_train, tmp_path_factory):
    config = TrainConfig.of("gda", shots=4, augment_views=2, seed=2, templates=("a photo of a {}.", "art of the {}."))
    return config, train(tiny, fashion_train, config, tmp_path_factory.mktemp("gda") / "artifact")


def test_artifact_holds_the_head_fitted_on_the_views(trained, tiny, fashion_train):
    config, result = trained
    tensors = load_file(str(result.artifact_dir / TENSORS_FILE))
    split = sample_few_shot(scan_image_folder(fashion_train), 4, config.seed)
    views = encode_views(tiny, split.train, CacheOptions(augment_views=2), config.seed).double()
    weights, bias = ref.gda_linear(views, torch.tensor([s.label for s in split.train]), 4)
    torch.testing.assert_close(tensors["gda_weights"].double(), weights, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(tensors["gda_bias"].double(), bias, atol=1e-3, rtol=1e-4)
    assert float(tensors["gda_alpha"]) in ALPHAS
    cache = result.metrics["cache"]
    assert cache["alpha"] == float(tensors["gda_alpha"]) and cache["searched_on"] == len(split.train)
    assert result.metrics["val_count"] == len(split.val)


def test_served_logits_are_the_papers_formula(trained, tiny, fashion_test):
    config, result = trained
    tensors = load_file(str(result.artifact_dir / TENSORS_FILE))
    classifier = ref.template_classifier(tiny.clip, tiny.tokenizer, CLASSES, config.templates)
    torch.testing.assert_close(tensors["classifier"], classifier, atol=1e-5, rtol=0)
    samples = scan_image_folder(fashion_test).samples[::5]
    predictor = Predictor.from_artifact(tiny, result.artifact_dir)
    images = torch.stack([predictor.transform(Image.open(s.path).convert("RGB")) for s in samples])
    with torch.no_grad():
        raw = ref.image_features(tiny.clip, images, None)
    features = raw / raw.norm(dim=-1, keepdim=True)
    expected = ref.gda_logits(features, classifier, tensors["gda_weights"], tensors["gda_bias"],
                              float(tensors["gda_alpha"]), float(tiny.clip.logit_scale.exp()))
    torch.testing.assert_close(predictor.logits(images), expected, atol=1e-3, rtol=1e-5)


def test_a_subset_of_classes_ranks_as_the_whole_head(trained, tiny, fashion_test):
    _, result = trained
    predictor = Predictor.from_artifact(tiny, result.artifact_dir)
    subset = predictor.for_classes(["sneaker", "bag"])
    assert isinstance(subset.gda, GdaHead)
    images = predictor.preprocess([Image.open(s.path) for s in scan_image_folder(fashion_test).samples[:6]])
    torch.testing.assert_close(subset.logits(images), predictor.logits(images)[:, [2, 0]])
