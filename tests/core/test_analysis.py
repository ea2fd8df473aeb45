from __future__ import annotations

import pytest
import torch

from upt.analysis import analyze, inter_class_variance, intra_class_variance


def test_variances_follow_the_appendix_formulas():
    features = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # class 0: mean (1, 0), squared distances 1 and 1; class 1: mean (0, 2), distances 1 and 1
    assert intra_class_variance(features, labels, 2).tolist() == [1.0, 1.0]
    classes = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0]])
    mean = classes.mean(dim=0)
    assert inter_class_variance(classes) == float(((classes - mean) ** 2).sum(dim=1).mean())


def test_analyze_an_image_folder(tiny, fashion_test):
    report = analyze(tiny, fashion_test)
    assert set(report.per_class_visual) == {"bag", "pullover", "sneaker", "trouser"}
    assert report.intra_class_visual == pytest.approx(sum(report.per_class_visual.values()) / 4)
    assert report.images == 40 and f"{report.intra_class_visual:.3f}" in report.interpretation()
