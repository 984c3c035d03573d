"""Re-ranking an index's candidates on the exact vectors the store keeps (factory suffix RStore).

Why: a bank too large for its raw vectors in memory gets compressed codes (PQ), whose
distances are estimates; faiss's own re-ranking (``RFlat``) keeps a second, full-precision
copy of every vector in memory, which is what did not fit. The store already holds every
vector (on disk, memory-mapped, float16 by default), so ``...,PQ48x4fs,RStore`` asks the
index for ``k_factor_store`` times k candidates and orders them by their exact distances
to the stored vectors: the index holds only codes and ids, and the re-ranking reads the
pages of the candidates it needs. The factor is a knob the tuner sets, with the re-ranking
in the loop, like efSearch or nprobe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from featurebank.core.errors import InvalidInput
from featurebank.index.families import STORE_FACTOR

SUFFIX = "RStore"
CHUNK = 256  # queries re-ranked together (bounds the gathered (chunk, candidates, dim) copy)

VectorsOf = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""Sorted unique ids -> (found mask, transformed float32 vectors of the found ones)."""


def split(factory: str) -> tuple[str, bool]:
    """(the faiss factory string, whether candidates are re-ranked from the store)."""
    parts = factory.split(",")
    if parts[-1] != SUFFIX:
        if SUFFIX in parts:
            raise InvalidInput(f"factory {factory!r}: {SUFFIX} must come last")
        return factory, False
    base = ",".join(parts[:-1])
    if not base or any(p.startswith(("RFlat", "Refine")) for p in parts[:-1]):
        raise InvalidInput(
            f"factory {factory!r}: {SUFFIX} re-ranks an index's candidates from the store, "
            "so it follows an index and no other re-ranking (e.g. IVF4096,PQ48x4fs,RStore)"
        )
    return base, True


def factor(manifest: dict[str, Any]) -> int:
    """The tuned re-ranking factor of a generation (0: its candidates are final)."""
    if not split(str(manifest.get("factory", "")))[1]:
        return 0
    return max(1, int(manifest.get("params", {}).get(STORE_FACTOR, 1)))


def rerank(
    queries: np.ndarray, candidates: np.ndarray, k: int, vectors_of: VectorsOf, metric_type: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row's candidate ids by exact distance, as faiss returns them
    (ascending squared L2, or descending inner product; -1 padding). Candidates the store
    no longer has (deleted since the index was built) are dropped."""
    n = queries.shape[0]
    ip = metric_type == faiss.METRIC_INNER_PRODUCT
    dist = np.full((n, k), -np.inf if ip else np.inf, np.float32)
    ids = np.full((n, k), -1, np.int64)
    valid = candidates >= 0
    if not valid.any():
        return dist, ids
    unique = np.sort(candidates[valid])  # np.unique hashes, 60x slower at 80k ids
    unique = unique[np.r_[True, unique[1:] != unique[:-1]]]
    found, vectors = vectors_of(unique)
    rows = np.full(unique.size, -1, np.int64)
    rows[found] = np.arange(int(found.sum()))
    norms = np.einsum("ij,ij->i", vectors, vectors)
    where = rows[np.searchsorted(unique, np.where(valid, candidates, unique[0]))]
    usable = valid & (where >= 0)
    kk = min(k, candidates.shape[1])
    for s in range(0, n, CHUNK):
        w, q = where[s : s + CHUNK], queries[s : s + CHUNK]
        dots = np.einsum("nkd,nd->nk", vectors[np.maximum(w, 0)], q)
        d = dots if ip else norms[np.maximum(w, 0)] - 2 * dots + np.einsum("nd,nd->n", q, q)[:, None]
        d = np.where(usable[s : s + CHUNK], d, -np.inf if ip else np.inf)
        order = np.argsort(-d if ip else d, axis=1, kind="stable")[:, :kk]
        best = np.take_along_axis(d, order, 1)
        dist[s : s + CHUNK, :kk] = best
        ids[s : s + CHUNK, :kk] = np.where(np.isfinite(best),
                                           np.take_along_axis(candidates[s : s + CHUNK], order, 1), -1)
    return dist, ids


def array_vectors(ids: np.ndarray, vectors: np.ndarray) -> VectorsOf:
    """`VectorsOf` over vectors in memory (a build's or a fold's, in the index's space)."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = np.asarray(ids, np.int64)[order]

    def read(wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.minimum(np.searchsorted(sorted_ids, wanted), max(sorted_ids.size - 1, 0))
        found = sorted_ids[pos] == wanted if sorted_ids.size else np.zeros(wanted.size, bool)
        return found, np.asarray(vectors[order[pos[found]]], np.float32)

    return read


def for_tuning(factory: str, ids: np.ndarray, vectors: np.ndarray) -> VectorsOf | None:
    """What a build tunes `factory`'s re-ranking on: the vectors it indexes, in memory (the
    store's, transformed); None when the factory does not re-rank from the store."""
    return array_vectors(ids, vectors) if split(factory)[1] else None


class Reranked:
    """`index` searched for `factor` x k candidates that are then re-ranked exactly: what the
    tuner times, with the factor it is trying."""

    def __init__(self, index: faiss.Index, vectors_of: VectorsOf, factor: int = 1) -> None:
        self.index = index
        self.vectors_of = vectors_of
        self.factor = factor

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        wanted = min(k * self.factor, max(int(self.index.ntotal), k))
        _, candidates = self.index.search(x, wanted)
        return rerank(x, candidates, k, self.vectors_of, int(self.index.metric_type))
