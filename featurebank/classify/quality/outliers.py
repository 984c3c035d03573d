"""Outliers: items far from every reference neighbour, relative to how far those
neighbours are from theirs.

The reference is the labelled items that vote (the bank's notion of its domain); a
bank without labels uses every item. Why relative (a local-outlier-factor style
ratio): a sparse class is not an outlier just because its items are far apart, and
a tight cluster of off-domain images (a dozen face crops among digits) is still far
from the labelled digits even though its members are each other's neighbours.
An item is listed when its log ratio lies `OUTLIER_Z` robust standard deviations
above the bank's median.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from featurebank.classify.quality.graph import Graph, robust_log_scale

OUTLIER_Z = 3.0


@dataclass(frozen=True)
class Outlier:
    key: str
    score: float  # mean distance to its reference neighbours / theirs to their own
    distance: float  # mean distance to its reference neighbours
    neighbors: list[tuple[str, float]]  # the nearest reference items (key, distance)


@dataclass
class Outliers:
    listed: list[Outlier]  # most extreme first, at most the limit
    count: int  # above the cut, kept ones left out
    kept: int  # above the cut but kept by a person


def scores(ref: Graph) -> tuple[np.ndarray, np.ndarray]:
    """(ratio, mean distance) of every row of the reference graph."""
    d = np.where(np.isfinite(ref.dist), ref.dist, np.nan)
    with np.errstate(all="ignore"):
        mean = np.nanmean(d, axis=1)
    mean = np.where(np.isfinite(mean), mean, np.inf)
    own = np.where(ref.pos >= 0, mean[np.maximum(ref.pos, 0)], np.nan)
    own = np.where(np.isfinite(own), own, np.nan)
    with np.errstate(all="ignore"):  # nanmedian is slow: only where a row lacks neighbours
        local = np.median(own, axis=1)
        short = np.isnan(local)
        local[short] = np.nanmedian(own[short], axis=1) if short.any() else local[short]
    local = np.where(np.isfinite(local) & (local > 0), local, np.nan)
    fallback = float(np.nanmedian(mean[np.isfinite(mean)])) if np.isfinite(mean).any() else 1.0
    local = np.where(np.isnan(local), max(fallback, 1e-12), local)
    return mean / local, mean


def find(
    ref: Graph,
    keys: Sequence[str],
    kept: set[str] | frozenset[str] = frozenset(),
    limit: int | None = None,
    n_evidence: int = 5,
    z: float = OUTLIER_Z,
) -> tuple[Outliers, np.ndarray, float]:
    """(outliers most extreme first (`kept` keys left out, at most `limit` listed),
    every row's score, the score above which a row is listed)."""
    ratio, mean = scores(ref)
    med, spread = robust_log_scale(ratio)
    cut = float(np.exp(med + z * spread)) if spread > 0 else float("inf")
    rows = np.flatnonzero(ratio > cut)
    rows = rows[np.argsort(-ratio[rows], kind="stable")]
    n_kept = 0
    if kept:
        mine = np.array([keys[r] in kept for r in rows.tolist()], bool)
        n_kept, rows = int(mine.sum()), rows[~mine]
    listed = [
        Outlier(keys[r], float(ratio[r]), float(mean[r]), [
            (keys[p], dist) for p, dist in zip(ref.pos[r, :n_evidence].tolist(),
                                               ref.dist[r, :n_evidence].tolist(), strict=True)
            if p >= 0
        ])
        for r in rows[:limit].tolist()
    ]
    return Outliers(listed, len(rows), n_kept), ratio, cut
