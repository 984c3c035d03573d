"""The mutable segment grown by many small commits: values stay immutable, appends copy only
the new rows, and its exact search is a flat index's."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from featurebank.index.segment import Segment

DIM = 12


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def test_small_appends_write_in_place_and_older_segments_keep_their_rows() -> None:
    seg = Segment.empty(DIM, faiss.METRIC_L2)
    values, all_vectors = [seg], rows(300, 0)
    for start in range(0, 300, 3):  # 100 commits of 3 items
        ids = np.arange(start, start + 3, dtype=np.int64) + 1000
        seg = seg.applied(ids, all_vectors[start : start + 3], np.zeros(0, np.int64))
        values.append(seg)
    np.testing.assert_array_equal(seg.ids, np.arange(1000, 1300))
    np.testing.assert_array_equal(seg.vectors, all_vectors)
    for n, older in enumerate(values):  # each value still holds exactly its own items
        assert older.size == 3 * n
        np.testing.assert_array_equal(older.vectors, all_vectors[: 3 * n])
    # in place: the last 50 values share one buffer (a copy per commit would not)
    assert all(np.shares_memory(v.vectors, seg.vectors) for v in values[-50:])


def test_an_append_to_an_older_segment_copies_and_leaves_the_newer_alone() -> None:
    base = Segment.empty(DIM, faiss.METRIC_L2).applied(
        np.arange(10, dtype=np.int64), rows(10, 1), np.zeros(0, np.int64))
    newer = base.applied(np.arange(10, 15, dtype=np.int64), rows(5, 2), np.zeros(0, np.int64))
    kept = newer.vectors.copy()
    branch = base.applied(np.arange(20, 25, dtype=np.int64), rows(5, 3), np.zeros(0, np.int64))
    np.testing.assert_array_equal(newer.vectors, kept)
    np.testing.assert_array_equal(branch.vectors[10:], rows(5, 3))
    assert not np.shares_memory(branch.vectors, newer.vectors)


def test_a_deletion_in_the_segment_drops_its_row() -> None:
    seg = Segment.empty(DIM, faiss.METRIC_L2).applied(
        np.arange(6, dtype=np.int64), rows(6, 4), np.zeros(0, np.int64))
    after = seg.applied(np.array([9], np.int64), rows(1, 5), np.array([2, 4], np.int64))
    np.testing.assert_array_equal(after.ids, [0, 1, 3, 5, 9])
    np.testing.assert_array_equal(after.vectors, np.concatenate([rows(6, 4)[[0, 1, 3, 5]], rows(1, 5)]))
    assert seg.size == 6


@pytest.mark.parametrize("metric", [faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT])
def test_its_search_is_an_exact_flat_search(metric: int) -> None:
    seg = Segment.empty(DIM, metric)
    x = rows(500, 6)
    for start in range(0, 500, 50):
        seg = seg.applied(np.arange(start, start + 50, dtype=np.int64) * 2, x[start : start + 50],
                          np.zeros(0, np.int64))
    flat = faiss.IndexFlat(DIM, metric)
    flat.add(x)
    queries = rows(7, 7)
    want_d, want_pos = flat.search(queries, 10)
    got_d, got_ids = seg.search(queries, 10)
    np.testing.assert_array_equal(got_ids, want_pos * 2)
    np.testing.assert_allclose(got_d, want_d, rtol=1e-5)
