"""The neighbour graph every quality finding reads: one search of the bank's own index.

Why the live index and not a fresh exact search: the pass must answer on a bank of a
million items in seconds, and the index already holds the transform and metric the
bank classifies with; distances here are what `Classify` and `Search` see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from featurebank.core.vocabulary import metric as metric_named

if TYPE_CHECKING:
    from featurebank.index.searcher import Searcher

BATCH = 8192


@dataclass
class Graph:
    """Each query row's k nearest items (itself left out): positions into the queried
    items (-1 where the neighbour is not one of them) and distances, (n, k)."""

    ids: np.ndarray  # store ids of the neighbours, -1 = none
    pos: np.ndarray  # row of each neighbour among the queried items, -1 = not queried
    dist: np.ndarray  # float64, inf where there is no neighbour


def neighbours(
    searcher: Searcher,
    vectors: np.ndarray,
    ids: np.ndarray,
    k: int,
    voters_only: bool = False,
) -> Graph:
    """The k nearest live items of every row (`voters_only`: labelled, not held out)."""
    n = len(ids)
    k = max(1, min(k, int(searcher.ntotal) - 1))
    to_dist = metric_named(searcher.metric).distances
    out_ids = np.full((n, k), -1, np.int64)
    out_dist = np.full((n, k), np.inf)
    for s in range(0, n, BATCH):
        e = min(n, s + BATCH)
        res = searcher.search(
            vectors[s:e], k, exclude_ids=ids[s:e].astype(np.int64), voters_only=voters_only
        )
        got = res.ids.shape[1]
        out_ids[s:e, :got] = res.ids
        d = to_dist(np.asarray(res.scores, np.float64))
        out_dist[s:e, :got] = np.where(res.ids >= 0, d, np.inf)
    return Graph(out_ids, positions(ids, out_ids), out_dist)


def positions(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row of each id of `wanted` within `ids` (-1 for ids not there)."""
    if not len(ids):
        return np.full(wanted.shape, -1, np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order].astype(np.int64)
    flat = wanted.reshape(-1)
    at = np.minimum(np.searchsorted(sorted_ids, flat), len(ids) - 1)
    found = (sorted_ids[at] == flat) & (flat >= 0)
    return np.where(found, order[at], -1).reshape(wanted.shape)


def robust_log_scale(values: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 * MAD) of log(values): a scale-free centre and spread that a few
    extreme items (the ones a quality pass looks for) cannot move."""
    v = np.log(np.maximum(values[np.isfinite(values)], 1e-12))
    if v.size == 0:
        return 0.0, 0.0
    med = float(np.median(v))
    return med, float(1.4826 * np.median(np.abs(v - med)))
