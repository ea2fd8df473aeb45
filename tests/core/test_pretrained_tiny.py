"""The tiny backbone pretrained on Fashion-MNIST (upt/weights): it knows something, and the two shifted
fixtures behave as the paper's appendix says data sets of each kind do.

Fixtures: tests/fixtures/fashion_mnist (4 classes, images from the test split, which pretraining never
saw), fashion_mnist_visual_shift (the same images inverted and rotated) and fashion_mnist_text_shift
(the same images, classes renamed with words no pretraining caption contains).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from upt.analysis import analyze
from upt.data import scan_image_folder
from upt.predict import Predictor
from upt.training import TrainConfig, train

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FASHION = FIXTURES / "fashion_mnist"
FASHION_VISUAL_SHIFT = FIXTURES / "fashion_mnist_visual_shift"
FASHION_TEXT_SHIFT = FIXTURES / "fashion_mnist_text_shift"
# Short few-shot training for the adaptation test: 12 training and 4 validation images per class.
SHORT_TRAINING = dict(shots=16, epochs=30, lr=0.05, batch_size=16, seed=1)


def zero_shot_accuracy(backbone, data_dir: Path) -> float:
    folder = scan_image_folder(data_dir)
    return Predictor.zero_shot(backbone, folder.class_names).evaluate(folder.samples)["accuracy"]


def test_shipped_weights_match_their_recorded_sha256(pretrained_tiny_checkpoint):
    recorded = Path(f"{pretrained_tiny_checkpoint}.sha256").read_text().split()[0]
    assert hashlib.sha256(pretrained_tiny_checkpoint.read_bytes()).hexdigest() == recorded


def test_zero_shot_in_domain_is_far_above_chance(pretrained_tiny):
    assert zero_shot_accuracy(pretrained_tiny, FASHION / "test") >= 0.8


@pytest.mark.parametrize("shifted", [FASHION_VISUAL_SHIFT, FASHION_TEXT_SHIFT], ids=["visual", "text"])
def test_each_shift_lowers_zero_shot(pretrained_tiny, shifted):
    in_domain = zero_shot_accuracy(pretrained_tiny, FASHION / "test")
    assert zero_shot_accuracy(pretrained_tiny, shifted / "test") < in_domain - 0.2


def test_variances_rank_the_shifts_as_the_appendix_predicts(pretrained_tiny):
    """The visual shift has the larger intra-class visual variance; the text shift, whose images are
    the in-domain ones, the smaller inter-class text variance."""
    in_domain, visual, text = (analyze(pretrained_tiny, root / "test")
                               for root in (FASHION, FASHION_VISUAL_SHIFT, FASHION_TEXT_SHIFT))
    assert visual.intra_class_visual > text.intra_class_visual == pytest.approx(in_domain.intra_class_visual)
    assert text.inter_class_text < in_domain.inter_class_text
    assert visual.inter_class_text == pytest.approx(in_domain.inter_class_text)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vpt-deep", "upt"])
def test_visual_prompts_adapt_to_the_visual_shift(pretrained_tiny, method, tmp_path):
    zero_shot = zero_shot_accuracy(pretrained_tiny, FASHION_VISUAL_SHIFT / "test")
    result = train(pretrained_tiny, FASHION_VISUAL_SHIFT / "train", TrainConfig.of(method, **SHORT_TRAINING),
                   tmp_path / method)
    tuned = Predictor.from_artifact(pretrained_tiny, result.artifact_dir)
    accuracy = tuned.evaluate(scan_image_folder(FASHION_VISUAL_SHIFT / "test").samples)["accuracy"]
    assert accuracy >= zero_shot + 0.05, (method, accuracy, zero_shot)  # two test images at least
