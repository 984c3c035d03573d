"""The cluster scan of a flat index answers exactly what the flat scan answers, reading
less of the index, and is used only for data that clusters.

Why: it replaces the full scan of every flat L2 bank once the bank has been asked enough
queries, so a single differing neighbour or distance would change search and kNN votes.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.core.spec import Spec
from featurebank.index import cluster_scan
from featurebank.index.build import build_index
from featurebank.index.searcher import Searcher

DIM = 32


def clustered(n: int, seed: int, clusters: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(clusters, DIM))
    picks = rng.integers(0, clusters, size=n)
    return (centres[picks] + 0.2 * rng.normal(size=(n, DIM))).astype(np.float32)


def id_mapped(vectors: np.ndarray, metric: int = faiss.METRIC_L2) -> faiss.IndexIDMap2:
    index = faiss.IndexIDMap2(faiss.IndexFlat(DIM, metric))
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64) * 3 + 7)  # ids != rows
    return index


@pytest.mark.parametrize("copy_max_bytes", [cluster_scan.COPY_MAX_BYTES, 0])
def test_the_plan_answers_exactly_as_the_flat_scan_reading_a_fraction(
    copy_max_bytes: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both layouts: the rows copied cluster by cluster, and (for indexes over the copy
    limit) read in place from the index."""
    monkeypatch.setattr(cluster_scan, "COPY_MAX_BYTES", copy_max_bytes)
    index = id_mapped(clustered(6_000, seed=1))
    scan = cluster_scan.for_generation(index, k=10)
    assert scan is not None
    flat_rows = faiss.rev_swig_ptr(faiss.downcast_index(index.index).get_xb(), 6_000 * DIM)
    assert np.shares_memory(scan.vectors, flat_rows) == (copy_max_bytes == 0)
    for nq in (1, 7, 300):  # under 1,000 rows a call, where FAISS scans query by query too
        queries = clustered(nq, seed=nq + 2)
        expected = index.search(queries, 10)
        scan.rows_read = 0
        dist, ids = scan.search(queries, 10)
        np.testing.assert_array_equal(ids, expected[1])
        np.testing.assert_array_equal(dist, expected[0])
        assert scan.rows_read < 0.5 * nq * index.ntotal


def test_queries_far_from_every_cluster_still_get_their_exact_neighbours() -> None:
    index = id_mapped(clustered(4_000, seed=3))
    scan = cluster_scan.for_generation(index, k=5)
    assert scan is not None
    rng = np.random.default_rng(4)
    between = (clustered(50, seed=5) + clustered(50, seed=6)) / 2  # midway between clusters
    far = (rng.normal(size=(50, DIM)) * 10).astype(np.float32)
    for queries in (between, far, np.ascontiguousarray(between[:, :]) * 0):
        expected = index.search(queries, 5)
        dist, ids = scan.search(queries, 5)
        np.testing.assert_array_equal(dist, expected[0])
        np.testing.assert_array_equal(ids, expected[1])


def test_duplicates_keep_the_flat_distances_and_neighbours() -> None:
    base = clustered(2_500, seed=7)
    index = id_mapped(np.concatenate([base, base[:500]]))  # 500 vectors stored twice
    scan = cluster_scan.for_generation(index, k=4)
    assert scan is not None
    queries = base[:40] + 1e-3
    expected_dist, expected_ids = index.search(queries, 4)
    dist, ids = scan.search(queries, 4)
    np.testing.assert_array_equal(dist, expected_dist)
    for row in range(len(queries)):  # equal distances may come in another order
        assert set(ids[row].tolist()) == set(expected_ids[row].tolist())


def test_data_that_does_not_cluster_small_indexes_and_inner_product_keep_the_flat_scan() -> None:
    spread = np.random.default_rng(8).normal(size=(6_000, DIM)).astype(np.float32)
    assert cluster_scan.for_generation(id_mapped(spread), k=10) is None
    assert cluster_scan.for_generation(id_mapped(clustered(500, seed=9)), k=10) is None
    ip = id_mapped(clustered(6_000, seed=10), faiss.METRIC_INNER_PRODUCT)
    assert cluster_scan.for_generation(ip, k=10) is None
    hnsw = faiss.IndexIDMap2(faiss.IndexHNSWFlat(DIM, 16))
    hnsw.add_with_ids(clustered(3_000, seed=11), np.arange(3_000, dtype=np.int64))
    assert cluster_scan.for_generation(hnsw, k=10) is None


def test_a_searcher_plans_a_busy_flat_bank_and_answers_as_before(tmp_path: Path) -> None:
    vectors = clustered(5_000, seed=12)
    keys = [f"item-{i}" for i in range(len(vectors))]
    with store_mod.create(tmp_path / "bank", Spec.external("external", DIM)) as st:
        st.put_batch(keys, vectors, labels=["a"] * len(keys), splits=["train"] * len(keys))
    build_index(tmp_path / "bank", k=10)
    queries = clustered(cluster_scan.PLAN_AFTER + 64, seed=13)
    with Searcher.load(tmp_path / "bank", threads=1) as searcher:
        gen = searcher._view.gen
        assert gen.family.name == "flat"
        before = [searcher.search(q[None], 10) for q in queries[:cluster_scan.PLAN_AFTER]]
        searcher._planner.wait()  # planned on a thread of its own while queries scan in full
        assert searcher._planner.scan_for(gen.number, gen.index, 10, 0) is not None
        after = searcher.search(queries[cluster_scan.PLAN_AFTER:], 10)
        expected = gen.index.search(gen.transform.apply(queries), 10)
        got_keys = [r.keys[0][0] for r in before] + [row[0] for row in after.keys]
    got_ids = np.vstack([r.ids for r in before] + [after.ids])
    np.testing.assert_array_equal(got_ids, expected[1])
    with store_mod.open(tmp_path / "bank", readonly=True) as st:
        names = st.keys_of(expected[1][:, 0].astype(np.uint64))
    assert got_keys == [names[int(i)] for i in expected[1][:, 0]]


def test_the_query_that_makes_a_plan_due_does_not_wait_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors = clustered(3_000, seed=14)
    with store_mod.create(tmp_path / "bank", Spec.external("external", DIM)) as st:
        st.put_batch([f"item-{i}" for i in range(len(vectors))], vectors)
    build_index(tmp_path / "bank", k=10)
    release = threading.Event()
    plan = cluster_scan.for_generation

    def slow_plan(index: Any, k: int) -> Any:  # planning that takes as long as the test says
        release.wait(30)
        return plan(index, k)

    monkeypatch.setattr(cluster_scan, "for_generation", slow_plan)
    queries = clustered(cluster_scan.PLAN_AFTER + 10, seed=15)
    with Searcher.load(tmp_path / "bank", threads=1) as searcher:
        answered = threading.Thread(target=lambda: [searcher.search(q[None], 10) for q in queries])
        answered.start()
        try:
            answered.join(20)
            assert not answered.is_alive()  # every query answered, the plan still being made
            gen = searcher._view.gen
            assert searcher._planner.scan_for(gen.number, gen.index, 10, 0) is None
        finally:
            release.set()
            answered.join()
        searcher._planner.wait()
        assert searcher._planner.scan_for(gen.number, gen.index, 10, 0) is not None
