"""Approximate search over one filter's matching items: an IVF over just those items.

A graph walk cannot serve a filter that excludes the query's own region (the walk stays
where nothing passes), and an exact scan of a large matching set costs a full pass per
query. An IVF trained on the matching items alone has every list inside the filter, so
probing the lists nearest the query reaches the nearest matching items wherever they lie.

A query among the matching items needs few lists; one from a region the filter excludes
needs many (its nearest matching items lie at the edges of several lists). So two nprobes
are measured when the index is built, each the smallest reaching the index's recall target
(plus a margin for the sample's noise) against an exact scan: one on matching items as
queries, one on items failing the filter; a query whose nearest list centre is no farther
than matching items' usually are gets the first.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from featurebank.index.families import FAISS

TRAIN_PER_LIST = 16  # k-means sample per list (lists only need to cover the subset, not be optimal)
TUNE_QUERIES = 512
TUNE_MARGIN = 0.005  # tuned this far above the target: a sample's recall varies by about that
INSIDE_QUANTILE = 0.95  # of matching items' distance to their nearest list centre
NPROBE_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160,
                192, 256, 384, 512)


def lists_for(count: int) -> int:
    """About 4 sqrt(count) lists: small lists keep each probe cheap."""
    return int(np.clip(4 * np.sqrt(count), 8, 8192))


class SubsetIndex:
    """IVF-Flat over `vectors` (rows of `ids`), tuned to reach `target` recall@k."""

    def __init__(
        self,
        ids: np.ndarray,
        vectors: np.ndarray,
        metric_type: int,
        outside: np.ndarray,
        target: float,
        k: int,
        seed: int = 0,
    ) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        dim = vectors.shape[1]
        nlist = lists_for(len(vectors))
        self._quantizer = faiss.IndexFlat(dim, metric_type)
        self.index: Any = faiss.IndexIVFFlat(self._quantizer, dim, nlist, metric_type)
        self.index.cp.niter = 8
        self.index.cp.min_points_per_centroid = 1  # a sample of TRAIN_PER_LIST is enough here
        self._higher_is_closer = metric_type == faiss.METRIC_INNER_PRODUCT
        rng = np.random.default_rng(seed)
        train = min(len(vectors), nlist * TRAIN_PER_LIST)
        self.index.train(vectors[np.sort(rng.choice(len(vectors), train, replace=False))])
        self.index.add(vectors)
        self.nprobe_in = self.nprobe_out = nlist
        self.radius = np.inf
        self.measured = 1.0
        inside_rows = np.sort(rng.choice(len(vectors), min(TUNE_QUERIES, len(vectors)), replace=False))
        self._tune(vectors, inside_rows, np.ascontiguousarray(outside, np.float32), target, k)

    def _tune(self, vectors: np.ndarray, inside_rows: np.ndarray, outside: np.ndarray,
              target: float, k: int) -> None:
        """nprobe for queries among the matching items (each leaving itself out), the
        distance that says a query is among them, then nprobe for the others."""
        flat = faiss.IndexFlat(vectors.shape[1], self.index.metric_type)
        flat.add(vectors)
        k = min(k, len(vectors) - 1)
        if k < 1:
            return
        want = min(target + TUNE_MARGIN, 1.0)
        steps = [p for p in NPROBE_STEPS if p < self.index.nlist] + [self.index.nlist]
        q_in = vectors[inside_rows]
        _, truth = flat.search(q_in, k + 1)
        truth = without(truth, inside_rows, k)
        for p in steps:
            self.nprobe_in = self.nprobe_out = p
            recall = hits(without(self._search_rows(q_in, k + 1)[1], inside_rows, k), truth)
            if recall >= want:
                break
        near, _ = self._quantizer.search(q_in, 1)
        self.radius = float(np.quantile(self._toward(near[:, 0]), INSIDE_QUANTILE))
        self.measured = recall
        if len(outside) == 0:
            return
        _, truth = flat.search(outside, k)
        for radius in (self.radius, -np.inf):  # -inf: when the split fails, one nprobe for all
            self.radius = radius
            for p in (s for s in steps if s >= self.nprobe_in or radius < 0):
                self.nprobe_out = p
                recall = hits(self._search_rows(outside, k)[1], truth)
                if recall >= want:
                    break
            if recall >= want and (self.nprobe_out < self.index.nlist or radius < 0):
                break
        self.measured = min(self.measured, recall)

    def _toward(self, d: np.ndarray) -> np.ndarray:
        """Distances with smaller = closer, for every metric."""
        return -d if self._higher_is_closer else d

    def _search_rows(self, xt: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, row numbers): queries near the matching items probe nprobe_in lists.
        (faiss's own search, which spreads queries over threads; its search_preassigned
        does not.)"""
        xt = np.ascontiguousarray(xt, dtype=np.float32)
        if self.nprobe_in == self.nprobe_out or self.radius == -np.inf:
            return self.index.search(xt, k, params=FAISS.SearchParametersIVF(nprobe=self.nprobe_out))
        near, _ = self._quantizer.search(xt, 1)
        inside = self._toward(near[:, 0]) <= self.radius
        dist = np.empty((len(xt), k), np.float32)
        pos = np.empty((len(xt), k), np.int64)
        for rows, nprobe in ((inside, self.nprobe_in), (~inside, self.nprobe_out)):
            if rows.any():
                params = FAISS.SearchParametersIVF(nprobe=nprobe)
                dist[rows], pos[rows] = self.index.search(xt[rows], k, params=params)
        return dist, pos

    def search(self, xt: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, store ids) of each row's k nearest matching items, -1 padded."""
        dist, pos = self._search_rows(xt, k)
        return dist, np.where(pos >= 0, self.ids[np.maximum(pos, 0)], -1).astype(np.int64)


class SubsetCache:
    """Subset indexes by (index generation, matching ids): a write that leaves the indexed
    items' filter results alone (an append, a label on a new item) keeps them, where the
    per-view memo would build one again after every write."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._held: OrderedDict[tuple[int, str], SubsetIndex] = OrderedDict()

    def get(self, generation: int, allowed: np.ndarray, make: Callable[[], SubsetIndex]
            ) -> SubsetIndex:
        key = (generation, hashlib.blake2b(np.ascontiguousarray(allowed).tobytes()).hexdigest())
        with self._lock:
            if key in self._held:
                self._held.move_to_end(key)
                return self._held[key]
        made = make()
        with self._lock:
            self._held[key] = made
            while len(self._held) > self.size:
                self._held.popitem(last=False)
        return made


def without(found: np.ndarray, self_rows: np.ndarray, k: int) -> np.ndarray:
    """Each row's first k results other than the query item itself (row numbers)."""
    out = np.full((len(found), k), -1, np.int64)
    for r, (row, me) in enumerate(zip(found, self_rows, strict=True)):
        kept = row[(row != me) & (row >= 0)][:k]
        out[r, : len(kept)] = kept
    return out


def hits(found: np.ndarray, truth: np.ndarray) -> float:
    """Recall of `found` against `truth` (both row numbers, -1 padded)."""
    got = sum(np.intersect1d(f[f >= 0], t[t >= 0]).size for f, t in zip(found, truth, strict=True))
    return got / max(int((truth >= 0).sum()), 1)


def outside_sample(indexed: np.ndarray, allowed: np.ndarray, size: int, seed: int = 0
                   ) -> np.ndarray:
    """Up to `size` indexed ids that fail the filter (queries from the excluded region)."""
    outside = np.setdiff1d(indexed, allowed, assume_unique=True)
    if len(outside) <= size:
        return outside
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(outside, size, replace=False))
