"""Tip-Adapter and Tip-Adapter-F: equivalences with zero-shot, the cache, the grid search, the artifact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import reference as ref

from upt.artifact import load_artifact
from upt.data import eval_transform, read_image_file, sample_few_shot, scan_image_folder
from upt.encoders import encode_image
from upt.errors import ConfigError
from upt.methods.model import template_classifier
from upt.methods.tip_adapter import (
    CacheModel,
    CacheOptions,
    build_keys,
    encode_samples,
    encode_views,
    fine_tune_keys,
    one_hot_values,
    leave_one_out_search,
)
from upt.predict import Predictor
from upt.training import TrainConfig, train

TEMPLATES = ("a photo of a {}.",)


def _val_images(folder, per_class: int = 3):
    return [s for group in folder.by_class() for s in group[:per_class]]


def test_alpha_zero_gives_the_zero_shot_logits_exactly(tiny, fashion_test):
    folder = scan_image_folder(fashion_test)
    samples = _val_images(folder)
    zero_shot = Predictor.zero_shot(tiny, folder.class_names)
    keys = encode_samples(tiny, samples, eval_transform(tiny.image), normalize=True)
    values = one_hot_values(torch.tensor([s.label for s in samples]), len(folder.class_names))
    cached = Predictor(tiny, folder.class_names, zero_shot.classifier, cache=CacheModel(keys, values, 0.0, 5.0))
    batch = zero_shot.preprocess([read_image_file(s.path) for s in samples])
    assert torch.equal(cached.logits(batch), zero_shot.logits(batch))
    with_cache = Predictor(tiny, folder.class_names, zero_shot.classifier, cache=CacheModel(keys, values, 1.0, 5.0))
    assert not torch.equal(with_cache.logits(batch), zero_shot.logits(batch))


def test_a_cache_of_one_image_per_class_classifies_those_images(tiny, fashion_test):
    folder = scan_image_folder(fashion_test)
    samples = _val_images(folder, per_class=1)
    labels = torch.tensor([s.label for s in samples])
    keys = encode_samples(tiny, samples, eval_transform(tiny.image), normalize=True)
    classifier = template_classifier(tiny, folder.class_names, TEMPLATES)
    # The random tiny backbone's zero-shot gets most of these wrong; the cache, weighed enough, fixes all:
    # each image's own key has affinity 1 (a vote of α), every other key a vote below α·exp(−β(1 − a)).
    predictor = Predictor(tiny, folder.class_names, classifier,
                          cache=CacheModel(keys, one_hot_values(labels, len(labels)), 1e4, 50.0))
    report = predictor.evaluate(samples)
    assert report["accuracy"] == 1.0
    assert Predictor(tiny, folder.class_names, classifier).evaluate(samples)["accuracy"] < 1.0


def test_keys_are_normalised_means_of_the_augmented_views(tiny, fashion_train):
    samples = _val_images(scan_image_folder(fashion_train), per_class=2)
    options = CacheOptions(augment_views=3)
    views = encode_views(tiny, samples, options, seed=1)
    assert views.shape == (3, len(samples), tiny.clip.visual.output_dim)
    assert not torch.equal(views[0], views[1])  # each view is its own random crop and flip
    assert torch.equal(encode_views(tiny, samples, options, seed=1), views)  # seeded: the same cache again
    keys = build_keys(views)
    assert torch.allclose(keys, F.normalize(views.mean(dim=0), dim=-1))
    assert torch.allclose(keys.norm(dim=-1), torch.ones(len(samples)))


def test_search_picks_the_best_leave_one_out_accuracy_of_the_shots(tiny, fashion_train):
    folder = scan_image_folder(fashion_train.parent.parent / "fashion_mnist_visual_shift" / "train")
    train_samples = _val_images(folder, per_class=4)
    options = CacheOptions(alpha_steps=6, beta_steps=8, augment_views=2)
    views = encode_views(tiny, train_samples, options, seed=1)
    keys = build_keys(views)
    labels = torch.tensor([s.label for s in train_samples])
    values = one_hot_values(labels, 4)
    classifier = template_classifier(tiny, folder.class_names, TEMPLATES)
    result = leave_one_out_search(labels, keys, values, classifier, tiny.logit_scale, options)

    def hits(alpha: float, beta: float) -> int:  # each shot scored by the cache without its own key
        return ref.tip_leave_one_out_hits(keys, values, labels, classifier, tiny.logit_scale, alpha, beta)

    grid = {(a, b): hits(a, b) for b in options.betas() for a in options.alphas()}
    assert len(grid) == 6 * 8 and len(set(grid.values())) > 1  # the grid matters here
    first_best = next(point for point, count in grid.items() if count == max(grid.values()))
    assert (result.alpha, result.beta) == first_best
    assert result.held_out_accuracy == max(grid.values()) / len(labels) and result.held_out_count == len(labels)


def test_released_configs_by_data_set(tiny):
    imagenet, flowers = TrainConfig.of("tip-adapter-f").cache_options(), TrainConfig.of("tip-adapter-f")
    assert (imagenet.beta_max, imagenet.alpha_max, imagenet.init_alpha, imagenet.epochs) == (7, 3, 1.17, 20)
    flowers = flowers.cache_options("oxford_flowers")
    assert (flowers.beta_max, flowers.alpha_max, flowers.init_alpha) == (50, 50, 10)
    eurosat = TrainConfig.of("tip-adapter-f").cache_options("eurosat")
    assert eurosat.epochs == 100 and TrainConfig.of("tip-adapter-f", epochs=3).cache_options("eurosat").epochs == 3
    assert options_grid_ends(TrainConfig.of("tip-adapter").cache_options("fgvc_aircraft")) == (30, 30)
    given = TrainConfig.of("tip-adapter", alpha_max=4, beta_max=9, init_alpha=0.5, init_beta=2).cache_options("dtd")
    assert (given.alpha_max, given.beta_max, given.init_alpha, given.init_beta) == (4, 9, 0.5, 2)
    with pytest.raises(ConfigError) as refused:
        TrainConfig.of("coop", alpha_max=4)  # a prompt method does not search α
    assert refused.value.field == "alpha_max"


def options_grid_ends(options: CacheOptions) -> tuple[float, float]:
    """The released code's grid: from 0.1 towards the maximum, which it never reaches."""
    betas, alphas = options.betas(), options.alphas()
    assert betas[0] == pytest.approx(0.1) and alphas[0] == pytest.approx(0.1)
    step_b, step_a = betas[1] - betas[0], alphas[1] - alphas[0]
    return round(betas[-1] + step_b), round(alphas[-1] + step_a)


def test_tip_adapter_f_trains_only_the_keys(tiny, fashion_train):
    samples = _val_images(scan_image_folder(fashion_train), per_class=4)
    labels = torch.tensor([s.label for s in samples])
    options = CacheOptions(augment_views=2, epochs=5, batch_size=8)
    views = encode_views(tiny, samples, options, seed=1)
    keys, values = build_keys(views), one_hot_values(labels, 4)
    classifier = template_classifier(tiny, scan_image_folder(fashion_train).class_names, TEMPLATES)
    frozen = {name: t.clone() for name, t in tiny.clip.state_dict().items()}
    inputs = [keys.clone(), values.clone(), views.clone(), classifier.clone()]
    epochs = []
    tuned = fine_tune_keys(keys, values, views, labels, classifier, tiny.logit_scale, options, 1, epochs.append)
    assert tuned.shape == keys.shape and not torch.equal(tuned, keys) and not tuned.requires_grad
    for before, after in zip(inputs, [keys, values, views, classifier]):
        assert torch.equal(before, after)  # nothing but the returned keys changed
    assert all(torch.equal(t, frozen[name]) for name, t in tiny.clip.state_dict().items())
    assert [e.epoch for e in epochs] == [1, 2, 3, 4, 5] and epochs[-1].lr == pytest.approx(0.0, abs=1e-12)
    assert epochs[-1].loss < epochs[0].loss


@pytest.mark.parametrize("method", ["tip-adapter", "tip-adapter-f"])
def test_train_writes_a_servable_cache_artifact(tiny, fashion_train, tmp_path, method):
    config = TrainConfig.of(method, shots=4, augment_views=2, epochs=4 if method == "tip-adapter-f" else None)
    result = train(tiny, fashion_train, config, tmp_path / method)
    artifact = load_artifact(result.artifact_dir)
    folder = scan_image_folder(fashion_train)
    split = sample_few_shot(folder, 4, 1)
    tensors = artifact.tensors
    assert tensors["cache_keys"].shape == (16, tiny.clip.visual.output_dim)
    assert torch.equal(tensors["cache_values"], one_hot_values(torch.tensor([s.label for s in split.train]), 4))
    assert torch.allclose(tensors["classifier"], template_classifier(tiny, folder.class_names, TEMPLATES))
    cache = artifact.config["cache"]
    assert float(tensors["cache_alpha"]) == cache["alpha"] == result.metrics["cache"]["alpha"]
    assert float(tensors["cache_beta"]) == cache["beta"] and cache["augment_views"] == 2
    expected_trainable = 16 * tiny.clip.visual.output_dim if method == "tip-adapter-f" else 0
    assert result.metrics["trainable_parameters"] == expected_trainable
    assert len(result.history) == (4 if method == "tip-adapter-f" else 0)
    served = Predictor.from_artifact(tiny, result.artifact_dir).evaluate(split.val)
    assert served["accuracy"] == result.metrics["val_accuracy"] and served["count"] == 16


def test_a_cache_encoder_encodes_the_cache_and_nothing_else_changes(tiny, fashion_train, tmp_path):
    """The API builds a task's instant stage with its serving encoder as the cache encoder: given the
    backbone's own PyTorch tower, the artifact is the one `train` makes without it, tensor for tensor."""
    calls = []

    def pytorch_tower(images):
        calls.append(len(images))
        return encode_image(tiny.clip, images, None, normalize=False)

    config = TrainConfig.of("tip-adapter", shots=4, augment_views=2)
    plain = train(tiny, fashion_train, config, tmp_path / "plain")
    through = train(tiny, fashion_train, config, tmp_path / "through", cache_encoder=pytorch_tower)
    a, b = load_artifact(plain.artifact_dir).tensors, load_artifact(through.artifact_dir).tensors
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert through.metrics["cache"] == plain.metrics["cache"]
    assert sum(calls) == 2 * 16  # two views of the 16 shots: the search needs no other image


def test_a_cache_encoder_shifted_by_a_constant_shifts_the_keys(tiny, fashion_train, tmp_path):
    """The keys come from the cache encoder's raw features (averaged, then normalised), not from the
    backbone: a cache encoder whose features are doubled gives the same keys, one whose features are
    shifted gives other keys."""
    config = TrainConfig.of("tip-adapter", shots=2, augment_views=2)
    raw = lambda images: encode_image(tiny.clip, images, None, normalize=False)  # noqa: E731
    plain = load_artifact(train(tiny, fashion_train, config, tmp_path / "a").artifact_dir).tensors
    doubled = load_artifact(train(tiny, fashion_train, config, tmp_path / "b",
                                  cache_encoder=lambda images: 2 * raw(images)).artifact_dir).tensors
    shifted = load_artifact(train(tiny, fashion_train, config, tmp_path / "c",
                                  cache_encoder=lambda images: raw(images) + 1.0).artifact_dir).tensors
    torch.testing.assert_close(doubled["cache_keys"], plain["cache_keys"], atol=1e-6, rtol=0)
    assert not torch.allclose(shifted["cache_keys"], plain["cache_keys"], atol=1e-3)


def test_methods_with_gradients_take_no_cache_encoder(tiny, fashion_train, tmp_path):
    with pytest.raises(ConfigError, match="takes no cache encoder"):
        train(tiny, fashion_train, TrainConfig.of("coop", shots=1, epochs=1), tmp_path / "coop",
              cache_encoder=lambda images: images)


def test_tip_adapter_f_starts_from_tip_adapters_cache(tiny, fashion_train, tmp_path):
    plain = train(tiny, fashion_train, TrainConfig.of("tip-adapter", shots=2, augment_views=2), tmp_path / "a")
    tuned = train(tiny, fashion_train, TrainConfig.of("tip-adapter-f", shots=2, augment_views=2, epochs=0), tmp_path / "b")
    a, b = load_artifact(plain.artifact_dir).tensors, load_artifact(tuned.artifact_dir).tensors
    assert torch.equal(a["cache_keys"], b["cache_keys"])  # zero epochs of fine-tuning: the training-free keys


@pytest.mark.parametrize("options, message", [
    ({"lr": 0.05}, "tip-adapter-f does not use this option"),  # UnusedOptionError, the registry's rule
    ({"batch_size": 8}, "tip-adapter-f does not use this option"),
    ({"augment_views": 0}, "augment_views"),
    ({"n_ctx": 8}, "tip-adapter-f does not use this option"),
    ({"momentum": 0.5}, "momentum apply to the prompt methods"),  # a Python-only SGD option: the recipe's check
])
def test_options_that_do_not_apply_are_refused(options, message):
    with pytest.raises(ConfigError, match=message) as raised:
        TrainConfig.of("tip-adapter-f", **options).validate()
    assert raised.value.field == next(iter(options))


def test_epochs_of_the_cache_methods():
    assert TrainConfig.of("tip-adapter").total_epochs == 0
    assert TrainConfig.of("tip-adapter-f").total_epochs == 20  # the paper's
    assert TrainConfig.of("tip-adapter-f", epochs=3).total_epochs == 3


def test_a_cache_task_shares_the_raw_feature_pass_with_zero_shot(tiny, fashion_train, fashion_test, tmp_path):
    from upt.serving import TorchImageEncoder, encoder_need, logits_together

    result = train(tiny, fashion_train, TrainConfig.of("tip-adapter", shots=2, augment_views=1), tmp_path / "tip")
    tip = Predictor.from_artifact(tiny, result.artifact_dir)  # reads only the serving tensors
    assert tip.cache is not None and tip.cache.alpha == result.metrics["cache"]["alpha"]
    zero_shot = Predictor.zero_shot(tiny, ["bag", "sneaker"])
    assert encoder_need(tip) == encoder_need(zero_shot)
    samples = _val_images(scan_image_folder(fashion_test), per_class=1)
    batch = tip.preprocess([read_image_file(s.path) for s in samples])
    together = logits_together(TorchImageEncoder(tiny), [(tip, batch[:2]), (zero_shot, batch[2:])])
    assert torch.allclose(together[0], tip.logits(batch[:2]), atol=1e-5)
    assert torch.allclose(together[1], zero_shot.logits(batch[2:]), atol=1e-5)
