"""The mutable segment: store items newer than the loaded index generation, searched exactly.

Why: writing an index file per Upsert costs time and bytes proportional to the
bank. Instead the store's commit is the durable record, and what it holds beyond
the loaded generation (its live ids minus the generation's ids) is kept in
memory, transformed like the generation's vectors, and searched by brute force
beside the generation; the two result lists are merged by score. A checkpoint
later folds the segment into a new generation (index/checkpoint.py), after which
the segment of the new generation starts (almost) empty.

Segments are immutable values: a catch-up builds the next one from the previous
(copying at most the segment, which checkpoints keep small), so a search holds a
consistent segment without locks. The segment is derived from the store's live
ids, so it is right after a restart, after a compaction of the change log, and in
readers in other processes alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import faiss
import numpy as np

from featurebank.core.errors import NotFound
from featurebank.core.vocabulary import metric as metric_named


def member(values: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Boolean mask: which of `values` (int64 ids) are in `sorted_ids` (unique, sorted).

    Store ids are dense (sequential, with the gaps deletions leave), so for many values
    a bitmap over the id range answers in linear time; a few values (or sparse ids)
    are looked up by binary search.
    """
    if sorted_ids.size == 0 or values.size == 0:
        return np.zeros(values.shape, dtype=bool)
    top = int(max(int(values.max()), int(sorted_ids[-1])))
    dense = top < 8 * (values.size + sorted_ids.size) + 4096
    if dense and values.size * 16 >= sorted_ids.size and int(values.min()) >= 0:
        bitmap = np.zeros(top + 1, dtype=bool)
        bitmap[sorted_ids] = True
        return np.asarray(bitmap[values])
    pos = np.minimum(np.searchsorted(sorted_ids, values), sorted_ids.size - 1)
    return np.asarray(sorted_ids[pos] == values)


class Spare:
    """Capacity behind a growing array (labels, the segment), so appending new items copies
    only the new part.

    Older views keep their own (shorter) slice of the same buffer, which later
    appends never write into; only the array that ends at `used` grows in place.
    """

    __slots__ = ("buf", "used")

    def __init__(self, buf: np.ndarray, used: int) -> None:
        self.buf, self.used = buf, used


def appended(arr: np.ndarray, extra: np.ndarray, spare: Spare | None) -> tuple[np.ndarray, Spare]:
    """`arr` + `extra` along the first axis (amortised: in place when `arr` ends where its
    spare buffer is used). Only one thread may append to a buffer at a time."""
    n, m = len(arr), len(extra)
    if (spare is not None and spare.used == n and len(spare.buf) >= n + m
            and arr.ctypes.data == spare.buf.ctypes.data):
        spare.buf[n : n + m] = extra
        spare.used = n + m
        return spare.buf[: n + m], spare
    buf = np.empty((max(2 * (n + m), 1024), *arr.shape[1:]), dtype=arr.dtype)
    buf[:n], buf[n : n + m] = arr, extra
    return buf[: n + m], Spare(buf, n + m)


@dataclass(frozen=True)
class Segment:
    """Items (ids sorted, transformed vectors) the loaded generation does not hold."""

    ids: np.ndarray  # int64, sorted
    vectors: np.ndarray  # float32 (n, index_dim), rows in ids order
    metric_type: int  # faiss metric constant of the generation
    since: float = 0.0  # when the oldest item now in the segment arrived (0: empty)
    spare: tuple[Spare, Spare] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(cls, dim: int, metric_type: int) -> Segment:
        return cls(np.zeros(0, np.int64), np.zeros((0, dim), np.float32), metric_type)

    @property
    def size(self) -> int:
        return int(self.ids.size)

    @property
    def nbytes(self) -> int:
        return int(self.vectors.nbytes + self.ids.nbytes)

    def caught_up(
        self,
        live_ids: np.ndarray,
        base_ids: np.ndarray,
        read: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    ) -> Segment:
        """The segment for the store's `live_ids` over a generation holding `base_ids`.

        `read(ids)` returns (ids, transformed vectors) of stored items; only items
        not already in this segment are read. Raises NotFound when an item was
        deleted meanwhile (the caller reloads the live ids and tries again).
        """
        wanted = live_ids[~member(live_ids, base_ids)]
        keep = member(self.ids, wanted)
        new = wanted[~member(wanted, self.ids)]
        if new.size == 0 and keep.all():
            return self
        ids, vectors = self.ids[keep], self.vectors[keep]
        if new.size:
            got_ids, got = read(new)
            if got_ids.size != new.size:
                raise NotFound(f"{new.size - got_ids.size} segment items vanished while reading")
            ids = np.concatenate([ids, got_ids.astype(np.int64)])
            vectors = np.concatenate([vectors, got.astype(np.float32, copy=False)])
            order = np.argsort(ids, kind="stable")
            ids, vectors = ids[order], vectors[order]
        since = (self.since if keep.any() else 0.0) if ids.size else 0.0
        if new.size and not since:
            since = time.time()
        return Segment(ids, np.ascontiguousarray(vectors), self.metric_type, since)

    def applied(self, ids: np.ndarray, vectors: np.ndarray, deleted: np.ndarray) -> Segment:
        """This segment without `deleted`, plus new items (ids above every id it holds).

        Appending without deletions writes only the new rows (into spare capacity behind
        this segment's arrays, which older segments never look past): a segment fed by
        many small commits costs each commit its own items, not the segment's size.
        """
        keep = ~member(self.ids, deleted) if deleted.size else np.ones(self.size, dtype=bool)
        if ids.size == 0 and keep.all():
            return self
        new_ids, new = ids.astype(np.int64), vectors.astype(np.float32, copy=False)
        since = self.since if keep.any() else 0.0
        if ids.size and not since:
            since = time.time()
        if keep.all():
            ids_spare, vectors_spare = self.spare or (None, None)
            out_ids, ids_spare = appended(self.ids, new_ids, ids_spare)
            out, vectors_spare = appended(self.vectors, new, vectors_spare)
            return Segment(out_ids, out, self.metric_type, since, (ids_spare, vectors_spare))
        out_ids = np.concatenate([self.ids[keep], new_ids])
        out = np.concatenate([self.vectors[keep], new])
        return Segment(out_ids, np.ascontiguousarray(out), self.metric_type, since if out_ids.size else 0.0)

    def subset(self, mask: np.ndarray) -> Segment:
        """The items where `mask` is true (what a label-filtered search looks at)."""
        if mask.all():
            return self
        return Segment(self.ids[mask], np.ascontiguousarray(self.vectors[mask]), self.metric_type,
                       self.since)

    def search(self, xt: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact (distances, ids) of the k nearest segment items (-1 padding)."""
        n = xt.shape[0]
        if self.size == 0:
            return np.full((n, k), np.nan, np.float32), np.full((n, k), -1, np.int64)
        dist, pos = faiss.knn(xt, self.vectors, min(k, self.size), metric=self.metric_type)
        found = np.where(pos >= 0, self.ids[np.maximum(pos, 0)], -1).astype(np.int64)
        return dist, found


def merge(
    base: tuple[np.ndarray, np.ndarray],
    seg: tuple[np.ndarray, np.ndarray],
    k: int,
    metric: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) of two result lists (faiss distances in, scores out, -inf padding)."""
    scores = [metric_named(metric).scores(d.astype(np.float32)) for d, _ in (base, seg)]
    ids = np.concatenate([base[1], seg[1]], axis=1)
    both = np.concatenate(scores, axis=1).astype(np.float32)
    both[ids < 0] = -np.inf
    both = np.nan_to_num(both, nan=-np.inf)
    order = np.argsort(-both, axis=1, kind="stable")[:, :k]
    top_ids = np.take_along_axis(ids, order, 1)
    top = np.take_along_axis(both, order, 1)
    top_ids[~np.isfinite(top)] = -1
    return top, top_ids
