"""Replicas on other hosts: a replica with only the primary's address and its own folder.

Real servers on loopback ports, real LMDB folders that share nothing: the replica copies
a snapshot over gRPC, follows the primary's commits, resumes after the connection drops
(mid-snapshot and mid-stream), copies a new snapshot when the primary's log no longer
reaches back to it, is refused by a primary without the right token, and answers
read-your-writes requests.
"""

from __future__ import annotations

import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from featurebank.core.errors import FailedPrecondition
from featurebank.server import (
    checksums,
    read_your_writes,
    replication,
    replication_copy,
    replication_follow,
)
from featurebank.server.app import ServeConfig
from featurebank.server.auth import Tokens
from featurebank.server.client import FeatureBankClient, RemoteError
from featurebank.server.replication_copy import STAGING, Download, PrimaryLink, bootstrap
from featurebank.store import replication as records
from tests.support.replication import same_records
from tests.support.server import RunningServer, free_port, make_certs, make_vector_bank

DIM = 8
FAR = np.full(DIM, 3.0, dtype=np.float32)  # far from every class centre


def until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"not true within {timeout:.0f}s"
        time.sleep(0.01)


def primary(bank: Path, port: int | None = None, **kw: Any) -> RunningServer:
    return RunningServer(ServeConfig(bank=bank, port=port or free_port(), **kw))


def replica(data: Path, target: str, **kw: Any) -> RunningServer:
    return RunningServer(ServeConfig(data=data, replica=True, primary=target, port=free_port(),
                                     follow_interval_s=0.05, **kw))


def top_key(c: FeatureBankClient, vector: np.ndarray) -> str:
    hits = c.search(vector=vector, k=1).neighbors
    return hits[0].key if hits else ""


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_vector_bank(tmp_path_factory.mktemp("remote") / "bank", dim=DIM, n_per_class=20)


@pytest.fixture()
def fresh_bank(tmp_path: Path) -> Path:
    return make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=20)


# ------------------------------------------------------------------- bootstrap and follow


@pytest.fixture(scope="module")
def pair(bank: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, RunningServer]]:
    with primary(bank) as p, replica(tmp_path_factory.mktemp("r") / "data", p.target) as r:
        yield p, r


def test_a_replica_copies_the_bank_then_every_kind_of_commit_and_generation(pair: Any) -> None:
    p, r = pair
    with FeatureBankClient(p.target) as pc, FeatureBankClient(r.target) as rc:
        assert rc.info().count == pc.info().count == 60
        assert rc.info().replica.bootstraps == 1
        pc.upsert([{"key": "far", "vector": FAR, "label": "cat"}])
        until(lambda: top_key(rc, FAR) == "far")
        pc.set_labels({"far": "dog"})
        pc.set_metadata({"far": {"camera": 4}})
        pc.delete(["cat/1-0"])
        gen = pc.info().store_generation
        until(lambda: rc.info().store_generation == gen)
        assert rc.search(vector=FAR, k=1, include_metadata=True).neighbors[0].label == "dog"
        assert same_records(r.server.engine.live.opened(), p.server.engine.live.opened())
        assert not pc.rebuild_index(wait=True).error.code
        published = pc.info().index.generation
        until(lambda: rc.info().index.generation == published)
        info = rc.info().replica
        assert info.primary_store_generation == gen and info.generations_behind == 0
        followers = pc.info().followers
        assert [f.applied_store_generation for f in followers] == [gen]
        assert followers[0].connected and followers[0].replica_id
        behind = p.server.metrics.registry.get_sample_value(
            "featurebank_follower_generations_behind",
            {"bank": "bank", "replica": followers[0].replica_id})
        assert behind == 0


def test_the_record_of_inputs_that_failed_to_embed_follows_too(pair: Any) -> None:
    p, r = pair
    primary_store, replica_store = p.server.engine.live.opened(), r.server.engine.live.opened()
    with FeatureBankClient(p.target) as pc, FeatureBankClient(r.target) as rc:
        primary_store.record_error("unreadable.jpg", "cannot decode")  # as an embed job does
        until(lambda: rc.info().store_generation == pc.info().store_generation)
        assert [e["key"] for e in replica_store.errors()] == ["unreadable.jpg"]
        pc.upsert([{"key": "unreadable.jpg", "vector": -FAR * 2}])  # embedded after all
        until(lambda: rc.info().store_generation == pc.info().store_generation)
        assert replica_store.errors() == primary_store.errors() == []
        assert same_records(replica_store, primary_store)


def test_kept_quality_findings_follow_to_the_replica(pair: Any) -> None:
    from featurebank.classify.quality import decisions

    p, r = pair
    mine, theirs = p.server.engine.bank, r.server.engine.bank
    assert mine.root != theirs.root
    with FeatureBankClient(p.target) as pc, FeatureBankClient(r.target) as rc:
        pc.keep_finding("outlier", ["dog/1-3"])
        until(lambda: decisions.content(theirs) == decisions.content(mine) != b"")
        pc.keep_finding("duplicate", ["cat/1-4", "fox/1-4"])
        until(lambda: decisions.content(theirs) == decisions.content(mine))
        assert {k.kind for k in decisions.load(theirs)} == {"outlier", "duplicate"}
        assert rc.quality().items == pc.quality().items


def test_a_commit_wakes_the_follow_stream_rather_than_the_next_heartbeat(
    fresh_bank: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replication, "HEARTBEAT_S", 3600.0)  # only a commit can wake the stream
    with primary(fresh_bank) as p, replica(tmp_path / "data", p.target) as r, \
            FeatureBankClient(p.target) as pc, FeatureBankClient(r.target) as rc:
        for i in range(3):
            pc.upsert([{"key": f"woken/{i}", "vector": FAR + i}])
            until(lambda i=i: top_key(rc, FAR + i) == f"woken/{i}")


def test_a_files_crc32_is_combined_from_its_chunks_crc32s() -> None:
    data = np.random.default_rng(0).bytes(3 * 4096 + 17)
    whole = 0
    for s in range(0, len(data), 4096):
        chunk = data[s : s + 4096]
        whole = checksums.crc32_combine(whole, zlib.crc32(chunk), len(chunk))
    assert whole == zlib.crc32(data)
    assert checksums.crc32_combine(whole, 0, 0) == whole


def test_a_replica_refuses_writes_and_replication_naming_its_primary(pair: Any) -> None:
    p, r = pair
    with FeatureBankClient(r.target) as rc:
        with pytest.raises(RemoteError, match=f"served by the primary only.*{p.target}"):
            rc.upsert([{"key": "x", "vector": FAR}])
        with pytest.raises(grpc.RpcError) as e:
            next(iter(rc.stub.ReplicaSnapshot(replication.pb.SnapshotRequest())))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "ReplicaSnapshot is served by the primary only" in e.value.details()


def test_read_your_writes_waits_for_the_generation_or_answers_unavailable(
    pair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(read_your_writes, "MAX_WAIT_S", 0.5)
    p, r = pair
    with FeatureBankClient(p.target) as pc, FeatureBankClient(r.target) as rc:
        written = pc.upsert([{"key": "ryw", "vector": -FAR}]).store_generation
        assert rc.search(vector=-FAR, k=1, min_store_generation=written).neighbors[0].key == "ryw"
        zigzag = np.tile(np.float32([3.0, -3.0]), DIM // 2)  # another direction than +-FAR
        second = pc.upsert([{"key": "ryw2", "vector": zigzag, "label": "dog"}]).store_generation
        answers = rc.classify_batch([zigzag], k=1, include_neighbors=True,
                                    min_store_generation=second)
        assert answers[0].neighbors[0].key == "ryw2"
        started = time.monotonic()
        with pytest.raises(RemoteError) as e:
            rc.search(vector=-FAR, k=1, min_store_generation=written + 1000, timeout=0.5)
        assert e.value.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
        assert time.monotonic() - started < 5
        with pytest.raises(RemoteError, match="min_store_generation .* not reached") as e:
            rc.search(vector=-FAR, k=1, min_store_generation=written + 1000, timeout=30)
        assert e.value.code.name == "UNAVAILABLE"


# ------------------------------------------------------------------- cuts


def cut_after(n: int) -> Callable[[int, int], None]:
    """A progress callback that drops the stream at its n-th chunk."""
    seen = [0]

    def progress(held: int, total: int) -> None:
        seen[0] += 1
        if seen[0] == n:
            raise ConnectionAbortedError("the test drops the connection")

    return progress


def same_files(copy: Path, bank: Path, header: dict[str, Any]) -> bool:
    kept = bank / replication.SNAPSHOTS / header["id"]
    return all((copy / f["path"]).read_bytes() == (kept / f["path"]).read_bytes()
               for f in header["files"])


def cut_midway(bank: Path, port: int, folder: Path) -> tuple[PrimaryLink, Download]:
    """A snapshot copy into `folder` dropped after five chunks; its primary stopped after."""
    with primary(bank, port) as p:
        link = PrimaryLink(p.target)
        first = Download(link, folder)
        with pytest.raises(ConnectionAbortedError):
            first.run(cut_after(5))
    return link, first


def test_a_snapshot_cut_midway_resumes_from_its_offset_even_across_a_primary_restart(
    fresh_bank: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replication, "CHUNK_BYTES", 4096)  # many chunks from a small bank
    port, folder = free_port(), tmp_path / "staging"
    link, first = cut_midway(fresh_bank, port, folder)
    held = first.received
    assert held > 0
    with primary(fresh_bank, port):  # restarted: the snapshot is kept on its disk
        second = Download(link, folder)
        header = second.run()
        total = sum(f["size"] for f in header["files"])
        assert header["id"] == first.header["id"]  # type: ignore[index]
        assert 0 < held < total
        assert second.resumed_at == held and second.received == total - held
        assert same_files(folder, fresh_bank, header)


def test_a_snapshot_written_before_the_primary_host_restarted_is_not_resumed(
    fresh_bank: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Snapshots are written without fsync: after a host restart their pages may be torn."""
    monkeypatch.setattr(replication, "CHUNK_BYTES", 4096)
    boot = tmp_path / "boot_id"
    boot.write_text("first boot\n")
    monkeypatch.setattr(replication, "BOOT_ID", boot)
    port, folder = free_port(), tmp_path / "staging"
    link, first = cut_midway(fresh_bank, port, folder)
    old = first.header["id"]  # type: ignore[index]
    assert (fresh_bank / replication.SNAPSHOTS / old).is_dir()
    boot.write_text("second boot\n")
    with primary(fresh_bank, port):
        second = Download(link, folder)
        header = second.run()
        assert header["id"] != old and second.resumed_at == 0
        assert second.received == sum(f["size"] for f in header["files"])
        assert same_files(folder, fresh_bank, header)
    assert not (fresh_bank / replication.SNAPSHOTS / old).exists()


def test_a_damaged_partial_file_fails_its_crc32_and_is_copied_again(
    fresh_bank: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(replication, "CHUNK_BYTES", 4096)
    folder = tmp_path / "staging"
    with primary(fresh_bank) as p:
        link = PrimaryLink(p.target)
        first = Download(link, folder)
        def cut_halfway(held: int, total: int) -> None:  # inside the largest file
            if held >= total // 2:
                raise ConnectionAbortedError("the test drops the connection")

        with pytest.raises(ConnectionAbortedError):
            first.run(cut_halfway)
        path, held = first._where()
        assert held > 0
        with (folder / path).open("r+b") as f:  # a torn write on the replica's disk
            f.seek(held // 2)
            byte = f.read(1)
            f.seek(held // 2)
            f.write(bytes([byte[0] ^ 0xFF]))
        header = Download(link, folder).run()
        assert same_files(folder, fresh_bank, header)
    assert f"{path} copied from the primary fails its crc32: copying it again" in caplog.text


def test_a_follow_stream_cut_resumes_from_the_applied_generation_without_a_new_snapshot(
    fresh_bank: Path, tmp_path: Path
) -> None:
    port = free_port()
    p = primary(fresh_bank, port)
    with replica(tmp_path / "data", p.target) as r, FeatureBankClient(r.target) as rc:
        p.stop()  # the connection drops mid-stream
        with primary(fresh_bank, port) as p2, FeatureBankClient(p2.target) as pc:
            for i in range(5):
                pc.upsert([{"key": f"after-cut/{i}", "vector": FAR + i}])
            gen = pc.info().store_generation
            until(lambda: rc.info().store_generation == gen)
            assert rc.info().replica.bootstraps == 1
            assert same_records(r.server.engine.live.opened(), p2.server.engine.live.opened())
    # a restart of the replica resumes too
    with primary(fresh_bank, port) as p3, FeatureBankClient(p3.target) as pc:
        pc.upsert([{"key": "while-down", "vector": FAR * 2}])
        with replica(tmp_path / "data", p3.target) as r2, FeatureBankClient(r2.target) as rc:
            until(lambda: rc.info().store_generation == pc.info().store_generation)
            assert rc.info().replica.bootstraps == 1


def test_a_snapshot_from_a_primary_that_never_answers_is_copied_once_one_does(
    fresh_bank: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(replication_copy, "SNAPSHOT_SILENT_S", 1.0)
    port = free_port()
    dead = socket.create_server(("127.0.0.1", port))  # accepts connections, says nothing
    headers: list[dict[str, Any]] = []
    download = Download(PrimaryLink(f"127.0.0.1:{port}"), tmp_path / "staging")
    copying = threading.Thread(target=lambda: headers.append(download.run()), daemon=True)
    copying.start()
    until(lambda: "silent for 1 s: reconnecting" in caplog.text)
    dead.close()
    with primary(fresh_bank, port):
        copying.join(30)
        assert headers and same_files(tmp_path / "staging", fresh_bank, headers[0])


def test_a_primary_that_accepts_and_never_answers_is_left_for_one_that_does(
    fresh_bank: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(replication, "HEARTBEAT_S", 0.2)  # silent for 1 s counts as cut
    port = free_port()
    p = primary(fresh_bank, port)
    with replica(tmp_path / "data", p.target) as r, FeatureBankClient(r.target) as rc:
        p.stop()
        dead = socket.create_server(("127.0.0.1", port))  # accepts connections, says nothing
        held = []
        accepting = threading.Thread(target=lambda: held.append(dead.accept()), daemon=True)
        accepting.start()
        accepting.join(20)
        assert held, "the replica never reconnected"
        until(lambda: "silent for 1 s: reconnecting" in caplog.text)
        dead.close()
        held[0][0].close()
        with primary(fresh_bank, port) as p2, FeatureBankClient(p2.target) as pc:
            pc.upsert([{"key": "after-silence", "vector": FAR}])
            gen = pc.info().store_generation
            until(lambda: rc.info().store_generation == gen)
            assert rc.info().replica.bootstraps == 1


# ------------------------------------------------------------------- retention


def test_a_replica_behind_the_retained_log_copies_a_new_snapshot_saying_so(
    fresh_bank: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(replication, "TRIM_EVERY_S", 0.05)
    monkeypatch.setattr(replication_follow, "TRIM_EVERY_S", 0.05)
    monkeypatch.setattr(replication, "HEARTBEAT_S", 0.05)
    with primary(fresh_bank, log_retention=3) as p, FeatureBankClient(p.target) as pc:
        with replica(tmp_path / "a", p.target):
            pass  # bootstrapped, then gone: it still holds the log, but only within the bound
        behind = pc.info().store_generation
        for i in range(10):
            pc.upsert([{"key": f"new/{i}", "vector": FAR + i}])
        for _ in range(2):  # the primary's own indexes no longer need the old log either
            assert not pc.rebuild_index(wait=True).error.code
        with replica(tmp_path / "b", p.target):  # another replica follows: the log is trimmed
            st = p.server.engine.live.opened()
            until(lambda: records.log_start(st) > behind)
            assert records.log_start(st) >= st.generation - 3
        with replica(tmp_path / "a", p.target) as r, FeatureBankClient(r.target) as rc:
            until(lambda: rc.info().replica.bootstraps == 2)
            until(lambda: rc.info().store_generation == pc.info().store_generation)
            assert top_key(rc, FAR + 9) == "new/9"
            local = r.server.engine.live.opened()
            copied_start = records.log_start(local)  # the snapshot's copy of the primary's log
            for i in range(2):  # newer indexes: the replica's own log is trimmed to them
                pc.upsert([{"key": f"after/{i}", "vector": -FAR - i}])
                assert not pc.rebuild_index(wait=True).error.code
            pc.upsert([{"key": "after/2", "vector": -FAR - 2}])
            until(lambda: records.log_start(local) == replication.published_need(local.bank)
                  > copied_start)
        assert "bootstrapping again" in caplog.text and "too far behind" in caplog.text


# ------------------------------------------------------------------- dropping a followed bank


def test_a_bank_followed_from_other_hosts_is_dropped_only_with_force_and_leaves_no_series(
    tmp_path: Path,
) -> None:
    make_vector_bank(tmp_path / "banks" / "kept", dim=DIM, n_per_class=5)
    make_vector_bank(tmp_path / "banks" / "gone", dim=DIM, n_per_class=5)
    with RunningServer(ServeConfig(banks_dir=tmp_path / "banks", port=free_port())) as p, \
            replica(tmp_path / "data", p.target, primary_bank="gone") as r, \
            FeatureBankClient(p.target, timeout=10) as pc, FeatureBankClient(r.target) as rc:
        assert rc.info().count == 15

        def series() -> list[dict[str, str]]:
            return [s.labels for m in p.server.metrics.registry.collect()
                    if m.name == "featurebank_follower_generations_behind" for s in m.samples]

        until(lambda: [s["bank"] for s in series()] == ["gone"])
        with pytest.raises(RemoteError, match="followed by replicas on other hosts") as e:
            pc.drop_bank("gone")
        assert e.value.code.name == "FAILED_PRECONDITION"
        pc.drop_bank("gone", force=True)  # its stream ends: the drop does not wait for it
        assert not (tmp_path / "banks" / "gone").exists()
        assert series() == []
        assert rc.info().count == 15  # the replica keeps serving its copy


# ------------------------------------------------------------------- auth


def test_only_the_write_or_replicate_role_may_copy_and_follow(fresh_bank: Path, tmp_path: Path) -> None:
    tokens = Tokens({"read": ["r-token"], "write": ["w-token"], "replicate": ["rep-token"]})
    with primary(fresh_bank, tokens=tokens) as p:
        for token in (None, "r-token"):
            with pytest.raises(FailedPrecondition, match="refused the snapshot: .*(token|grants read)"):
                bootstrap(PrimaryLink(p.target, token=token), tmp_path / "denied")
        assert not (tmp_path / "denied" / STAGING / "store").exists()
        with replica(tmp_path / "ok", p.target, primary_token="rep-token") as r, \
                FeatureBankClient(r.target) as rc:
            assert rc.info().count == 60
        bootstrap(PrimaryLink(p.target, token="w-token"), tmp_path / "by-writer")
        with FeatureBankClient(p.target, token="rep-token") as c, \
                pytest.raises(RemoteError, match="needs a read or write token; this token only grants replicate"):
            c.info()


def test_a_replica_reaches_a_primary_over_tls(fresh_bank: Path, tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    with RunningServer(ServeConfig(bank=fresh_bank, port=free_port(), tls_cert=certs["server_cert"],
                                   tls_key=certs["server_key"])) as p, \
            replica(tmp_path / "data", f"localhost:{p.server.port}",
                    primary_tls_ca=certs["ca"]) as r, FeatureBankClient(r.target) as rc:
        assert rc.info().count == 60
        with FeatureBankClient(p.target, tls_ca=certs["ca"]) as pc:
            pc.upsert([{"key": "over-tls", "vector": FAR}])
        until(lambda: top_key(rc, FAR) == "over-tls")


def test_data_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="add --replica --primary"):
        ServeConfig(data=tmp_path).check()
    with pytest.raises(Exception, match="--primary-tls-ca .* does not exist"):
        ServeConfig(data=tmp_path, replica=True, primary="h:1", primary_tls_ca=tmp_path / "no.pem").check()
    (tmp_path / "junk").write_text("x")
    with pytest.raises(FailedPrecondition, match="not empty and holds no replica"):
        bootstrap(PrimaryLink("127.0.0.1:1"), tmp_path)
