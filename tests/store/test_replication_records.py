"""A store copied once and then kept equal by deltas: what a replica on another host applies.

The replica's store must equal the primary's record for record (ids, blocks, keys, labels,
metadata, thumbnails, counters, change log), so its searcher catches up from its own log.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.core.errors import FailedPrecondition
from featurebank.store import replication
from featurebank.store.rows import LogTrimmed
from tests.support.replication import dump
from tests.support.server import make_vector_bank

JPEG = b"\xff\xd8\xff" + b"\0" * 20


@pytest.fixture()
def pair(tmp_path: Path) -> Any:
    make_vector_bank(tmp_path / "primary", dim=8, n_per_class=20, index=False)
    primary = store_mod.open(tmp_path / "primary")
    snap = tmp_path / "snapshot"
    snap.mkdir()
    generation, epoch = replication.copy_to(primary, snap)
    shutil.copytree(snap, tmp_path / "replica" / "store")
    replica = store_mod.open(tmp_path / "replica")
    yield primary, replica, generation, epoch
    primary.close()
    replica.close()


def vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)


def test_a_copy_then_deltas_keep_the_replica_equal_record_for_record(pair: Any) -> None:
    primary, replica, generation, epoch = pair
    assert replica.generation == generation == primary.generation
    assert replication.epoch(primary) == epoch
    primary.put_batch([f"new/{i}" for i in range(300)], vectors(300), labels=["owl"] * 300,
                      thumbnails=[JPEG] * 300)
    first = replication.delta_after(primary, generation)
    replication.apply(replica, first.records, first.after, first.generation)
    assert dump(replica) == dump(primary)
    primary.set_labels({"new/1": "bat", "cat/1-0": None})
    primary.set_splits({"new/5": "test"})
    primary.delete(["new/2", "dog/1-3"])
    primary.set_meta({"new/3": {"camera": 4}})
    primary.put_batch(["new/4"], vectors(1, 1), replace=True)  # delete and re-add in one commit
    primary.put_batch(["new/2"], vectors(1, 2), labels=["bat"])  # a deleted key comes back
    second = replication.delta_after(primary, first.generation)
    assert second.generation == primary.generation == first.generation + 6
    replication.apply(replica, second.records, second.after, second.generation)
    assert dump(replica) == dump(primary)
    assert replica.changes_since(generation).added.size == primary.changes_since(generation).added.size
    assert replica.get_by_keys(["new/3"]).meta[0]["camera"] == 4
    assert replica.thumbnails(["new/0", "new/2"]) == [JPEG, None]


def test_the_errors_table_follows_through_deltas_even_for_hashed_keys(pair: Any) -> None:
    primary, replica, generation, _ = pair
    long_key = "x" * 600  # stored under a hashed key record, which may hold any byte
    for key in ("broken.jpg", "gone.jpg", long_key):
        primary.record_error(key, "cannot decode")
    first = replication.delta_after(primary, generation)
    replication.apply(replica, first.records, first.after, first.generation)
    assert sorted(e["key"] for e in replica.errors()) == ["broken.jpg", "gone.jpg", long_key]
    assert primary.clear_error("gone.jpg")
    primary.put_batch(["broken.jpg", long_key], vectors(2))  # embedded now: its error goes
    second = replication.delta_after(primary, first.generation)
    replication.apply(replica, second.records, second.after, second.generation)
    assert replica.errors() == primary.errors() == []
    assert dump(replica) == dump(primary)


def test_a_delta_applies_only_where_it_starts(pair: Any) -> None:
    primary, replica, generation, _ = pair
    primary.put_batch(["a"], vectors(1))
    primary.put_batch(["b"], vectors(1))
    late = replication.delta_after(primary, generation + 1)
    with pytest.raises(FailedPrecondition, match="cannot apply"):
        replication.apply(replica, late.records, late.after, late.generation)
    assert replica.generation == generation
    nothing = replication.delta_after(primary, primary.generation)
    assert nothing.records == [] and nothing.generation == primary.generation


def test_a_trimmed_log_refuses_older_generations_instead_of_missing_changes(pair: Any) -> None:
    primary, _, generation, _ = pair
    for i in range(4):
        primary.put_batch([f"t/{i}"], vectors(1, i))
    assert replication.trim_log(primary, generation + 2) == 3  # the first commit and two puts
    assert replication.log_start(primary) == generation + 2
    with pytest.raises(LogTrimmed, match=f"starts after generation {generation + 2}"):
        primary.changes_since(generation + 1)
    with pytest.raises(LogTrimmed):
        replication.delta_after(primary, generation)
    assert primary.changes_since(generation + 2).added.size == 2
    assert replication.trim_log(primary, generation) == 0  # never back
