"""Labels you can trust: per-class score thresholds that certify a target precision, from held-out scores.

Held-out predictions are kept as histograms, per predicted class, of the top-1 scores of right and of wrong
predictions over fixed score bins (EDGES): bounded in size whatever the number of images, and all that a threshold
needs. A class's threshold comes from fixed-sequence testing: walk the edges from high scores to low, and keep the
last edge (of a bin that holds held-out rows) at which the one-sided Clopper-Pearson lower bound on the precision
of the held-out rows scored at or over it is still at least the target, starting from the first edge with enough
rows to pass. The edges are tested in a fixed order and the walk stops at the first failure, so trying many edges
does not spend the confidence level (Bauer, "Multiple testing in clinical trials", 1991). The precision is
certified for images drawn like the held-out ones.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
# Score bins: hundredths up to 0.9, then a tenth of a decade at a time up to 1 - 1e-6, where fine-tuned networks put
# most of their scores and where high targets are decided.
EDGES = np.array([i / 100 for i in range(90)] + [1 - 0.1 * 10 ** (-j / 10) for j in range(51)])


def calibration_share(keys: list[str], fraction: float, seed: int) -> np.ndarray:
    """Which of `keys` are in the calibration share of val (training's data.calibration_fraction): a seeded hash of
    each key, so the same images on every epoch, worker and rerun, whatever order they come in."""
    if not fraction:  # no share: no key need be hashed
        return np.zeros(len(keys), dtype=bool)
    salt = str(seed).encode()
    return np.array([int.from_bytes(hashlib.blake2b(key.encode(errors="surrogatepass"), digest_size=8,
                                                    key=salt).digest(), "little") < fraction * 2**64
                     for key in keys], dtype=bool)


@dataclass(frozen=True)
class HeldOut:
    """Held-out top-1 predictions: per predicted class (rows) and score bin (columns), how many were right and
    how many wrong."""

    classes: tuple[str, ...]
    right: np.ndarray  # int64, classes x len(EDGES)
    wrong: np.ndarray

    @classmethod
    def empty(cls, classes: list[str]) -> HeldOut:
        shape = (len(classes), len(EDGES))
        return cls(tuple(classes), np.zeros(shape, np.int64), np.zeros(shape, np.int64))

    def add(self, predicted: np.ndarray, scores: np.ndarray, truth: np.ndarray) -> HeldOut:
        """These and more predictions: class indices, their top-1 scores, and the true class indices."""
        bins = np.clip(np.searchsorted(EDGES, scores, side="right") - 1, 0, len(EDGES) - 1)
        cells = np.asarray(predicted, np.int64) * len(EDGES) + bins
        size = self.right.size
        hits = np.asarray(predicted) == np.asarray(truth)
        return HeldOut(self.classes, self.right + np.bincount(cells[hits], minlength=size).reshape(self.right.shape),
                       self.wrong + np.bincount(cells[~hits], minlength=size).reshape(self.wrong.shape))

    @property
    def count(self) -> int:
        return int(self.right.sum() + self.wrong.sum())

    def as_dict(self) -> dict:
        """For JSON: the edges and, per class, its non-zero bins as {bin: [right, wrong]}."""
        per_class = {}
        for name, right, wrong in zip(self.classes, self.right, self.wrong, strict=True):
            per_class[name] = {int(b): [int(right[b]), int(wrong[b])] for b in np.flatnonzero(right + wrong)}
        return {"edges": EDGES.tolist(), "bins": per_class}

    @classmethod
    def of_dict(cls, found: dict) -> HeldOut:
        held = cls.empty(list(found["bins"]))
        for row, bins in enumerate(found["bins"].values()):
            for b, (right, wrong) in bins.items():
                held.right[row, int(b)], held.wrong[row, int(b)] = right, wrong
        return held


@dataclass(frozen=True)
class Threshold:
    """One class's threshold on the top-1 score, and the held-out counts behind it."""

    threshold: float | None  # None: the held-out rows certify no threshold, and the class accepts nothing
    right: int  # held-out rows predicted this class, scored at or over the threshold, that were right
    wrong: int  # and that were wrong
    predicted: int  # held-out rows predicted this class
    needed: int  # right held-out rows, none wrong, that would certify the target on their own

    @property
    def accepted_share(self) -> float:
        """The share of held-out rows predicted this class that the threshold accepts: what to expect of new ones."""
        return (self.right + self.wrong) / self.predicted if self.predicted else 0.0


def thresholds(held: HeldOut, target: float, confidence: float = CONFIDENCE) -> dict[str, Threshold]:
    """Each class's threshold certifying precision `target` at `confidence`, by fixed-sequence testing."""
    return {name: _threshold(right, wrong, target, confidence)
            for name, right, wrong in zip(held.classes, held.right, held.wrong, strict=True)}


def _threshold(right: np.ndarray, wrong: np.ndarray, target: float, confidence: float) -> Threshold:
    # From the top bin down: the rows scored at or over each edge, tested at each edge whose bin holds rows, so a
    # threshold never drops below the lowest held-out score behind it. Where fewer rows than `needed` score at or
    # over an edge, no outcome could pass its test: the walk starts below. Both depend on the scores alone, not on
    # which rows are right, so the order of the tests is fixed given the scores, and the confidence level holds.
    at_or_over_right, at_or_over_wrong = np.cumsum(right[::-1])[::-1], np.cumsum(wrong[::-1])[::-1]
    needed = rows_needed(target, confidence)
    passed = None
    for edge in range(len(EDGES) - 1, -1, -1):
        k, n = int(at_or_over_right[edge]), int(at_or_over_right[edge] + at_or_over_wrong[edge])
        if n < needed or not right[edge] + wrong[edge]:  # no held-out row in its bin: the same test as the last
            continue
        if not certifies(k, n, target, confidence):
            break
        passed = edge
    predicted = int(right.sum() + wrong.sum())
    if passed is None:
        return Threshold(None, 0, 0, predicted, needed)
    return Threshold(float(EDGES[passed]), int(at_or_over_right[passed]), int(at_or_over_wrong[passed]), predicted,
                     needed)


def certifies(right: int, rows: int, target: float, confidence: float = CONFIDENCE) -> bool:
    """Whether `right` right of `rows` put the one-sided Clopper-Pearson lower bound on the precision at or over
    `target`: the bound is the (1 - confidence) quantile of Beta(right, rows - right + 1), which is at least `target`
    exactly when that Beta's CDF at `target` is at most 1 - confidence."""
    if right == 0:
        return False
    return regularized_beta(target, right, rows - right + 1) <= 1 - confidence


def rows_needed(target: float, confidence: float = CONFIDENCE) -> int:
    """The fewest held-out rows, all right, that certify `target`: n right of n bound the precision by
    (1 - confidence) ** (1 / n)."""
    return math.ceil(math.log(1 - confidence) / math.log(target))


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the CDF of Beta(a, b) at x, by its continued fraction (Numerical Recipes, 3rd ed., 6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _continued_fraction(a, b, x) / a
    return 1 - front * _continued_fraction(b, a, 1 - x) / b


def _continued_fraction(a: float, b: float, x: float, eps: float = 1e-15) -> float:
    """Lentz's method; it converges in O(sqrt(max(a, b))) terms where it is used (x below the mean)."""
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < eps:
            return h
    return h
