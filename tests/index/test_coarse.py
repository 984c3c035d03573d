"""Many IVF lists trained in two levels (index/coarse.py): real FAISS indexes, clustered
vectors, recall on fresh queries against exact search."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from featurebank.index import build, coarse

DIM = 32


def clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((200, DIM)).astype(np.float32)
    return (centres[rng.integers(0, 200, n)] + 0.3 * rng.standard_normal((n, DIM))).astype(np.float32)


def recall_at(index: faiss.Index, x: np.ndarray, q: np.ndarray, nprobe: int) -> float:
    index.add(x)
    faiss.extract_index_ivf(index).nprobe = nprobe
    _, got = index.search(q, 10)
    _, truth = faiss.knn(q, x, 10)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth, strict=True)]))


def test_two_levels_find_the_same_neighbours_as_one(monkeypatch: pytest.MonkeyPatch) -> None:
    x, q = clustered(40_000, seed=1), clustered(300, seed=2)  # queries the index never saw
    one = faiss.index_factory(DIM, "IVF512,Flat")
    build.train(one, x)  # below the threshold: one k-means, as faiss trains it
    assert faiss.extract_index_ivf(one).nlist < coarse.TWO_LEVEL_MIN_NLIST
    monkeypatch.setattr(coarse, "TWO_LEVEL_MIN_NLIST", 256)
    two = faiss.index_factory(DIM, "IVF512,Flat")
    assert coarse.train_lists(two, x)
    build.train(two, x)
    assert faiss.extract_index_ivf(two).quantizer.ntotal == 512
    assert recall_at(two, x, q, 8) >= recall_at(one, x, q, 8) - 0.03


def test_lists_behind_a_transform_are_trained_in_its_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coarse, "TWO_LEVEL_MIN_NLIST", 64)
    x, q = clustered(20_000, seed=3), clustered(200, seed=5)
    reference = faiss.index_factory(DIM, "PCA16,IVF128,Flat")
    reference.train(x)  # faiss's own training, one level
    index = faiss.index_factory(DIM, "PCA16,IVF128,Flat")
    assert coarse.train_lists(index, x)
    build.train(index, x)
    assert recall_at(index, x, q, 16) >= recall_at(reference, x, q, 16) - 0.03


def test_small_and_list_free_indexes_are_left_to_faiss() -> None:
    x = clustered(5_000, seed=4)
    assert not coarse.train_lists(faiss.index_factory(DIM, "IVF64,Flat"), x)
    assert not coarse.train_lists(faiss.index_factory(DIM, "HNSW32"), x)


def test_every_group_with_points_gets_a_list_and_the_lists_add_up() -> None:
    sizes = np.array([5000, 3, 0, 1, 997])
    share = coarse.shares(128, sizes)
    assert share.sum() == 128 and share[2] == 0 and (share[sizes > 0] >= 1).all()
    assert (share <= sizes).all() and share[0] > share[4] > share[1]
    assert coarse.shares(6, np.array([2, 2, 2])).tolist() == [2, 2, 2]
