"""Which given labels are likely wrong, from out-of-fold predicted probabilities: confident learning (Northcutt,
Jiang and Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels", JAIR 2021), written here from the
paper, since cleanlab's AGPL-3.0 licence must not become our users' dependency. NumPy only: arrays of any length,
never a Python object per image.

1. Each class j gets a threshold t_j, the mean predicted probability of j over the images labeled j.
2. The confident joint C[i, j] counts the images labeled i whose probability of j reaches t_j (of several such
   classes, the likeliest).
3. C is calibrated so that each row sums to the number of images labeled i: C[i, j] estimates how many images
   labeled i are truly j.
4. Prune by noise rate: of the images labeled i, the round(C[i, j]) with the largest margin p_j - p_i are suspects,
   for every j != i; an image whose likeliest class is its given label is never one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Audit:
    """Per image: the likeliest class, the probability of the given label, and whether it is a suspect. Per run:
    the per-class thresholds and the calibrated confident joint (rows: given label, columns: likely true label)."""

    suggested: np.ndarray
    self_confidence: np.ndarray
    suspect: np.ndarray
    thresholds: np.ndarray
    joint: np.ndarray


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of each image: each class's images in a seeded random order, dealt out in turn, so
    that every fold holds each class's share. Depends only on the labels' order, the fold count and the seed."""
    labels = np.asarray(labels)
    order = np.lexsort((np.random.default_rng(seed).random(len(labels)), labels))
    ranked = labels[order]
    within_class = np.arange(len(labels)) - np.searchsorted(ranked, ranked)
    fold = np.empty(len(labels), dtype=np.int16)
    fold[order] = within_class % folds
    return fold


def find_label_issues(labels: np.ndarray, probs: np.ndarray) -> Audit:
    """Confident learning over `probs` (images x classes, out-of-fold) and the given `labels` (class indices)."""
    labels, probs = np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    n, k = probs.shape
    given = np.bincount(labels, minlength=k)
    thresholds = np.array([probs[labels == j, j].mean() if given[j] else 1.0 for j in range(k)])
    joint = calibrated_joint(labels, probs, thresholds, given)
    suggested = probs.argmax(1)
    suspect = np.zeros(n, dtype=bool)
    for i in range(k):
        rows = np.flatnonzero(labels == i)
        for j in range(k):
            count = int(round(joint[i, j]))
            if j == i or not count:
                continue
            margin = probs[rows, j] - probs[rows, i]
            suspect[rows[np.argsort(-margin, kind="stable")[:count]]] = True
    suspect &= suggested != labels
    return Audit(suggested, probs[np.arange(n), labels], suspect, thresholds, joint)


def calibrated_joint(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, given: np.ndarray) -> np.ndarray:
    """Steps 2 and 3: the confident joint, each row scaled to the count of images labeled with its class."""
    k = probs.shape[1]
    confident = probs >= thresholds - 1e-6  # the paper's >=, kept under float rounding of the mean
    counted = confident.any(1)
    likely = np.where(confident, probs, -1.0).argmax(1)
    joint = np.zeros((k, k))
    np.add.at(joint, (labels[counted], likely[counted]), 1)
    rows = joint.sum(1, keepdims=True)
    return np.divide(joint * given[:, None], rows, out=np.zeros_like(joint), where=rows > 0)
