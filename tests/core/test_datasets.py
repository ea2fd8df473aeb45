"""Data sets in CoOp's layout: class names, splits, templates and ImageNet's variants."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from upt.artifact import CONFIG_FILE, TENSORS_FILE
from upt.datasets import few_shot_split, load_data, resolve_templates
from upt.errors import ConfigError, DataError
from upt.methods import ENSEMBLE_TEMPLATES, PromptConfig, PromptedCLIP, template_classifier
from upt.predict import Predictor
from upt.training import TrainConfig, train

from coop_layout import DISPLAY, FASHION, FOLDERS, coop_root, imagenet_root


def test_split_file_gives_the_splits_names_and_its_val(tmp_path):
    source = load_data(FASHION)  # found by its split_zhou_*.json
    assert source.class_names == DISPLAY and source.template is None
    assert (len(source.train), len(source.val), len(source.test)) == (48, 16, 40)
    split = few_shot_split(source, shots=12, seed=1)
    val_paths = {s.path for s in source.val}
    assert len(split.train) == 48  # all 12 train images of each class train: none is held out for validation
    assert {s.path for s in split.val} <= val_paths and len(split.val) == 16  # min(K, 4) a class, from val
    assert not {s.path for s in split.train} & val_paths
    assert few_shot_split(source, 2, seed=1) == few_shot_split(source, 2, seed=1)
    assert few_shot_split(source, 2, seed=1) != few_shot_split(source, 2, seed=2)


def test_trained_artifact_holds_the_splits_names(tiny, tmp_path):
    result = train(tiny, FASHION, TrainConfig.of("coop", shots=2, epochs=1, batch_size=8), tmp_path / "a")
    config = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert config["class_names"] == DISPLAY
    assert config["data"] == {"dataset": "FashionMNIST", "classes": 4, "train": 48, "val": 16, "test": 40}
    assert result.metrics["train_count"] == 8 and result.metrics["val_count"] == 8


def test_dataset_template_reaches_the_classifier(tiny_checkpoint, tiny, tmp_path):
    root = coop_root(tmp_path / "data", "eurosat", "2750", "split_zhou_EuroSAT.json")
    out = tmp_path / "artifact"
    subprocess.run([sys.executable, "-m", "upt", "train", "--data", str(root), "--dataset", "eurosat",
                    "--method", "vpt-shallow", "--shots", "1", "--epochs", "0", "--model", "upt-tiny",
                    "--pretrained", str(tiny_checkpoint), "--out", str(out), "--quiet"], check=True, timeout=300)
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["prompt"]["templates"] == ["a centered satellite photo of {}."]
    classifier = load_file(str(out / TENSORS_FILE))["classifier"]
    expected = template_classifier(tiny, DISPLAY, ("a centered satellite photo of {}.",))
    assert torch.allclose(classifier, expected, atol=1e-6)
    assert not torch.allclose(classifier, template_classifier(tiny, DISPLAY, ("a photo of a {}.",)), atol=1e-3)


def test_templates_the_user_the_data_set_and_coops_ensemble(tmp_path):
    eurosat = load_data(coop_root(tmp_path / "a", "eurosat", "2750", "split_zhou_EuroSAT.json"), "eurosat")
    dtd = load_data(coop_root(tmp_path / "b", "dtd", "images", "split_zhou_DescribableTextures.json"), "dtd")
    imagenet = load_data(imagenet_root(tmp_path / "c"), "imagenet")
    assert resolve_templates(None, False, dtd) == ("{} texture.",)
    assert resolve_templates("a sketch of a {}.", False, dtd) == ("a sketch of a {}.",)
    assert resolve_templates(None, False, None) == ("a photo of a {}.",)
    assert resolve_templates(None, True, eurosat) == ENSEMBLE_TEMPLATES + ("a centered satellite photo of {}.",)
    assert resolve_templates(None, True, imagenet) == ENSEMBLE_TEMPLATES  # CoOp adds none for ImageNet
    assert resolve_templates("a {} here.", True, None) == ENSEMBLE_TEMPLATES + ("a {} here.",)
    with pytest.raises(ConfigError, match="needs '{}'"):
        resolve_templates("a photo", False, None)


def test_imagenet_and_its_variants_map_classes_as_coop(tiny, tmp_path):
    root = imagenet_root(tmp_path)
    imagenet = load_data(root, "imagenet")
    assert imagenet.class_names == ["handbag", "pullover sweater", "sneaker shoe", "pair of trousers"]  # wnid order
    assert imagenet.val is None and len(imagenet.train) == 64 and len(imagenet.test) == 40
    split = few_shot_split(imagenet, 4, seed=2)  # validation held out of train: never a test image
    assert len(split.train) == 16 and len(split.val) == 16
    assert not {s.path for s in split.val} & {s.path for s in imagenet.test}
    assert not {s.path for s in split.val} & {s.path for s in split.train}
    adversarial = load_data(root, "imagenet_a")
    assert adversarial.class_names == ["handbag", "sneaker shoe"] and not adversarial.train  # README.txt skipped
    assert {s.label for s in adversarial.test if s.path.parent.name == "n03"} == {1}
    v2 = load_data(root / "imagenetv2", "imagenetv2")  # the data set's own folder works too
    assert v2.class_names == imagenet.class_names and len(v2.test) == 40
    zero_shot = Predictor.zero_shot(tiny, imagenet.class_names)
    subset = zero_shot.for_classes(adversarial.class_names)
    assert torch.equal(subset.classifier, zero_shot.classifier[[0, 2]])
    built_for_200 = Predictor.zero_shot(tiny, adversarial.class_names)
    assert torch.allclose(subset.classifier, built_for_200.classifier, atol=1e-6)  # CoOp rebuilds it for the subset
    assert subset.evaluate(adversarial.test)["count"] == 20
    with pytest.raises(DataError, match="no training split"):
        train(tiny, adversarial, TrainConfig.of("zero-shot"), tmp_path / "x")
    with pytest.raises(DataError, match="No sun397 data set at .*sun397/split_zhou_SUN397.json"):
        load_data(root, "sun397")


def test_eval_command_on_an_imagenet_variant(tiny_checkpoint, tmp_path):
    root = imagenet_root(tmp_path / "data")
    common = ["--model", "upt-tiny", "--pretrained", str(tiny_checkpoint)]
    subprocess.run([sys.executable, "-m", "upt", "train", "--data", str(root), "--dataset", "imagenet", "--method",
                    "zero-shot", *common, "--out", str(tmp_path / "a"), "--quiet"], check=True, timeout=300)
    result = subprocess.run([sys.executable, "-m", "upt", "eval", "--artifact", str(tmp_path / "a"), "--data",
                             str(root), "--dataset", "imagenet_r", "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["count"] == 20 and list(report["per_class_accuracy"]) == ["handbag", "sneaker shoe"]


def test_image_folder_display_names_from_classnames_txt(tmp_path):
    for folder in FOLDERS:
        os.symlink(FASHION / "test" / folder, tmp_path / folder)
    (tmp_path / "classnames.txt").write_text("".join(f"{f} {d}\n" for f, d in zip(FOLDERS, DISPLAY)))
    source = load_data(tmp_path)
    assert source.class_names == DISPLAY and source.val is None
    assert load_data(tmp_path, class_names=["sneaker shoe", "bag"]).class_names == ["sneaker shoe", "bag"]
    (tmp_path / "classnames.txt").write_text("bag handbag\n")
    with pytest.raises(DataError, match="names no class for folder"):
        load_data(tmp_path)


def test_tokenizer_without_a_start_token_is_refused_for_text_context(tiny):
    def no_start_token(texts, context_length=77):
        ids = tiny.tokenizer(texts, context_length=context_length)
        return torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)  # [SOS] dropped: names start at 0

    backbone = dataclasses.replace(tiny, tokenizer=no_start_token)
    with pytest.raises(ConfigError, match="no start token"):
        PromptedCLIP(backbone, ["cat", "dog"], PromptConfig("coop"))
    PromptedCLIP(backbone, ["cat", "dog"], PromptConfig("vpt-shallow"))  # no text context: fine


def _dassl_few_shot(items: list, k: int) -> list:
    """Dassl's DatasetBase.generate_fewshot_dataset, written out: classes in order of first appearance,
    random.sample(items, k) whenever a class has at least k (the global generator, seeded before)."""
    import random
    from collections import defaultdict

    tracker = defaultdict(list)
    for item in items:
        tracker[item.label].append(item)
    dataset = []
    for _, group in tracker.items():
        dataset.extend(random.sample(group, k) if len(group) >= k else group)
    return dataset


@pytest.mark.parametrize("shots, seed", [(1, 1), (4, 2), (16, 3)])
def test_few_shot_split_draws_dassls_images_for_a_seed(tmp_path, shots, seed):
    import random

    root = coop_root(tmp_path, "oxford_pets", "images", "split_zhou_OxfordPets.json")
    source = load_data(root / "oxford_pets", "oxford_pets")
    source = dataclasses.replace(source, train=source.train[::-1])  # labels not in order: first appearance counts
    split = few_shot_split(source, shots, seed)
    random.seed(seed)  # Dassl's set_random_seed before building the data set
    train = _dassl_few_shot(source.train, shots)
    val = _dassl_few_shot(source.val, min(shots, 4))
    assert [s.path for s in split.train] == [s.path for s in train]
    assert [s.path for s in split.val] == [s.path for s in val]


def test_imagenets_training_free_classifier_is_the_template_ensemble(tiny, tmp_path):
    imagenet = load_data(imagenet_root(tmp_path / "data"), "imagenet")
    result = train(tiny, imagenet, TrainConfig.of("gda", shots=2, augment_views=1), tmp_path / "gda")
    classifier = load_file(str(result.artifact_dir / TENSORS_FILE))["classifier"]
    torch.testing.assert_close(classifier, template_classifier(tiny, imagenet.class_names, ENSEMBLE_TEMPLATES))
    given = train(tiny, imagenet, TrainConfig.of("tip-adapter", shots=2, augment_views=1, templates=("art of the {}.",)),
                  tmp_path / "tip")
    torch.testing.assert_close(load_file(str(given.artifact_dir / TENSORS_FILE))["classifier"],
                               template_classifier(tiny, imagenet.class_names, ("art of the {}.",)))
