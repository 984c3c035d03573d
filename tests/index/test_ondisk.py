"""Indexes whose inverted lists live on disk: built, moved, folded and served memory-mapped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.cli import main
from featurebank.core.errors import InvalidInput
from featurebank.core.integrity import problems
from featurebank.core.mapped_files import evict, resident
from featurebank.index.build import build_index
from featurebank.index.fold import update_index
from featurebank.index.searcher import Searcher
from featurebank.index.stored_ids import IDS_FILE, ONDISK_FILE, on_disk
from featurebank.server.client import FeatureBankClient
from tests.support.index_data import World, exact_ids, make_bank
from tests.support.proxy import Serving


def test_ondisk_build_moves_folds_and_keeps_published_files(tmp_path: Path) -> None:
    world = World.make(32, latent=8, seed=41)
    x, _ = world.sample(6000, seed=42)
    bank = make_bank(tmp_path / "bank", x)
    built = build_index(bank, factory="IVF64,Flat", metric="l2", ondisk=True)
    gen = bank / "indexes" / str(built["generation"])
    assert built["ondisk"] and built["index_params"]["ondisk"]
    assert (gen / ONDISK_FILE).stat().st_size > x.nbytes  # the codes and ids live there
    assert np.array_equal(np.load(gen / IDS_FILE), np.arange(len(x)))  # loads read no list
    moved = tmp_path / "moved"
    shutil.move(str(bank), moved)  # lists are found beside the index wherever the bank goes
    with Searcher.load(moved) as searcher:
        assert on_disk(searcher._view.gen.index)
        got = searcher.search(x[:50], 5).ids
    truth = exact_ids(x, x[:50], 5)
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got, truth, strict=True)]) >= 0.9
    with store_mod.open(moved) as st:
        extra, _ = world.sample(200, seed=43)
        new_ids = st.put_batch([f"new-{i}" for i in range(200)], extra)
        st.delete(["item-0"])
    gen = moved / "indexes" / str(built["generation"])
    updated = update_index(moved)  # adds into a private copy, publishes its own lists
    assert updated["added"] == 200 and updated["ondisk"]
    assert updated["last_update"]["filtered"] == 1  # on-disk lists are read-only: filtered
    assert problems(gen, deep=True) == []  # the published generation was never written
    assert not list((moved / "indexes").glob("staging*"))
    with Searcher.load(moved) as searcher:
        assert searcher.generation == updated["generation"]
        assert (searcher.search(extra[:20], 1).ids[:, 0] == new_ids[:20].astype(np.int64)).all()
        assert not np.isin(searcher.search(x[:1], 10).ids, [0]).any()
    folded = moved / "indexes" / str(updated["generation"])
    kept = np.load(folded / IDS_FILE)
    np.save(folded / IDS_FILE, kept[:-1])  # damaged: one id short
    with Searcher.load(moved) as searcher:  # the previous generation is served instead
        assert searcher.generation == built["generation"]
    np.save(folded / IDS_FILE, kept)
    # a rebuild keeps the live generation's ondisk; --no-ondisk brings the lists back
    assert build_index(moved, target_recall=0.9)["ondisk"]
    assert main(["index", "build", "--bank", str(moved), "--no-ondisk"]) == 0
    live = (moved / "indexes" / "CURRENT").read_text().strip()
    assert not (moved / "indexes" / live / ONDISK_FILE).exists()
    with pytest.raises(InvalidInput, match="HNSW32.*has none"):
        build_index(moved, factory="HNSW32", ondisk=True)


def test_a_server_answers_from_lists_it_keeps_on_disk(tmp_path: Path) -> None:
    """Queries touch only the lists they probe: the mapping stays mostly out of memory."""
    world = World.make(64, latent=16, seed=51)
    x, _ = world.sample(60_000, seed=52)
    bank = make_bank(tmp_path / "bank", x)
    assert main(["index", "build", "--bank", str(bank), "--ondisk", "--metric", "l2",
                 "--factory", "IVF256,Flat", "--target-recall", "0.9"]) == 0
    manifest = json.loads((bank / "indexes" / "1" / "manifest.json").read_text())
    file_size = (bank / "indexes" / "1" / ONDISK_FILE).stat().st_size
    assert manifest["ondisk"] and file_size > x.nbytes
    # as after a restart, or for a file larger than memory: a file the build just wrote sits
    # in the page cache in large folios, which a read fault maps whole
    evict(bank / "indexes" / "1" / ONDISK_FILE)
    queries = x[:3]
    truth = exact_ids(x, queries, 10)
    with Serving("--bank", str(bank)) as server, FeatureBankClient(server.target) as client:
        for q, want in zip(queries, truth, strict=True):
            hits = client.search(vector=q, k=10).neighbors
            got = [int(h.key.split("-")[1]) for h in hits]
            assert got[0] == want[0] and len(set(got) & set(want)) >= 8
        assert server.proc is not None
        held, mapped = resident(server.proc.pid, ONDISK_FILE)
        op = client.rebuild_index(ondisk=False, wait=True, timeout=120)  # back into memory
        assert op.done and not op.error.code
        live = bank / "indexes" / str(op.index_generation)
        assert not (live / ONDISK_FILE).exists()
        assert client.search(vector=queries[0], k=10).index_generation == op.index_generation
    assert mapped >= file_size - 4096  # the whole file was mapped...
    assert held < 0.5 * file_size  # ...and only the probed lists were read in
