"""The neighbour graphs the quality findings read, as arrays over the bank's rows.

A `Graph` is each row's k nearest rows (itself left out) with the index's scores and
distances, and the label codes that vote; `graph_of` makes one from the positions and
faiss distances `space.knn` found. Evidence (keys, labels, scores) is looked up only
for the findings that are listed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from featurebank.core.vocabulary import metric as metric_named

if TYPE_CHECKING:
    from featurebank.classify.classifier import Neighbor


@dataclass
class Graph:
    """Each row's k nearest rows, (n, k) arrays."""

    pos: np.ndarray  # row of each neighbour, -1 = none
    dist: np.ndarray  # float64 in the metric's distance, inf where there is no neighbour
    scores: np.ndarray  # the index's scores (higher = closer), what votes weigh
    codes: np.ndarray  # voting label codes into `vocabulary` (-1 = none)
    vocabulary: list[str]
    keys: Sequence[str]
    labels: Sequence[str | None]
    own: np.ndarray  # (n,) each row's own voting code (-1: it does not vote)

    def first(self, k: int) -> Graph:
        """The same graph with only each row's k nearest (views, no copies)."""
        return Graph(
            self.pos[:, :k], self.dist[:, :k], self.scores[:, :k], self.codes[:, :k],
            self.vocabulary, self.keys, self.labels, self.own,
        )

    def evidence(self, row: int, n: int) -> list[Neighbor]:
        """The first n neighbours of a row with their keys, labels and scores."""
        from featurebank.classify.classifier import Neighbor

        return [
            Neighbor(self.keys[p], self.labels[p], float(s))
            for p, s in zip(self.pos[row, :n].tolist(), self.scores[row, :n].tolist(),
                            strict=True)
            if p >= 0
        ]


def graph_of(
    pos: np.ndarray,
    faiss_dist: np.ndarray,
    metric: str,
    row_codes: np.ndarray,
    vocabulary: list[str],
    keys: Sequence[str],
    labels: Sequence[str | None],
) -> Graph:
    """A Graph from `space.knn`'s positions and faiss distances under the index's metric."""
    m = metric_named(metric)
    ok = pos >= 0
    with np.errstate(invalid="ignore"):
        scores = np.where(ok, m.scores(faiss_dist.astype(np.float64)), -np.inf).astype(np.float32)
        dist = np.where(ok, m.distances(scores.astype(np.float64)), np.inf)
    codes = np.where(ok, row_codes[np.maximum(pos, 0)], -1) if len(row_codes) else pos.copy()
    return Graph(pos, dist, scores, codes, vocabulary, keys, labels, row_codes)


def robust_log_scale(values: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 * MAD) of log(values): a scale-free centre and spread that a few
    extreme items (the ones a quality pass looks for) cannot move."""
    v = np.log(np.maximum(values[np.isfinite(values)], 1e-12))
    if v.size == 0:
        return 0.0, 0.0
    med = float(np.median(v))
    return med, float(1.4826 * np.median(np.abs(v - med)))
