"""Salvaging a damaged store: what is readable is copied out, what is lost is named.

Each case damages a real LMDB data file, salvages it, and compares every recovered item
(vector, key, label, split, metadata) with what was committed, and the reported losses
with the items that are really missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.core.errors import DamagedFile, WriterBusy
from featurebank.store.pages import read_environment
from featurebank.store.salvage import describe, salvage
from featurebank.store.verify import verify
from tests.support.specs import make_spec

BATCHES, PER_BATCH, DIM = 10, 50, 16


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, store_mod.Items]:
    """A store of many small blocks written over several commits, relabelled and deleted
    from, and what it holds (built once, copied for each case)."""
    bank = tmp_path_factory.mktemp("salvage") / "bank"
    rng = np.random.default_rng(0)
    with store_mod.create(bank, make_spec(DIM), block_rows=16) as st:
        for b in range(BATCHES):
            keys = [f"k{b}/{i}" for i in range(PER_BATCH)]
            st.put_batch(keys, rng.standard_normal((PER_BATCH, DIM)).astype(np.float32),
                         labels=[f"c{i % 3}" for i in range(PER_BATCH)],
                         splits=["val" if i % 5 == 0 else "train" for i in range(PER_BATCH)],
                         meta=[{"n": i} for i in range(PER_BATCH)])  # fmt: skip
        st.set_labels({"k0/1": "c2"})
        st.delete(["k0/2"])
        held = st.to_numpy()
    return bank, held


@pytest.fixture
def bank(pristine: tuple[Path, store_mod.Items], tmp_path: Path) -> Path:
    shutil.copytree(pristine[0], tmp_path / "bank")
    return tmp_path / "bank"


def data_file(bank: Path, env: str = "env-1") -> Path:
    return bank / "store" / env / "data.mdb"


def check_recovered(bank: Path, held: store_mod.Items, report: dict) -> set[int]:
    """Every item the salvaged store holds is exactly as committed (its metadata unless the
    report says it was lost); returns the ids missing."""
    with store_mod.open(bank, readonly=True) as st:
        got = st.to_numpy()
        metas = st.item_table().meta
    where = {int(i): j for j, i in enumerate(held.ids)}
    for j, i in enumerate(got.ids):
        k = where[int(i)]  # a KeyError here: an item deleted before the damage came back
        assert np.array_equal(got.vectors[j], held.vectors[k])
        assert (got.keys[j], got.labels[j], got.splits[j]) == (held.keys[k], held.labels[k],
                                                               held.splits[k])  # fmt: skip
        if int(i) not in report["without_meta"]:
            assert metas[j]["n"] == int(held.keys[k].split("/")[1])
    return set(where) - {int(i) for i in got.ids}


def test_page_reader_reads_what_lmdb_reads(pristine: tuple[Path, store_mod.Items]) -> None:
    env, previous = read_environment(data_file(pristine[0]))
    assert env.problem is None and env.txnid == previous.txnid + 1
    lm = lmdb.open(str(data_file(pristine[0]).parent), readonly=True, lock=False, max_dbs=16)
    try:
        with lm.begin() as txn:
            for name, db in env.databases.items():
                if name:
                    handle = lm.open_db(name.encode(), txn=txn, create=False)
                    assert dict(txn.cursor(db=handle)) == db.records, name
                    assert not db.lost and db.entries == len(db.records)
    finally:
        lm.close()


def test_truncated_store_keeps_every_item_inside_the_file(
    bank: Path, pristine: tuple[Path, store_mod.Items]
) -> None:
    held = pristine[1]
    data = data_file(bank)
    size = data.stat().st_size * 2 // 3
    os.truncate(data, size)
    assert any("data.mdb is truncated" in f.message for f in verify(bank).findings)

    report = salvage(bank)
    assert report["switched"] and report["recovered"] > len(held.ids) // 2
    missing = check_recovered(bank, held, report)
    assert report["recovered"] + report["lost"] == len(held.ids)
    assert report["lost"] == len(missing) > 0
    assert set(report["lost_ids"]) <= missing and len(report["lost_ids"]) == min(20, len(missing))
    keys = {held.keys[int(np.flatnonzero(held.ids == i)[0])] for i in missing}
    assert set(report["lost_keys"]) <= keys and report["lost_keys"]
    text = "\n".join(describe(report, bank / "store"))
    assert f"could not recover {len(missing)} items" in text and report["lost_keys"][0] in text

    aside = [p for p in (bank / "store").iterdir() if p.name.startswith(".damaged-env-1-")]
    assert len(aside) == 1 and (aside[0] / "data.mdb").stat().st_size == size  # kept as found
    assert (bank / "store" / "CURRENT").read_text().strip() == "env-2"
    assert verify(bank).findings == []
    with store_mod.open(bank) as st:  # the salvaged store takes writes; the set-aside env stays
        st.put_batch(["new/0"], np.ones((1, DIM), np.float32))
        assert st.count == report["recovered"] + 1
    assert aside[0].is_dir()


def test_zeroed_page_inside_the_file_loses_nothing_it_did_not_hold(
    bank: Path, pristine: tuple[Path, store_mod.Items]
) -> None:
    """A page LMDB itself reports as corrupted: verify names the file, salvage reads around it."""
    data = data_file(bank)
    found = None
    for page in range(2, data.stat().st_size // 4096):  # the first page whose loss LMDB notices
        original = data.read_bytes()
        with data.open("r+b") as f:
            f.seek(page * 4096)
            f.write(bytes(4096))
        found = [f.message for f in verify(bank).findings]
        if found:
            break
        data.write_bytes(original)
    assert found and str(data) in found[0], found
    report = salvage(bank)
    missing = check_recovered(bank, pristine[1], report)
    assert report["lost"] == len(missing)
    assert verify(bank).findings == []


def test_random_bytes_recover_nothing_and_change_nothing(bank: Path) -> None:
    data = data_file(bank)
    data.write_bytes(np.random.default_rng(1).bytes(data.stat().st_size))
    before = data.read_bytes()
    report = salvage(bank)
    assert not report["switched"] and report["recovered"] == 0
    text = describe(report, bank / "store")[0]
    assert "nothing is recoverable" in text and "store backup" in text, text
    assert (bank / "store" / "CURRENT").read_text().strip() == "env-1"
    assert data.read_bytes() == before and not (bank / "store" / "env-2").exists()


def test_an_older_intact_environment_is_salvaged_too(
    bank: Path, pristine: tuple[Path, store_mod.Items]
) -> None:
    """A copy left beside the live environment (an interrupted compaction leaves one) still
    holds the items it had: they come back when the live one is lost entirely."""
    shutil.copytree(bank / "store" / "env-1", bank / "store" / "env-0")
    data = data_file(bank)
    data.write_bytes(bytes(data.stat().st_size))
    report = salvage(bank)
    assert report["switched"] and report["environments"][:2] == ["env-1", "env-0"]
    assert report["recovered"] == len(pristine[1].ids)
    assert check_recovered(bank, pristine[1], report) == set()


def test_salvage_waits_for_no_writer(bank: Path) -> None:
    with store_mod.open(bank) as st:
        st.acquire_writer()
        with pytest.raises(WriterBusy, match="stop it before repairing"):
            salvage(bank)


def test_a_failing_reader_changes_nothing(bank: Path) -> None:
    """The damaged file is read in a child process: whatever kills it (here a data file
    that is a folder), the parent says so in one line and leaves the store as it was."""
    data = data_file(bank)
    data.unlink()
    data.mkdir()
    with pytest.raises(DamagedFile, match="reading the damaged store .* failed .*nothing was changed"):
        salvage(bank)
    assert (bank / "store" / "CURRENT").read_text().strip() == "env-1"
    assert sorted(p.name for p in (bank / "store").iterdir()) == ["CURRENT", "env-1", "writer.lock"]
