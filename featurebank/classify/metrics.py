"""Classification quality metrics on probability matrices (numpy only).

Every function takes integer true labels `y` (n,) and probabilities `probs`
(n, C) so each mode (knn, head, hybrid, stacked, sklearn) is scored the same way.
"""

from __future__ import annotations

import numpy as np

LOG_EPS = 1e-7


def _check(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(y) != len(probs):
        raise ValueError(f"labels ({len(y)}) and probabilities {probs.shape} do not match")
    return y, probs


def accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    y, probs = _check(y, probs)
    return float((probs.argmax(axis=1) == y).mean()) if len(y) else float("nan")


def top_k_accuracy(y: np.ndarray, probs: np.ndarray, k: int = 5) -> float:
    """Share of items whose true label is among the k most probable (ties broken by index)."""
    y, probs = _check(y, probs)
    if not len(y):
        return float("nan")
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == y[:, None]).any(axis=1).mean())


def confusion(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts (true, predicted)."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return m


def macro_f1(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean F1 over the classes present in y or predicted (sklearn's 'macro')."""
    y, probs = _check(y, probs)
    if not len(y):
        return float("nan")
    c = confusion(y, probs.argmax(axis=1), probs.shape[1])
    tp = np.diag(c).astype(np.float64)
    denom = c.sum(axis=1) + c.sum(axis=0)  # support + predicted
    present = denom > 0
    return float((2 * tp[present] / denom[present]).mean())


def log_loss(y: np.ndarray, probs: np.ndarray, eps: float = LOG_EPS) -> float:
    """Mean negative log-probability of the true label, clipped at eps (rows renormalised)."""
    y, probs = _check(y, probs)
    if not len(y):
        return float("nan")
    p = np.clip(probs, eps, 1.0)
    p = p / p.sum(axis=1, keepdims=True)
    return float(-np.log(p[np.arange(len(y)), y]).mean())


def reliability(y: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> dict[str, list[float]]:
    """Per confidence bin: mean confidence, accuracy and count (for ECE and the diagram)."""
    y, probs = _check(y, probs)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    out: dict[str, list[float]] = {
        "lower": [],
        "upper": [],
        "confidence": [],
        "accuracy": [],
        "count": [],
    }
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        out["lower"].append(float(edges[b]))
        out["upper"].append(float(edges[b + 1]))
        out["count"].append(float(n))
        out["confidence"].append(float(conf[sel].mean()) if n else float("nan"))
        out["accuracy"].append(float(correct[sel].mean()) if n else float("nan"))
    return out


def ece(y: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error: count-weighted |accuracy - confidence| over equal-width bins."""
    y, probs = _check(y, probs)
    if not len(y):
        return float("nan")
    r = reliability(y, probs, n_bins)
    total = 0.0
    for n, a, c in zip(r["count"], r["accuracy"], r["confidence"], strict=True):
        if n:
            total += n * abs(a - c)
    return float(total / len(y))


def summary(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """All the numbers the eval table and metrics.json show for one mode."""
    return {
        "accuracy": accuracy(y, probs),
        "top5": top_k_accuracy(y, probs, 5),
        "macro_f1": macro_f1(y, probs),
        "log_loss": log_loss(y, probs),
        "ece": ece(y, probs),
        "n": float(len(y)),
    }
