"""Nearest-neighbour classification: the neighbours' weighted vote.

Why these weights: ``uniform`` and ``distance`` (1/d) match scikit-learn's
KNeighborsClassifier exactly, so results can be checked against it;
``softmax`` (exp(similarity / T), T = 0.07) is what DINO's kNN evaluation
uses and is usually best for normalised embeddings, since close neighbours
dominate without a hard cut-off.

Abstention: when the top probability is below a threshold, the prediction is
``"unknown"``. The threshold is calibrated on the val split (leave-one-out, each
val item is searched without itself) as the lowest one whose predictions reach a
target precision, so the classifier abstains no more than it must.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from featurebank.core.errors import FailedPrecondition, InvalidInput

if TYPE_CHECKING:
    from featurebank.index.searcher import Searcher, SearchResult

log = logging.getLogger(__name__)

WEIGHTS = ("uniform", "distance", "softmax")
UNKNOWN = "unknown"


def distances_from_scores(scores: np.ndarray, metric: str) -> np.ndarray:
    """Back from "higher is more similar" scores to distances (Euclidean, or cosine 1 - s)."""
    if metric == "l2":
        return np.maximum(-scores, 0.0)
    return np.maximum(1.0 - scores, 0.0)


def neighbour_weights(
    scores: np.ndarray, weights: str, temperature: float, metric: str
) -> np.ndarray:
    """Per-neighbour vote weights, (n, k) float64."""
    s = np.asarray(scores, dtype=np.float64)
    if weights == "uniform":
        return np.ones_like(s)
    if weights == "distance":
        # Exactly scikit-learn's rule: 1/d, and rows with an exact match count only those.
        d = distances_from_scores(s, metric)
        with np.errstate(divide="ignore"):
            w = 1.0 / d
        inf_mask = np.isinf(w)
        inf_row = inf_mask.any(axis=1)
        w[inf_row] = inf_mask[inf_row]
        return w
    if weights == "softmax":
        if temperature <= 0:
            raise InvalidInput(f"temperature must be positive, got {temperature}")
        finite = np.where(np.isfinite(s), s, -np.inf)
        top = np.max(finite, axis=1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        return np.exp((finite - top) / temperature)  # shift cancels after normalising
    raise InvalidInput(f"unknown vote weights {weights!r}: use one of {', '.join(WEIGHTS)}")


def vote(
    label_codes: np.ndarray,
    scores: np.ndarray,
    n_classes: int,
    weights: str = "softmax",
    temperature: float = 0.07,
    metric: str = "cosine",
) -> np.ndarray:
    """Class probabilities (n, n_classes) from neighbours' label codes (-1 = none) and scores.

    Rows with no labelled neighbour get all zeros. `metric` says how scores map
    back to distances for ``distance`` weights (l2: score = -distance).
    """
    codes = np.asarray(label_codes)
    if codes.shape != np.shape(scores):
        raise InvalidInput(f"label codes {codes.shape} and scores {np.shape(scores)} differ")
    n = codes.shape[0]
    if n_classes <= 0 or n == 0:
        return np.zeros((n, max(n_classes, 0)), dtype=np.float64)
    w = neighbour_weights(np.asarray(scores), weights, temperature, metric)
    valid = (codes >= 0) & (codes < n_classes) & np.isfinite(w)
    rows = np.broadcast_to(np.arange(n)[:, None], codes.shape)
    flat = rows[valid] * n_classes + codes[valid]
    sums = np.bincount(flat, weights=w[valid], minlength=n * n_classes).reshape(n, n_classes)
    total = sums.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        probs = np.where(total > 0, sums / np.where(total > 0, total, 1.0), 0.0)
    return probs


def calibrate_threshold(confidence: np.ndarray, correct: np.ndarray, precision: float) -> float:
    """Lowest confidence threshold whose kept predictions reach `precision`.

    Keeping everything with confidence >= t; among thresholds meeting the target,
    the lowest keeps the most. Returns 1.0 + eps (abstain always) if none does.
    """
    if not 0 < precision <= 1:
        raise InvalidInput(f"target precision must be in (0, 1], got {precision}")
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if conf.size == 0:
        raise FailedPrecondition("no val items to calibrate the abstention threshold on")
    order = np.argsort(-conf, kind="stable")
    conf, ok = conf[order], ok[order]
    cum_prec = np.cumsum(ok) / np.arange(1, conf.size + 1)
    # Only cut between different confidences: everything tied with conf[i] is kept with it.
    last_of_tie = np.r_[conf[1:] != conf[:-1], True]
    meets = np.flatnonzero(last_of_tie & (cum_prec >= precision))
    if meets.size == 0:
        return float(np.nextafter(1.0, 2.0))
    return float(conf[meets[-1]])


class KnnClassifier:
    """Classify vectors by their k nearest labelled neighbours in a Searcher."""

    def __init__(
        self,
        searcher: Searcher,
        k: int = 20,
        weights: str = "softmax",
        temperature: float = 0.07,
        threshold: float | None = None,
    ) -> None:
        if k <= 0:
            raise InvalidInput(f"k must be positive, got {k}")
        if weights not in WEIGHTS:
            raise InvalidInput(f"unknown vote weights {weights!r}: use one of {', '.join(WEIGHTS)}")
        if temperature <= 0:
            raise InvalidInput(f"temperature must be positive, got {temperature}")
        self.searcher = searcher
        self.k = k
        self.weights = weights
        self.temperature = temperature
        self.threshold = threshold

    def predict_proba(
        self,
        vectors: np.ndarray,
        k: int | None = None,
        exclude_ids: np.ndarray | None = None,
        labels: Sequence[str] | None = None,
    ) -> tuple[np.ndarray, list[str], SearchResult]:
        """(probs (n, C), vocabulary, neighbours); `exclude_ids` drops each row's own item."""
        k = min(k or self.k, self.searcher.ntotal)
        result = self.searcher.search(
            vectors, k, labels=labels, exclude_ids=exclude_ids, voters_only=True
        )
        vocabulary = result.vocabulary
        probs = vote(
            result.label_codes,
            result.scores,
            len(vocabulary),
            self.weights,
            self.temperature,
            self.searcher.metric,
        )
        return probs, vocabulary, result

    def predict(
        self, vectors: np.ndarray, exclude_ids: np.ndarray | None = None
    ) -> list[str]:
        """Top label per row; "unknown" below the abstention threshold or with no labelled neighbour."""
        probs, vocabulary, _ = self.predict_proba(vectors, exclude_ids=exclude_ids)
        return decide(probs, vocabulary, self.threshold)

    def calibrate(self, precision: float = 0.95, split: str = "val") -> float:
        """Set (and return) the abstention threshold from the store's `split` items."""
        items = self.searcher.store.to_numpy(split=split, labelled_only=True)
        if len(items) == 0:
            raise FailedPrecondition(f"no labelled {split!r} items to calibrate on")
        probs, vocabulary, _ = self.predict_proba(
            items.vectors, exclude_ids=items.ids.astype(np.int64)
        )
        best = probs.argmax(axis=1)
        predicted = [vocabulary[i] if probs[r, i] > 0 else None for r, i in enumerate(best)]
        correct = np.array([p == t for p, t in zip(predicted, items.labels, strict=True)])
        self.threshold = calibrate_threshold(probs.max(axis=1), correct, precision)
        log.info(
            "abstention threshold %.4f for precision %.3f on %d %s items",
            self.threshold, precision, len(items), split,
        )
        return self.threshold


def decide(probs: np.ndarray, vocabulary: Sequence[str], threshold: float | None) -> list[str]:
    """Arg-max labels, "unknown" where the top probability is 0 or below `threshold`."""
    if probs.shape[0] == 0:
        return []
    best = probs.argmax(axis=1)
    top = probs[np.arange(probs.shape[0]), best]
    cut = 0.0 if threshold is None else threshold
    return [
        vocabulary[b] if (t > 0 and t >= cut) else UNKNOWN
        for b, t in zip(best.tolist(), top.tolist(), strict=True)
    ]
