"""Indexes keep their recall: graphs from class-ordered data, folds, and refusals below target.

The data are well separated class clusters in the order a class-folder embed
stores them (class by class): the shape on which an HNSW graph grown chunk by
chunk (or a large batch appended onto a graph) loses recall at any efSearch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.core.errors import RecallBelowTarget
from featurebank.core.vocabulary import metric as metric_named
from featurebank.index import build
from featurebank.index.build import build_index
from featurebank.index.fold import update_index
from featurebank.index.searcher import Searcher
from featurebank.index.tuning import recall_at_k
from tests.support.index_data import make_bank

DIM = 64
NOISE = 0.02  # fresh queries vs the 1000 held-out ones the tuner stopped at the target on


def class_ordered(n_classes: int, per_class: int, seed: int, first: int = 0) -> np.ndarray:
    """Tight clusters around random unit centres, stored class by class."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(first + n_classes, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = np.random.default_rng(seed)
    return np.concatenate([
        centres[c] + 0.05 * noise.normal(size=(per_class, DIM)).astype(np.float32)
        for c in range(first, first + n_classes)
    ])


def measured_recall(bank: Path, queries: np.ndarray, k: int = 10) -> float:
    """recall@k of the live index on fresh queries against exact search in the index's space."""
    with store_mod.open(bank, readonly=True) as st:
        items = st.to_numpy()
    with Searcher.load(bank) as searcher:
        found = searcher.search(queries, k).ids
        assert metric_named(searcher.metric).unit_vectors  # cosine: inner product of unit vectors
        x, q = searcher.transform(items.vectors), searcher.transform(queries)
    truth = np.asarray(items.ids, dtype=np.int64)[np.argsort(-(q @ x.T), axis=1)[:, :k]]
    return recall_at_k(found, truth)


def test_graph_from_class_ordered_clusters_reaches_its_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = class_ordered(10, 3000, seed=1)
    bank = make_bank(tmp_path / "bank", x)
    # Small chunks for non-graph indexes: a graph must still get its vectors in one add.
    monkeypatch.setattr(build, "ADD_BATCH", 10_000)
    built = build_index(bank)
    assert "HNSW" in built["factory"], built["selection"]
    assert built["target_reached"] and built["recall_at_k"] >= 0.95
    queries = class_ordered(10, 50, seed=2)
    assert measured_recall(bank, queries) >= 0.95 - NOISE  # chunked adds plateau near 0.85


def test_fold_of_a_batch_of_new_classes_keeps_the_target(tmp_path: Path) -> None:
    base = class_ordered(4, 2500, seed=3)
    bank = make_bank(tmp_path / "bank", base)
    build_index(bank, factory="HNSW32")
    new = class_ordered(6, 2500, seed=4, first=4)  # far from every indexed item
    with store_mod.open(bank) as st:
        st.put_batch([f"new-{i}" for i in range(len(new))], new)
    folded = update_index(bank)
    assert folded["ntotal"] == len(base) + len(new)
    assert folded["target_reached"] and folded["recall_at_k"] >= 0.95, folded.get("tuning")
    queries = np.concatenate([class_ordered(4, 50, seed=5), class_ordered(6, 50, seed=6, first=4)])
    assert measured_recall(bank, queries) >= 0.95 - NOISE  # chunked adds plateau near 0.85


def streamed(centres: np.ndarray, n: int, seed: int) -> np.ndarray:
    """What streaming writers add: items of any class, in no order, near their class centre."""
    rng = np.random.default_rng(seed)
    cls = rng.integers(len(centres), size=n)
    return (centres[cls] + 0.3 * rng.normal(size=(n, centres.shape[1]))).astype(np.float32)


def test_folds_of_streamed_items_stay_as_cheap_to_search_as_the_build(tmp_path: Path) -> None:
    # A class-ordered graph of 20k items with two folds of 10k streamed items each: linked
    # with faiss' default efConstruction (40), the second fold needed efSearch 320 to reach
    # the target (each search ~10x the build's cost), and larger folds needed a rebuild.
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, DIM)).astype(np.float32)
    sizes = (20_000 * (w := 1 / np.arange(1, 41) ** 0.8) / w.sum()).astype(int)
    base = np.concatenate([
        (centres[c] + 0.35 * rng.normal(size=(3, DIM)))[rng.integers(0, 3, size)]
        + 0.25 * rng.normal(size=(size, DIM)) for c, size in enumerate(sizes)
    ]).astype(np.float32)
    bank = make_bank(tmp_path / "bank", base)
    built = build_index(bank, factory="HNSW32")
    for fold in range(2):
        with store_mod.open(bank) as st:
            st.put_batch([f"s{fold}-{i}" for i in range(10_000)], streamed(centres, 10_000, fold))
        folded = update_index(bank)
        assert "rebuilt" not in folded and folded["last_update"]["measured"], folded
        assert folded["target_reached"], folded.get("tuning")
        assert folded["params"]["efSearch"] <= 4 * max(built["params"]["efSearch"], 16), folded
    queries = streamed(centres, 500, seed=9)
    assert measured_recall(bank, queries) >= 0.95 - NOISE


def test_an_index_below_its_target_is_refused_unless_allowed(tmp_path: Path) -> None:
    x = class_ordered(10, 300, seed=7)
    bank = make_bank(tmp_path / "bank", x)
    with pytest.raises(RecallBelowTarget, match=r"recall@10 0\.\d+ at its best setting, below the "
                       r"target 0\.99: not published"):
        build_index(bank, factory="IVF8,SQ4", target_recall=0.99)
    assert not (bank / "indexes" / "CURRENT").exists()
    allowed = build_index(bank, factory="IVF8,SQ4", target_recall=0.99, allow_below_target=True)
    assert not allowed["target_reached"] and allowed["recall_at_k"] < 0.99
    with store_mod.open(bank) as st:  # the permission is persisted: a fold publishes too
        st.put_batch([f"more-{i}" for i in range(100)], class_ordered(10, 10, seed=8))
    folded = update_index(bank)
    assert folded["generation"] == allowed["generation"] + 1
    assert folded["last_update"]["measured"] and not folded["target_reached"]
    with pytest.raises(RecallBelowTarget, match="below the target 0.99"):  # a rebuild does not
        build_index(bank, allow_below_target=False)


def test_a_fold_measured_below_target_is_not_published_but_rebuilt(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    base = rng.uniform(0, 1, size=(2000, 16)).astype(np.float32)
    bank = make_bank(tmp_path / "bank", base)
    built = build_index(bank, factory="IVF4,SQ4", metric="l2", transform="none",
                        target_recall=0.5)
    assert built["target_reached"]
    # New items outside the range the scalar quantiser was trained on: their codes clip,
    # so among themselves they are nearly indistinguishable.
    new = rng.uniform(5, 6, size=(400, 16)).astype(np.float32)
    with store_mod.open(bank) as st:
        st.put_batch([f"new-{i}" for i in range(len(new))], new)
    folded = update_index(bank)
    assert folded["rebuilt"].startswith("the fold measured recall@10 0.")
    assert "below the target 0.5" in folded["rebuilt"]
    assert folded["target_reached"] and folded["ntotal"] == 2400
    assert folded["generation"] == built["generation"] + 1  # only the rebuild was published
