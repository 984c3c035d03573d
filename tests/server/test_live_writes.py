"""Live writes on a real server and store: searchable at once, grouped, bounded, never blocked."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.core.errors import DeadlineExceeded
from featurebank.index.checkpoint import CheckpointPolicy
from featurebank.index.searcher import Searcher
from featurebank.server.app import ServeConfig
from featurebank.server.client import FeatureBankClient, RemoteError
from featurebank.server.engine import Engine
from featurebank.server.group_commit import UpsertRow
from featurebank.server.service import RETRY_AFTER_KEY
from featurebank.v1 import featurebank_pb2 as pb
from tests.support.server import CLASSES, RunningServer, class_centers, free_port, make_vector_bank

DIM = 16
NO_CHECKPOINT = CheckpointPolicy(max_items=0, max_bytes=0, max_seconds=0)


def generations(bank: Path) -> list[str]:
    return sorted(p.name for p in (bank / "indexes").iterdir() if p.name.isdigit())


def near(center: np.ndarray, seed: int) -> np.ndarray:
    return (center + 0.01 * np.random.default_rng(seed).normal(size=DIM)).astype(np.float32)


def test_concurrent_upserts_are_searchable_at_once_then_folded(tmp_path: Path) -> None:
    bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=20)
    before = generations(bank)
    centers = class_centers(DIM)
    config = ServeConfig(bank=bank, port=free_port(), checkpoint=NO_CHECKPOINT)
    errors: list[BaseException] = []
    acked: dict[str, np.ndarray] = {}

    with RunningServer(config) as rs:
        def writer(w: int) -> None:
            try:
                with FeatureBankClient(rs.target, timeout=60) as client:
                    for call in range(8):
                        rows = {f"w{w}/{call}/{i}": near(centers[(w + i) % len(CLASSES)],
                                                         1000 * w + 10 * call + i)
                                for i in range(3)}
                        client.upsert([{"key": k, "vector": v, "label": CLASSES[w % len(CLASSES)]}
                                       for k, v in rows.items()])
                        for key, vector in rows.items():  # acknowledged => searchable now
                            hits = client.search(vector=vector, k=1).neighbors
                            assert hits[0].key == key, (key, hits[0].key)
                        acked.update(rows)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert generations(bank) == before  # no index file was written per call
        with FeatureBankClient(rs.target, timeout=60) as client:
            info = client.info()
            assert info.index.pending_items == len(acked) == 96
            assert info.count == 20 * len(CLASSES) + 96
            writes = rs.server.engine.writes.group
            assert writes.commits == 32 and writes.groups <= 32
            # replacing and deleting are searchable at once too
            key = "w0/0/0"
            moved = near(centers[2], 99_999)
            client.upsert([{"key": key, "vector": moved, "label": "moved"}])
            assert client.search(vector=moved, k=1).neighbors[0].key == key
            client.delete(["w1/0/0"])
            hits = client.search(vector=acked["w1/0/0"], k=5).neighbors
            assert "w1/0/0" not in {h.key for h in hits}
            folded = rs.server.engine.checkpoint_now()
            assert folded is not None and folded["added"] == 96 - 1  # one deleted
            info = client.info()
            assert info.index.pending_items == 0 and info.index.store_generation == info.store_generation
            assert info.index.target_reached and info.index.recall >= info.index.target_recall
            assert client.search(vector=moved, k=1).neighbors[0].key == key
    assert len(generations(bank)) >= 2


def test_setlabels_and_upsert_are_answered_while_a_rebuild_runs(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(30_000, DIM)).astype(np.float32)
    spec_bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=5)
    with store_mod.open(spec_bank) as st:
        st.put_batch([f"bulk/{i}" for i in range(len(vectors))], vectors)
    with RunningServer(ServeConfig(bank=spec_bank, port=free_port())) as rs, \
            FeatureBankClient(rs.target, timeout=60) as client:
        op = client.rebuild_index(factory="HNSW32", metric="l2", transform="none")
        answered = 0
        while not client.get_operation(op.id).done:
            client.set_labels({f"bulk/{answered}": "relabelled"})
            client.upsert([{"key": f"during/{answered}", "vector": vectors[answered] + 0.001}])
            answered += 1
            assert client.classify(vector=vectors[0]).labels  # reads go on too
        final = client.get_operation(op.id)
        assert not final.error.code, final.error.message
        assert answered >= 2  # several writes were answered while the build ran
        for i in range(answered):  # and all of them are in the swapped-in index's view
            hits = client.search(vector=vectors[i] + 0.001, k=1).neighbors
            assert hits[0].key == f"during/{i}"
        assert client.search(vector=vectors[0], k=2, labels=["relabelled"]).neighbors


def test_upsert_deadline_contract_and_back_pressure(tmp_path: Path) -> None:
    bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=5)
    config = ServeConfig(bank=bank, port=free_port(), max_queued_rows=4)
    centers = class_centers(DIM)
    with RunningServer(config) as rs, FeatureBankClient(rs.target, timeout=60) as client:
        gate = threading.Event()
        rs.server.engine.writer.submit(gate.wait)  # the writer is busy until the gate opens
        results: dict[str, object] = {}

        def call(key: str, timeout: float) -> None:
            try:
                results[key] = client.upsert([{"key": key, "vector": centers[0]}], timeout=timeout)
            except RemoteError as e:
                results[key] = e.code

        late = threading.Thread(target=call, args=("late", 0.5))
        ontime = threading.Thread(target=call, args=("ontime", 60))
        late.start()
        ontime.start()
        time.sleep(0.3)
        items = [pb.UpsertItem(key=f"over/{i}", vector=pb.Vector(values=centers[1]))
                 for i in range(4)]
        with pytest.raises(grpc.RpcError) as info:  # 2 queued + 4 > 4: refused at once
            client.stub.Upsert.with_call(iter(items), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry after about" in info.value.details()
        hint = dict(info.value.trailing_metadata() or ())[RETRY_AFTER_KEY]
        assert int(hint) >= 50
        late.join(10)
        gate.set()
        ontime.join(30)
        assert results["late"] == grpc.StatusCode.DEADLINE_EXCEEDED
        assert isinstance(results["ontime"], pb.UpsertResponse)
    with store_mod.open(bank, readonly=True) as st:
        assert st.missing(["late", "ontime", "over/0"]) == ["late", "over/0"]  # never committed


def test_a_deadline_passed_before_the_commit_starts_stores_nothing(tmp_path: Path) -> None:
    import asyncio

    bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=5)
    engine = Engine(bank, checkpoint=NO_CHECKPOINT)
    engine.open()
    try:
        row = UpsertRow("expired", class_centers(DIM)[0], None, "none", {})
        with pytest.raises(DeadlineExceeded, match="nothing was stored"):
            asyncio.run(engine.writes.upsert([row], deadline=time.monotonic() - 1))
        assert engine.store.missing(["expired"]) == ["expired"]
        done = asyncio.run(engine.writes.upsert([row], deadline=time.monotonic() + 60))
        assert done["added"] == 1
    finally:
        asyncio.run(engine.close())


def test_readers_in_other_processes_see_unindexed_items(tmp_path: Path) -> None:
    bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=10)
    centers = class_centers(DIM)
    with store_mod.open(bank) as st:  # committed, no index update at all
        st.put_batch(["fresh"], near(centers[2], 3)[None], ["fresh-label"])
        st.delete([f"{CLASSES[2]}/1-0"])
    with Searcher.load(bank) as searcher:
        result = searcher.search(near(centers[2], 3)[None], 3)
        assert result.keys[0][0] == "fresh" and result.labels[0][0] == "fresh-label"
        assert f"{CLASSES[2]}/1-0" not in result.keys[0]
        only = searcher.search(centers[2][None], 1, labels=["fresh-label"])
        assert only.keys == [["fresh"]]
        assert searcher.ntotal == 10 * len(CLASSES)


def test_a_searcher_caught_up_from_the_change_log_equals_a_fresh_one(tmp_path: Path) -> None:
    bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=30)
    centers = class_centers(DIM)
    rng = np.random.default_rng(9)
    queries = np.stack([near(centers[i % 3], 500 + i) for i in range(30)])
    with store_mod.open(bank) as st, Searcher.load(st) as live:
        steps = [
            lambda: st.put_batch([f"a/{i}" for i in range(5)], queries[:5] + 0.001,
                                 [CLASSES[0]] * 5),  # known label: appended from the log
            lambda: st.put_batch(["t/0"], queries[5:6] + 0.001, [CLASSES[1]], ["test"]),  # held out
            lambda: st.put_batch(["b/0", "b/1"], queries[7:9] + 0.001, [CLASSES[1], None]),
            lambda: st.delete([f"{CLASSES[2]}/1-{i}" for i in range(4)] + ["a/1"]),
            lambda: st.put_batch(["n/0"], queries[6:7] + 0.001, ["brand-new"]),  # new label
            lambda: st.set_labels({"a/0": CLASSES[2]}),  # relabel: full reload
            lambda: st.put_batch(["a/2"], rng.normal(size=(1, DIM)).astype(np.float32),
                                 [None], replace=True),
        ]
        for step in steps:
            step()
            live.catch_up()
            with Searcher.load(bank) as fresh:
                for voters in (False, True):
                    got = live.search(queries, 8, voters_only=voters)
                    want = fresh.search(queries, 8, voters_only=voters)
                    np.testing.assert_array_equal(got.ids, want.ids)
                    np.testing.assert_array_equal(got.label_codes, want.label_codes)
                    assert got.labels == want.labels
                assert live.ntotal == fresh.ntotal
        assert live.segment.size == 8  # unindexed: a/0, a/2 (new id), a/3, a/4, t/0, b/*, n/0
