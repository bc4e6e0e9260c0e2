"""Classification metrics that both jobs report."""

from __future__ import annotations


def confusion_matrix(targets: list[int], predictions: list[int], num_classes: int) -> list[list[int]]:
    """Rows are true classes, columns predicted ones. Predictions of -1 (skipped images) are left out."""
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(targets, predictions):
        if p >= 0:
            matrix[t][p] += 1
    return matrix
