"""Classification metrics from predicted and true labels."""

from __future__ import annotations

from typing import Any

import torch


def classification_report(predicted: torch.Tensor, truth: torch.Tensor, class_names: list[str],
                          per_sample: bool = False) -> dict[str, Any]:
    """Accuracy, per-class accuracy and the confusion matrix (rows: true class, columns: predicted);
    with `per_sample`, `correct`: 1 or 0 per prediction, in their order."""
    k = len(class_names)
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((truth.long(), predicted.long()), torch.ones_like(truth, dtype=torch.long), accumulate=True)
    per_class = {}
    for index, name in enumerate(class_names):
        total = int(confusion[index].sum())
        per_class[name] = float(confusion[index, index]) / total if total else None
    count = int(truth.numel())
    report = {
        "accuracy": float(confusion.diag().sum()) / count if count else None,
        "count": count,
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
        "class_names": list(class_names),
    }
    if per_sample:
        report["correct"] = (predicted.long() == truth.long()).int().tolist()
    return report
