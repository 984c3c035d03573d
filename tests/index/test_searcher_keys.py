"""A searcher reads every key of a generation that fits its key cache after a few misses,
and hits outside it (items written since, deleted ones) still get their own key or none.

Why: a bank that gets a tenth of a server's queries missed the cache of recent hits for
thousands of searches, each miss decoding a whole block of keys.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featurebank import store as store_mod
from featurebank.core.spec import Spec
from featurebank.index.build import build_index
from featurebank.index.searcher import KEYS_AFTER_MISSES, Searcher

DIM = 16


def test_the_first_miss_reads_every_key_and_later_writes_still_get_theirs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3_000, DIM)).astype(np.float32)
    keys = [f"k-{i}" for i in range(len(vectors))]
    with store_mod.create(tmp_path / "bank", Spec.external("external", DIM)) as st:
        st.put_batch(keys, vectors, labels=["a"] * len(keys), splits=["train"] * len(keys))
    build_index(tmp_path / "bank", k=5)
    with store_mod.open(tmp_path / "bank") as st, Searcher.load(st, threads=1) as searcher:
        assert searcher.search(vectors[:1], 5).keys[0][0] == "k-0"
        for i in range(1, KEYS_AFTER_MISSES):  # each a miss: new neighbours
            searcher.search(vectors[i * 50:i * 50 + 1], 5).keys  # noqa: B018
        assert len(searcher._key_cache) == len(keys)  # the whole generation, at once
        found = searcher.search(vectors[100:110], 1).keys
        assert [row[0] for row in found] == keys[100:110]

        later = rng.normal(size=(1, DIM)).astype(np.float32) * 5
        st.put_batch(["written-later"], later, labels=["a"], splits=["train"])
        st.delete(["k-7"])
        searcher.catch_up()
        assert searcher.search(later, 1).keys[0][0] == "written-later"  # not in the generation
        assert "k-7" not in searcher.search(vectors[7:8], 3).keys[0]
