"""The confusion matrix, one way for training's val metrics, `imgjobs label --evaluate` and the review page."""

from __future__ import annotations

import numpy as np


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """Counts of each (true, predicted) pair of class indices in [0, classes): a classes × classes int64 matrix,
    a row per true class."""
    pairs = np.asarray(truth, dtype=np.int64) * classes + np.asarray(predicted, dtype=np.int64)
    return np.bincount(pairs, minlength=classes * classes).reshape(classes, classes)
