"""Abstention: answer "unknown" rather than a label the classifier is unlikely to get right.

Why calibrated on cross-validated scores: a user asks for a precision (say 0.98), not
a probability cut-off. The threshold is the lowest top-probability at which the
predictions of items the classifier did not learn from (leave-one-out for kNN,
out-of-fold for the head and the hybrid, recorded when the head is trained) reach
that precision, so it abstains no more than it must.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from featurebank.core.errors import FailedPrecondition, InvalidInput
from featurebank.core.vocabulary import UNKNOWN

CALIBRATION_FILE = "calibration.npz"


def check_precision(precision: float) -> float:
    """A target precision in (0, 1], else InvalidInput naming it."""
    if not 0 < precision <= 1:
        raise InvalidInput(f"abstain_below is a target precision in (0, 1], got {precision}")
    return float(precision)


def calibrate_threshold(
    confidence: np.ndarray, correct: np.ndarray, precision: float, smooth: bool = False
) -> float:
    """Lowest confidence threshold whose kept predictions reach `precision`.

    Keeping everything with confidence >= t; among thresholds meeting the target,
    the lowest keeps the most. Returns 1.0 + eps (abstain always) if none does.
    With `smooth`, each item counts as the probability that an answer of its confidence
    is right (a logistic fit of right/wrong on the confidence's log-odds) instead of
    its own 0/1: with a few dozen items and a target like 0.98, one mistake otherwise
    decides the threshold, and it lands far too high.
    """
    check_precision(precision)
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if conf.size == 0:
        raise FailedPrecondition("no labelled items to calibrate the abstention threshold on")
    order = np.argsort(-conf, kind="stable")
    conf, ok = conf[order], ok[order]
    right = _right_given_confidence(conf, ok) if smooth and 0 < ok.sum() < ok.size else ok
    cum_prec = np.cumsum(right) / np.arange(1, conf.size + 1)
    # Only cut between different confidences: everything tied with conf[i] is kept with it.
    last_of_tie = np.r_[conf[1:] != conf[:-1], True]
    meets = np.flatnonzero(last_of_tie & (cum_prec >= precision))
    if meets.size == 0:
        return float(np.nextafter(1.0, 2.0))
    return float(conf[meets[-1]])


def _right_given_confidence(conf: np.ndarray, ok: np.ndarray, steps: int = 50) -> np.ndarray:
    """P(right | confidence) at each item: logistic regression on the log-odds (Newton)."""
    c = np.clip(conf, 1e-4, 1 - 1e-4)
    x = np.stack([np.ones_like(c), np.log(c / (1 - c))], axis=1)
    w = np.zeros(2)
    ridge = 1e-3 * np.eye(2)
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x @ w)))
        grad = x.T @ (p - ok) + ridge @ w
        hess = (x * (p * (1 - p))[:, None]).T @ x + ridge
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return np.asarray(1 / (1 + np.exp(-(x @ w))), dtype=np.float64)


def confidence_and_correct(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top probability of each row and whether its arg-max is the true code `y`."""
    if len(y) == 0:
        return np.zeros(0, np.float32), np.zeros(0, bool)
    top = probs.max(axis=1)
    return top.astype(np.float32), (probs.argmax(axis=1) == y) & (top > 0)


def abstained(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Rows to answer "unknown": no labelled neighbour at all, or below `threshold`."""
    top = probs.max(axis=1) if probs.shape[0] and probs.shape[1] else np.zeros(probs.shape[0])
    return (top <= 0) | (top < (0.0 if threshold is None else threshold))


def decide(probs: np.ndarray, vocabulary: Sequence[str], threshold: float | None) -> list[str]:
    """Arg-max labels, "unknown" where the top probability is 0 or below `threshold`."""
    if probs.shape[0] == 0:
        return []
    out = abstained(probs, threshold)
    best = probs.argmax(axis=1)
    return [UNKNOWN if a else vocabulary[b] for a, b in zip(out.tolist(), best.tolist(), strict=True)]


def save_calibration(path: Path, scores: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write each mode's cross-validated (confidence, correct) arrays to one .npz."""
    arrays: dict[str, np.ndarray] = {}
    for mode, (conf, ok) in scores.items():
        arrays[f"{mode}_confidence"] = np.asarray(conf, np.float32)
        arrays[f"{mode}_correct"] = np.asarray(ok, bool)
    np.savez(path, **arrays)  # type: ignore[arg-type]


def load_calibration(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """What `save_calibration` wrote; {} for a generation trained before it existed."""
    if not path.exists():
        return {}
    with np.load(path, allow_pickle=False) as z:
        modes = {f[: -len("_confidence")] for f in z.files if f.endswith("_confidence")}
        return {m: (z[f"{m}_confidence"], z[f"{m}_correct"]) for m in modes}
