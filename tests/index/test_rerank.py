"""Re-ranking from the store (factory suffix RStore): candidates ordered by exact distances
to the stored vectors, the factor tuned with the re-ranking in the loop, and a bank whose
index holds 4-bit codes answering like its exact neighbours."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.core.errors import InvalidInput
from featurebank.core.spec import Spec
from featurebank.index import rerank
from featurebank.index.build import build_index
from featurebank.index.families import STORE_FACTOR
from featurebank.index.fold import update_index
from featurebank.index.searcher import Searcher
from featurebank.index.tuning import recall_at_k
from tests.support.index_data import World

DIM = 32
FACTORY = "IVF64,PQ16x4fs"  # 8 bytes of codes a vector: far from exact on its own


@pytest.mark.parametrize("factory", ["RStore", "RStore,IVF64,Flat", "IVF64,PQ8,RFlat,RStore",
                                     "IVF64,RStore,PQ8"])
def test_misplaced_rstore_is_refused(factory: str) -> None:
    with pytest.raises(InvalidInput, match="RStore"):
        rerank.split(factory)


def test_split_names_the_faiss_factory() -> None:
    assert rerank.split("OPQ16_32,IVF64,PQ16x4fs,RStore") == ("OPQ16_32,IVF64,PQ16x4fs", True)
    assert rerank.split("IVF64,PQ8") == ("IVF64,PQ8", False)
    assert rerank.factor({"factory": "IVF64,PQ8"}) == 0
    assert rerank.factor({"factory": "IVF64,PQ8,RStore", "params": {STORE_FACTOR: 4}}) == 4


@pytest.mark.parametrize("metric_type", [faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT])
def test_rerank_keeps_the_exact_best_of_the_candidates(metric_type: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 16)).astype(np.float32)
    q = rng.standard_normal((300, 16)).astype(np.float32)  # more than one chunk of queries
    ids = np.arange(1000, 1500, dtype=np.int64)
    gone = ids[::7]  # deleted since the index was built: never returned
    live = ~np.isin(ids, gone)
    store = rerank.array_vectors(ids[live], x[live])
    candidates = np.stack([rng.permutation(ids)[:120] for _ in range(len(q))])
    candidates[:, -5:] = -1  # padding, as faiss leaves it
    dist, found = rerank.rerank(q, candidates, 10, store, metric_type)
    for row in range(len(q)):
        pool = candidates[row][(candidates[row] >= 0) & ~np.isin(candidates[row], gone)]
        v = x[pool - 1000]
        d = v @ q[row] if metric_type == faiss.METRIC_INNER_PRODUCT else ((v - q[row]) ** 2).sum(1)
        order = np.argsort(-d if metric_type == faiss.METRIC_INNER_PRODUCT else d)[:10]
        assert found[row].tolist() == pool[order].tolist()
        np.testing.assert_allclose(dist[row], d[order], rtol=1e-4, atol=1e-4)


def test_rerank_pads_when_too_few_candidates_survive() -> None:
    x = np.eye(4, dtype=np.float32)
    store = rerank.array_vectors(np.arange(4), x)
    dist, ids = rerank.rerank(x[:1], np.array([[0, 3, -1, 9]]), 4, store, faiss.METRIC_L2)
    assert ids.tolist() == [[0, 3, -1, -1]]
    assert np.isinf(dist[0, 2:]).all()


def float16_bank(root: Path, x: np.ndarray) -> Path:
    spec = Spec(backbone="external", weights="external", input_size=None, resize="none",
                preprocessing="none", pooling="none", dim=x.shape[1], dtype="float16")
    with store_mod.create(root, spec) as st:
        st.put_batch([f"item-{i}" for i in range(len(x))], x)
    return root


def exact_ids(bank: Path, q: np.ndarray, k: int = 10) -> np.ndarray:
    with store_mod.open(bank, readonly=True) as st:
        items = st.to_numpy()
    _, pos = faiss.knn(q, np.ascontiguousarray(items.vectors), k)
    return np.asarray(items.ids, np.int64)[pos]


def test_a_bank_of_4_bit_codes_answers_like_its_stored_vectors(tmp_path: Path) -> None:
    world = World.make(DIM, latent=12, centres=40, noise=0.05)
    x, _ = world.sample(20_000, seed=1)
    q, _ = world.sample(300, seed=2)  # fresh: never stored, never tuned on
    plain = float16_bank(tmp_path / "plain", x)
    reranked = float16_bank(tmp_path / "reranked", x)
    common = {"metric": "l2", "transform": "none", "target_recall": 0.9}
    build_index(plain, factory=FACTORY, allow_below_target=True, **common)
    built = build_index(reranked, factory=f"{FACTORY},RStore", **common)
    assert built["factory"] == f"{FACTORY},RStore" and built["target_reached"]
    assert built["params"][STORE_FACTOR] >= 1
    truth = exact_ids(reranked, q)
    with Searcher.load(plain) as s:
        codes_only = recall_at_k(s.search(q, 10).ids, truth)
    with Searcher.load(reranked) as s:
        assert s.manifest["params"][STORE_FACTOR] == built["params"][STORE_FACTOR]
        result = s.search(q, 10)
    assert recall_at_k(result.ids, truth) >= 0.9 > codes_only + 0.2
    # The scores are exact: minus the L2 distances to the stored (float16) vectors, best first.
    with store_mod.open(reranked, readonly=True) as st:
        stored = st.get(result.ids[0]).vectors
    np.testing.assert_allclose(-result.scores[0], np.linalg.norm(stored - q[0], axis=1), rtol=1e-3)
    assert (np.diff(result.scores[0]) <= 0).all()


def test_deleted_and_added_items_after_the_build(tmp_path: Path) -> None:
    world = World.make(DIM, latent=12, centres=40, noise=0.05)
    x, _ = world.sample(6_000, seed=1)
    bank = float16_bank(tmp_path / "bank", x)
    build_index(bank, factory="IVF32,PQ16x4fs,RStore", metric="l2", transform="none",
                target_recall=0.9)
    with Searcher.load(bank) as s:
        first = s.search(x[:50], 5)
        hits = {key for keys in first.keys for key in keys[:2]}
    gone = set(first.ids[:, :2].ravel().tolist())
    with store_mod.open(bank) as st:
        st.delete(hits)
        new, _ = world.sample(500, seed=3)
        st.put_batch([f"new-{i}" for i in range(len(new))], new)
    with Searcher.load(bank) as s:
        after = s.search(np.concatenate([x[:50], new[:50]]), 5)
        assert not gone & set(after.ids.ravel().tolist())
        assert all(keys[0] == f"new-{i}" for i, keys in enumerate(after.keys[50:]))
    folded = update_index(bank)
    assert folded["factory"] == "IVF32,PQ16x4fs,RStore"
    with Searcher.load(bank) as s:
        assert s.search(new[:50], 1).keys == [[f"new-{i}"] for i in range(50)]


def test_store_reads_vectors_of_live_ids_only(tmp_path: Path) -> None:
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    bank = float16_bank(tmp_path / "bank", x)
    with store_mod.open(bank) as st:
        st.delete(["item-3"])
        ids = st.ids_of([f"item-{i}" for i in (0, 5, 9)])
        asked = np.array([ids[2], 10_000, ids[0], ids[1] - 2, ids[1]], dtype=np.uint64)
        found, vectors = st.vectors_of(asked)
    assert found.tolist() == [True, False, True, False, True]  # unknown, deleted: not found
    np.testing.assert_array_equal(vectors, x[[9, 0, 5]])
