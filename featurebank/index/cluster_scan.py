"""Exact search of a flat L2 index that skips the clusters no neighbour can be in.

Why: a flat search reads every vector for every query. A bank whose vectors fall into
clusters needs only the few clusters near a query: by the triangle inequality no vector
of cluster c is closer to query q than ||q - c|| - r_c (r_c: the farthest member from the
centroid), so once q holds k candidates at distance at most t, every cluster whose bound
exceeds t is skipped unread. That keeps the answers exact (same neighbours, same
distances: every distance computed comes from the kernel FAISS's flat scan uses for calls
of fewer than 128,000 / d queries) while reading a fraction of the index, which matters
most when many banks' indexes together exceed the cache and each query would otherwise
stream its bank's whole index from memory.

Whether a bank's data clusters is measured, not assumed: `for_generation` scans the bank's
own vectors as queries and keeps the plan only when they read at most `MAX_SCANNED` of it;
otherwise the bank keeps the plain flat scan (which the plan would only slow down). A
generation is planned once it has answered `PLAN_AFTER` queries, so a one-off search never
pays for clustering.
"""

from __future__ import annotations

import math
import threading

import faiss
import numpy as np

from featurebank.index.families import FAISS

MIN_VECTORS = 2_000  # below this a flat scan is already cheap
PLAN_AFTER = 200  # queries a generation answers by full scans first (about what planning costs)
MAX_SCANNED = 0.5  # the share of the index a probe query may read for the plan to be kept
PROBES = 64  # the bank's own vectors scanned to decide
SLACK = 1e-4  # relative margin on the bound, far above float32 rounding of the distances
COPY_MAX_BYTES = 256 << 20  # indexes up to this size get a copy of their rows, cluster by cluster


class ClusterScan:
    """Clusters of one flat L2 index's rows, each with its centroid and radius."""

    def __init__(
        self, vectors: np.ndarray, ids: np.ndarray, nlist: int, owner: object = None,
        seed: int = 1234,
    ) -> None:
        n, d = vectors.shape
        kmeans = FAISS.Kmeans(d, nlist, niter=10, seed=seed, max_points_per_centroid=256)
        kmeans.train(vectors)
        _, assigned = kmeans.index.search(vectors, 1)
        assigned = assigned[:, 0]
        self.centroids = kmeans.centroids.astype(np.float64)
        self.centroid_norms = np.einsum("ij,ij->i", self.centroids, self.centroids)
        members = np.argsort(assigned, kind="stable")  # rows, cluster by cluster, ascending
        self.offsets = np.concatenate([[0], np.cumsum(np.bincount(assigned, minlength=nlist))])
        # A copy holds each cluster in one block, so a query streams its few clusters from
        # memory instead of gathering their rows from all over the index (a third faster
        # when many banks' indexes share the cache); the largest are read in place.
        self._owner = None  # what owns the rows' memory when they are read in place
        if vectors.nbytes <= COPY_MAX_BYTES:
            self.vectors, self.ids, members = vectors[members], ids[members], np.arange(n)
        else:
            self.vectors, self.ids, self._owner = vectors, ids, owner  # the index's own rows
        self.rows = [members[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True)]
        gap = vectors.astype(np.float64) - self.centroids[assigned]
        radius = np.sqrt(np.einsum("ij,ij->i", gap, gap))
        self.radii = np.full(nlist, -np.inf)
        np.maximum.at(self.radii, assigned, radius)
        self.sizes = np.diff(self.offsets)
        self.rows_read = 0  # rows scanned since made (what `for_generation` judges by)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances, ids) of the k nearest rows of each query, as a flat scan
        gives them (k must not exceed the rows held)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        x64 = x.astype(np.float64)  # the bound in float64: it must not round up
        squared = np.einsum("ij,ij->i", x64, x64)[:, None] - 2 * x64 @ self.centroids.T
        gap = np.sqrt(np.maximum(squared + self.centroid_norms[None, :], 0.0))  # (nq, nlist)
        order = np.argsort(gap, axis=1, kind="stable")
        first = (np.cumsum(self.sizes[order], axis=1) < k).sum(axis=1) + 1  # clusters to hold k
        scanned = np.zeros(gap.shape, dtype=bool)
        for i, m in enumerate(first):
            scanned[i, order[i, :m]] = True
        dist, rows = self._scan(x, scanned, k)
        bound = np.sqrt(np.maximum(dist[:, -1], 0.0)) * (1 + SLACK) + SLACK
        more = ~scanned & (gap - self.radii[None, :] <= bound[:, None])
        again = np.flatnonzero(more.any(axis=1))
        if again.size:  # the clusters the bound could not rule out, merged in
            extra, extra_rows = self._scan(x[again], more[again], k)
            both, both_rows = np.hstack([dist[again], extra]), np.hstack([rows[again], extra_rows])
            best = np.lexsort((both_rows, both))[:, :k]  # nearest first, equal ones by row
            dist[again] = np.take_along_axis(both, best, 1)
            rows[again] = np.take_along_axis(both_rows, best, 1)
        return dist, self.ids[rows]

    def _scan(self, x: np.ndarray, clusters: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each query's k nearest among the rows of its marked clusters (-1 rows when they
        hold fewer than k)."""
        lists = [self._rows_of(np.flatnonzero(marked)) for marked in clusters]
        width = max(len(rows) for rows in lists)
        self.rows_read += sum(len(rows) for rows in lists)
        subset = np.full((len(lists), width), -1, dtype=np.int64)
        for i, rows in enumerate(lists):
            subset[i, :len(rows)] = rows
        dist = np.empty((len(lists), k), dtype=np.float32)
        found = np.empty((len(lists), k), dtype=np.int64)
        n, d = self.vectors.shape
        FAISS.knn_L2sqr_by_idx(
            faiss.swig_ptr(x), faiss.swig_ptr(self.vectors), faiss.swig_ptr(subset), d,
            len(lists), n, width, k, faiss.swig_ptr(dist), faiss.swig_ptr(found), width,
        )
        return dist, found

    def _rows_of(self, clusters: np.ndarray) -> np.ndarray:
        if len(clusters) == 1:
            return self.rows[int(clusters[0])]
        return np.sort(np.concatenate([self.rows[int(c)] for c in clusters]))


def for_generation(index: faiss.Index, k: int) -> ClusterScan | None:
    """A ClusterScan of a generation's index (an IndexIDMap2 over a flat L2 index) when its
    rows cluster enough for it to pay; None for any other index (inner product included:
    the bound needs a distance), small ones, and data that does not cluster."""
    flat = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else None
    if not isinstance(flat, faiss.IndexFlat) or flat.metric_type != faiss.METRIC_L2:
        return None
    n, d = int(flat.ntotal), int(flat.d)
    if n < MIN_VECTORS:
        return None
    rows = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)
    ids = faiss.vector_to_array(FAISS.downcast_index(index).id_map).astype(np.int64)
    scan = ClusterScan(rows, ids, nlist=max(4, min(64, round(math.sqrt(n) / 6))), owner=index)
    probes = rows[np.random.default_rng(0).choice(n, size=min(PROBES, n), replace=False)]
    scan.search(probes, min(k, n))
    share = scan.rows_read / (len(probes) * n)
    scan.rows_read = 0
    return scan if share <= MAX_SCANNED else None


class Planner:
    """Each index generation's cluster scan, planned once the generation has been asked
    `PLAN_AFTER` queries (None until then, and for good when it would not pay).

    Planning runs on a thread of its own while every query keeps scanning in full: run on
    the query that made it due, its k-means held that query and the ones queued behind it
    (benchmarks/replica_bench.py: commit-to-visible p99 98-298 ms in six runs, with about
    40 commits in a row held at that moment; 54-92 ms since)."""

    def __init__(self) -> None:
        self._planning = threading.Lock()  # held from when a plan is due until it is made
        self._plans: dict[int, ClusterScan | None] = {}  # generation -> plan (newest only)
        self._asked: dict[int, int] = {}

    def scan_for(
        self, generation: int, index: faiss.Index, k: int, queries: int
    ) -> ClusterScan | None:
        """The plan of `generation`; None until it is made (starting it once it is due)."""
        plans = self._plans  # replaced whole, never changed: read once
        if generation in plans:
            return plans[generation]
        asked = self._asked[generation] = self._asked.get(generation, 0) + queries
        if asked >= PLAN_AFTER and self._planning.acquire(blocking=False):
            threading.Thread(target=self._plan, args=(generation, index, k),
                             name="fb-cluster-plan", daemon=True).start()
        return None

    def wait(self) -> None:
        """Until no plan is being made (benchmarks and tests that measure a planned bank)."""
        with self._planning:
            pass

    def _plan(self, generation: int, index: faiss.Index, k: int) -> None:
        try:
            if generation not in self._plans:
                self._plans = {generation: for_generation(index, k)}
                self._asked = {}
        finally:
            self._planning.release()
