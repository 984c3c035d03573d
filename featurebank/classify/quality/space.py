"""Nearest neighbours among the bank's own items, in blocks of matrix products.

Why not one index search per item: a quality pass asks for every item's neighbours at
once, and a search per query row (what an index does) costs several times a block
product of the same vectors. The vectors are the index's own (the bank's transform,
its metric), so distances are those `Classify` and `Search` see.

Up to `EXACT_MAX` items every item is compared with every other (exact). Above, the
items are grouped into ~sqrt(n) lists by a few k-means steps on a sample, and each
list is compared with the items of the `PROBES` lists whose centroids are nearest its
own (IVF-style, grouped by list so each comparison is one product). Near copies and
near neighbours share a list or a neighbouring one; `quality_bench.py` reports the
neighbour recall against an exact search.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import faiss
import numpy as np

T = TypeVar("T")

EXACT_MAX = 4096  # items compared all against all
PROBES = 6  # lists each list is compared with (its own first)
LIST_SIZE = 256  # items per list at most on average (sqrt(n) below 65k items)
PER_LIST = 8  # k-means sample per list
KMEANS_STEPS = 2
LIST_DIMS = 64  # lists are drawn on the sample's leading principal components
HNSW_ASSIGN = 1024  # from this many lists on, items find their list through an HNSW


@dataclass
class Space:
    """The vectors neighbours are computed in, and (above EXACT_MAX) their lists."""

    x: np.ndarray  # (n, d) float32, as the index stores them
    kind: str  # faiss metric: "l2" (squared distances) or "ip"
    centroids: np.ndarray | None = None  # (L, m) in the projection; None: exact
    mean: np.ndarray | None = None  # (d,) what the projection centres on
    basis: np.ndarray | None = None  # (d, m) the projection lists are drawn in
    assign: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # row -> list
    probes: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))  # (L, P)
    built_for: int = 0  # rows the lists were drawn for
    buffer: np.ndarray | None = None  # what `x` is the head of, with room to append
    assigner: Any = field(default=None, repr=False, compare=False)  # centroid_index, lazily

    def __getstate__(self) -> dict[str, Any]:  # copies rebuild the (faiss) assigner
        return {**self.__dict__, "assigner": None}

    @property
    def exact(self) -> bool:
        return self.centroids is None

    def drop(self, keep: np.ndarray) -> None:
        """Keep only the rows where `keep` is true."""
        self.x = np.ascontiguousarray(self.x[keep])
        if not self.exact:
            self.assign = self.assign[keep]

    def append(self, x: np.ndarray) -> None:
        """New rows at the end (into spare capacity: an update of a few rows must not
        copy a million), each in its nearest list."""
        n, buf = len(self.x), self.buffer
        if buf is None or len(buf) < n + len(x) or not np.shares_memory(buf, self.x):
            buf = self.buffer = np.empty((max(2 * n, n + len(x)), x.shape[1]), np.float32)
            buf[:n] = self.x
        buf[n:n + len(x)] = x
        self.x = buf[:n + len(x)]
        if not self.exact:
            self.assign = np.concatenate([self.assign, assign_lists(self, x)])

    def sized_for(self, n: int) -> bool:
        """Whether the lists still suit n rows (within a factor of 2 of what they were
        drawn for)."""
        if self.centroids is None:
            return n <= EXACT_MAX
        return self.built_for / 2 <= n <= 2 * self.built_for

    @property
    def faiss_metric(self) -> int:
        return faiss.METRIC_L2 if self.kind == "l2" else faiss.METRIC_INNER_PRODUCT

    def members(self) -> list[np.ndarray]:
        """Rows of each list, in row order."""
        order = np.argsort(self.assign, kind="stable")
        bounds = np.searchsorted(self.assign[order], np.arange(len(self.probes) + 1))
        return [order[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]


def space_of(x: np.ndarray, kind: str, seed: int = 0) -> Space:
    """Exact for small banks; lists for larger ones."""
    x = np.ascontiguousarray(x, np.float32)
    n = len(x)
    if n <= EXACT_MAX:
        return Space(x, kind)
    n_lists = max(PROBES, round(math.sqrt(n)), n // LIST_SIZE)
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(n, min(n, PER_LIST * n_lists), replace=False))]
    # why a projection: assigning n items to L lists costs n * L * dims, as much as the
    # neighbour search itself; the leading components keep near items near
    mean = sample.mean(axis=0)
    basis = np.linalg.svd(sample - mean, full_matrices=False)[2][:LIST_DIMS].T.copy()
    sample = (sample - mean) @ basis
    centroids = sample[rng.choice(len(sample), n_lists, replace=False)].copy()
    for _ in range(KMEANS_STEPS):  # Lloyd steps on the sample; an empty list keeps its centre
        near = nearest_centroid(sample, centroids)
        order = np.argsort(near, kind="stable")
        full, starts, counts = np.unique(near[order], return_index=True, return_counts=True)
        centroids[full] = np.add.reduceat(sample[order], starts, axis=0) / counts[:, None]
    sq = (centroids * centroids).sum(axis=1)
    between = sq[None, :] - 2.0 * (centroids @ centroids.T)
    probes = np.argsort(between, axis=1, kind="stable")[:, :PROBES]
    probes[:, 0] = np.arange(n_lists)  # a list first compares with itself
    space = Space(x, kind, centroids, mean, basis, np.zeros(0, np.int64),
                  probes.astype(np.int64), n)
    space.assign = assign_lists(space, x)
    return space


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of each row's nearest centroid (Euclidean), by one product."""
    d = (centroids * centroids).sum(axis=1)[None, :] - 2.0 * (x @ centroids.T)
    return np.asarray(d.argmin(axis=1), np.int64)


def assign_lists(space: Space, x: np.ndarray) -> np.ndarray:
    """The nearest list of each vector (in the projection)."""
    assert space.centroids is not None and space.basis is not None
    if space.assigner is None:
        space.assigner = centroid_index(space.centroids)
    return nearest_centroid((x - space.mean) @ space.basis, space.centroids, space.assigner)


def centroid_index(centroids: np.ndarray) -> Any:
    """An HNSW over many centroids (None for few: products are cheaper then)."""
    if len(centroids) < HNSW_ASSIGN:
        return None
    hnsw = faiss.IndexHNSWFlat(centroids.shape[1], 32)
    hnsw.hnsw.efConstruction = 40
    hnsw.add(centroids)
    hnsw.hnsw.efSearch = 16
    return hnsw


def nearest_centroid(x: np.ndarray, centroids: np.ndarray, hnsw: Any = None) -> np.ndarray:
    """The (Euclidean) nearest centroid of each vector: by products, or through `hnsw`
    (`centroid_index`; approximate: a few land in the second nearest list, which its
    probes still compare; one index answers a vector the same way every time)."""
    out = np.zeros(len(x), np.int64)
    if hnsw is None:
        hnsw = centroid_index(centroids)

    def one(at: np.ndarray) -> None:
        faiss.omp_set_num_threads(1)
        out[at] = _nearest(x[at], centroids) if hnsw is None else hnsw.search(x[at], 1)[1][:, 0]

    _parallel(one, _chunks(len(x), 8192))
    return out


def _parallel(fn: Callable[[T], None], chunks: Sequence[T]) -> None:
    """fn over the chunks on one thread per core, never the calling thread (whose faiss
    thread count the searcher manages).

    Why threads of one faiss (or BLAS) thread each: the blocks are small, and faiss's
    own threads cost more to start and synchronise than a block on a busy machine
    (measured 25 ms against 0.8 ms for 100 x 600 rows); faiss's thread count is per
    calling thread."""
    if not chunks:
        return
    with ThreadPoolExecutor(min(len(chunks), os.cpu_count() or 1)) as pool:
        list(pool.map(fn, chunks))


def knn(
    space: Space, rows: np.ndarray, allowed: np.ndarray | None, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(positions (len(rows), k), faiss distances) of the k nearest allowed items of
    `rows`, each row itself left out; -1 / NaN where there are fewer."""
    rows = np.asarray(rows, np.int64)
    if space.exact:
        cols = np.arange(len(space.x)) if allowed is None else np.flatnonzero(allowed)
        return _run(space, rows, [(at, cols) for at in _chunks(len(rows))], k)
    members = space.members()
    tasks = []
    for lst, at in _by_list(space, rows):
        cols = np.concatenate([members[p] for p in space.probes[lst]])
        tasks.append((at, cols if allowed is None else cols[allowed[cols]]))
    return _run(space, rows, tasks, k)


def closer(
    space: Space, rows: np.ndarray, cols: np.ndarray, bound: np.ndarray, k: int,
    uncommon: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, col, faiss distance) pairs of `rows` and their nearest among the candidate
    `cols` each may see (in list mode: those in its probed lists), the row itself left
    out, where the col is nearer than the row's `bound` (a `nearness`): what an update
    merges into rows' existing lists. Each row gets its k nearest candidates, and as many
    more as it sees cols marked in `uncommon` (rows, bool: cols some list may not take),
    so every list finds its own k among them.

    Why pairs under a bound: few rows gain a new neighbour, and one search of the new
    rows serves every list of neighbours. Why faiss's knn and not a distance matrix: its
    distances are those the lists hold to the last bit, so ties break as in a full pass."""
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    if space.exact:
        tasks = [(at, cols) for at in _chunks(len(rows))]
    else:
        held = _members_of(space, cols)
        tasks = []
        for lst, at in _by_list(space, rows):
            c = np.concatenate([held[p] for p in space.probes[lst].tolist() if p in held] or [cols[:0]])
            if len(c):
                tasks.append((at, c))
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def one(task: tuple[np.ndarray, np.ndarray]) -> None:
        faiss.omp_set_num_threads(1)
        at, c = task
        r = rows[at]
        kk = min(len(c), k + 1 + int(uncommon[c].sum()))
        d, j = faiss.knn(space.x[r], space.x[c], kk, metric=space.faiss_metric)
        got = np.where(j >= 0, c[np.maximum(j, 0)], -1)
        i, j = np.nonzero((nearness(got, d, space.kind) < bound[at][:, None])
                          & (got != r[:, None]))
        found.append((r[i], got[i, j], d[i, j]))

    _parallel(one, tasks)
    if not found:
        return rows[:0], cols[:0], np.zeros(0, np.float32)
    r, c, d = (np.concatenate(part) for part in zip(*found, strict=True))
    return r, c, d


def nearness(pos: np.ndarray, fd: np.ndarray, kind: str) -> np.ndarray:
    """A key that sorts neighbours nearest first (inf for none)."""
    return np.where(pos >= 0, fd if kind == "l2" else -fd, np.inf)


def _members_of(space: Space, rows: np.ndarray) -> dict[int, np.ndarray]:
    """The given rows grouped by their list: list -> rows."""
    return {lst: rows[at] for lst, at in _by_list(space, rows)}


def _chunks(n: int, size: int = 1024) -> list[np.ndarray]:
    return [np.arange(s, min(n, s + size)) for s in range(0, n, size)]


def _by_list(space: Space, rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(list, positions into `rows` of the rows in it) for every list holding some."""
    of_row = space.assign[rows]
    order = np.argsort(of_row, kind="stable")
    bounds = np.searchsorted(of_row[order], np.arange(len(space.probes) + 1))
    return [(lst, order[bounds[lst]:bounds[lst + 1]])
            for lst in np.flatnonzero(np.diff(bounds)).tolist()]


def _run(
    space: Space, rows: np.ndarray, tasks: list[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every (positions into rows, candidate rows) block, in parallel."""
    pos = np.full((len(rows), k), -1, np.int64)
    fd = np.full((len(rows), k), np.nan, np.float32)

    def one(task: tuple[np.ndarray, np.ndarray]) -> None:
        faiss.omp_set_num_threads(1)
        at, cols = task
        pos[at], fd[at] = _block(space, rows[at], cols, k)

    _parallel(one, tasks)
    return pos, fd


def _block(
    space: Space, rows: np.ndarray, cols: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest of `rows` among `cols` (row itself left out), one faiss product."""
    m = len(rows)
    pos = np.full((m, k), -1, np.int64)
    fd = np.full((m, k), np.nan, np.float32)
    if not len(cols):
        return pos, fd
    kk = min(k + 1, len(cols))
    d, i = faiss.knn(space.x[rows], space.x[cols], kk, metric=space.faiss_metric)
    got = np.where(i >= 0, cols[np.maximum(i, 0)], -1)
    self_hit = got == rows[:, None]
    # leave the row out where found, else the last (k + 1-th) candidate
    drop = self_hit | (~self_hit.any(axis=1, keepdims=True) & (np.arange(kk) == kk - 1))
    if kk <= k:  # fewer candidates than k + 1: drop only the row itself
        drop = self_hit
    ranks = np.cumsum(~drop, axis=1) - 1
    r, c = np.nonzero(~drop & (ranks < k))
    pos[r, ranks[r, c]] = got[r, c]
    fd[r, ranks[r, c]] = d[r, c]
    return pos, fd
