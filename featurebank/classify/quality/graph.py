"""The neighbour graphs the quality findings read: searches of the bank's own index.

Why the live index and not a fresh exact search: the pass must answer on a bank of a
million items in seconds, and the index already holds the transform and metric the
bank classifies with; distances here are what `Classify` and `Search` see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from featurebank.core.vocabulary import metric as metric_named

if TYPE_CHECKING:
    from featurebank.classify.classifier import Neighbor
    from featurebank.index.searcher import Searcher, SearchResult

BATCH = 8192


@dataclass
class Graph:
    """Each query row's k nearest items (itself left out): positions into the queried
    items (-1 where the neighbour is not one of them) and distances, (n, k)."""

    ids: np.ndarray  # store ids of the neighbours, -1 = none
    pos: np.ndarray  # row of each neighbour among the queried items, -1 = not queried
    dist: np.ndarray  # float64, inf where there is no neighbour
    scores: np.ndarray  # the index's scores (higher = closer), what votes weigh
    codes: np.ndarray  # voting label codes into `vocabulary` (-1 = none)
    vocabulary: list[str]
    results: list[SearchResult] = field(default_factory=list)  # per batch, for keys

    def first(self, k: int) -> Graph:
        """The same graph with only each row's k nearest (a view, no copy of the results)."""
        return Graph(
            self.ids[:, :k], self.pos[:, :k], self.dist[:, :k], self.scores[:, :k],
            self.codes[:, :k], self.vocabulary, self.results,
        )

    def evidence(self, row: int, n: int) -> list[Neighbor]:
        """The first n neighbours of a row with their keys, labels and scores."""
        from featurebank.classify.classifier import Neighbor

        res, r = self.results[row // BATCH], row % BATCH
        return [
            Neighbor(str(k), lab, float(sc))
            for k, lab, sc, i in zip(res.keys[r], res.labels[r], res.scores[r], res.ids[r],
                                     strict=True)
            if i >= 0
        ][:n]


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
    out_scores = np.full((n, k), -np.inf, np.float32)
    out_codes = np.full((n, k), -1, np.int64)
    results = []
    for s in range(0, n, BATCH):
        e = min(n, s + BATCH)
        res = searcher.search(
            vectors[s:e], k, exclude_ids=ids[s:e].astype(np.int64), voters_only=voters_only
        )
        got = res.ids.shape[1]
        out_ids[s:e, :got] = res.ids
        out_scores[s:e, :got] = res.scores
        out_codes[s:e, :got] = res.label_codes
        results.append(res)
    with np.errstate(invalid="ignore"):
        dist = np.where(out_ids >= 0, to_dist(out_scores.astype(np.float64)), np.inf)
    vocabulary = list(results[0].vocabulary) if results else []
    return Graph(
        out_ids, positions(ids, out_ids), dist, out_scores, out_codes, vocabulary, results
    )


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
