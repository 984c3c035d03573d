"""Index families: one lookup finds each real FAISS index's family, its knobs and how a
filtered search sets them."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from featurebank.index import families, selection, stored_ids
from featurebank.index.build import make_index
from featurebank.index.families import family_of, search_parameters, set_params, tunable

DIM = 32


@pytest.mark.parametrize(
    ("factory", "family", "knobs"),
    [
        ("Flat", "flat", []),
        ("PQ8", "flat", []),
        ("HNSW32", "hnsw", ["efSearch"]),
        ("PCA16,HNSW32,RFlat", "hnsw", ["efSearch", "k_factor_rf"]),
        ("IVF64,Flat", "ivf", ["nprobe"]),
        ("OPQ8_32,IVF64_HNSW32,PQ8", "ivf", ["nprobe"]),
        ("LSH", "flat", []),
    ],
)
def test_each_index_has_one_family_with_its_knobs(factory: str, family: str, knobs: list[str]) -> None:
    index = make_index(factory, DIM, "l2")
    assert family_of(index).name == family
    grid = tunable(index, k=10)
    assert list(grid) == knobs  # the main knob first
    if "nprobe" in grid:
        assert grid["nprobe"][-1] == 64  # never more lists than the index has
    if "efSearch" in grid:
        assert min(grid["efSearch"]) >= 10  # at least k candidates
    assert family_of(index).graph == (family == "hnsw")
    assert family_of(index).mergeable == (family in ("flat", "ivf"))


def test_the_chooser_offers_the_knobs_its_index_family_has() -> None:
    chosen = []
    for count, pca_dim, sharded in ((1000, None, False), (50_000, None, False),
                                    (50_000, 16, False), (200_000, None, True)):  # fmt: skip
        choice = selection.choose_factory(count, DIM, 64 << 30, pca_dim=pca_dim, sharded=sharded)
        index = make_index(choice.factory, DIM, "l2")
        assert set(choice.tunable) == set(tunable(index, k=10)), choice.factory
        chosen.append(family_of(index).name)
    assert chosen == ["flat", "hnsw", "hnsw", "ivf"]


def test_a_filtered_search_carries_the_selector_and_boosted_knobs() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, DIM)).astype(np.float32)
    index = make_index("IVF16,Flat", DIM, "l2")
    index.train(x)
    index.add_with_ids(x, np.arange(2000, dtype=np.int64))
    set_params(index, {"nprobe": 2})
    allowed = np.arange(0, 2000, 7, dtype=np.int64)
    batch = faiss.IDSelectorBatch(allowed)
    sel = stored_ids.selector(index, batch)
    assert sel is batch  # an IVF keeps store ids in its lists: nothing to translate
    inner = stored_ids.searching(index)
    params, keep = search_parameters(inner, sel, {"nprobe": 2}, boost=4.0)
    assert params.nprobe == 8 and keep[-1] is params
    _, ids = index.search(x[:20], 5, params=params)
    assert np.isin(ids[ids >= 0], allowed).all() and (ids >= 0).all()
    capped, _ = search_parameters(inner, sel, {"nprobe": 2}, boost=1000.0)
    assert capped.nprobe == 16  # never more lists than the index has

    hnsw = make_index("PCA16,HNSW32,RFlat", DIM, "l2")
    hnsw.train(x)
    hnsw.add_with_ids(x, np.arange(2000, dtype=np.int64))
    sel = stored_ids.selector(hnsw, faiss.IDSelectorBatch(allowed))
    params, keep = search_parameters(
        stored_ids.searching(hnsw), sel, {"efSearch": 40, "k_factor_rf": 2}, boost=100.0
    )
    assert params.k_factor == 2 and len(keep) == 3  # refine -> pre-transform -> graph
    assert keep[0].efSearch == families.MAX_EF_SEARCH
    _, ids = hnsw.search(x[:20], 5, params=params)
    assert np.isin(ids[ids >= 0], allowed).all()
