"""The one confusion matrix that training's val metrics, `imgjobs label --evaluate` and the review page count."""

import numpy as np

from pipeline.confusion import confusion_matrix


def test_rows_are_true_classes_and_columns_predicted_ones():
    matrix = confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
    assert matrix.dtype == np.int64 and matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_no_pairs_count_nothing():
    assert confusion_matrix(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 2).tolist() == [[0, 0], [0, 0]]
