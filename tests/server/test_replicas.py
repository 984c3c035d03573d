"""Read replicas: a primary and replicas of one bank, as real `featurebank serve` processes.

Writes on the primary reach every replica within the freshness bound, replicas refuse
writes naming the primary, go NOT_SERVING when the bank cannot be read, and a load
through the multi-target client survives a replica killed with SIGKILL.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from featurebank.core.errors import InvalidInput
from featurebank.index.checkpoint import CheckpointPolicy
from featurebank.server.app import FeatureBankServer, ServeConfig
from featurebank.server.client import FeatureBankClient, RemoteError, make_input
from featurebank.server.targets import MultiTargetClient
from tests.support.proxy import Serving
from tests.support.server import CLASSES, RunningServer, class_centers, free_port, make_vector_bank

DIM = 8
FOLLOW_S = 0.1
ROOT = Path(__file__).resolve().parents[2]


def freshness_bound(follow_s: float = FOLLOW_S) -> float:
    """The documented bound (one follow interval plus loading what changed), with room for
    loading a small bank's label table or index on a busy 2-core machine."""
    return follow_s + 5.0


class Cluster:
    """A primary and `n` replicas of one bank."""

    def __init__(self, bank: Path, n: int) -> None:
        self.primary = Serving("--bank", str(bank))
        self.replicas: list[Serving] = []
        try:
            for _ in range(n):
                self.replicas.append(Serving(
                    "--bank", str(bank), "--replica", "--primary", self.primary.target,
                    "--follow-interval", str(FOLLOW_S),
                ))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for p in [*self.replicas, self.primary]:
            p.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    bank = make_vector_bank(tmp_path_factory.mktemp("replicas") / "bank", dim=DIM, n_per_class=20)
    c = Cluster(bank, 2)
    yield c
    c.close()


def until(check: Callable[[], bool], timeout: float) -> float:
    """Seconds until `check()` held; fails after `timeout`."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"not true within {timeout:.1f}s"
        time.sleep(0.01)
    return time.monotonic() - start


def center(name: str) -> np.ndarray:
    return class_centers(DIM)[CLASSES.index(name)]


# ------------------------------------------------------------------- following the primary


def test_upsert_and_set_labels_reach_both_replicas_within_the_bound(cluster: Cluster) -> None:
    far = np.full(DIM, 3.0, dtype=np.float32)  # far from every class centre
    with FeatureBankClient(cluster.primary.target) as primary:
        done = primary.upsert([{"key": "new/owl", "vector": far, "label": "owl"}])
        assert done.added == 1
        primary.set_labels({"cat/1-0": "lynx"})
        committed = primary.info().store_generation
    for replica in cluster.replicas:
        with FeatureBankClient(replica.target) as c:

            def sees_both(c: FeatureBankClient = c) -> bool:
                hit = c.search(vector=far, k=1).neighbors[0]
                lynx = c.search(key="cat/1-1", k=40).neighbors
                return (hit.key, hit.label) == ("new/owl", "owl") and any(
                    n.key == "cat/1-0" and n.label == "lynx" for n in lynx
                )

            until(sees_both, freshness_bound())
            assert c.classify(vector=far, k=1).labels[0].label == "owl"
            info = c.info()
            assert info.HasField("replica")
            assert info.replica.primary == cluster.primary.target
            assert info.replica.bank_store_generation >= committed
            def caught_up(c: FeatureBankClient = c) -> bool:
                return c.info().replica.generations_behind == 0

            until(caught_up, freshness_bound())
            r = c.info().replica
            assert r.healthy and not r.error and r.follow_interval_s == FOLLOW_S
            assert r.applied_store_generation == r.bank_store_generation
            assert r.seconds_behind == 0.0
    assert "read replica of" in cluster.replicas[0].output()


def test_replica_refuses_every_write_naming_the_primary(cluster: Cluster) -> None:
    replica = cluster.replicas[0]
    with FeatureBankClient(replica.target) as c:
        writes: list[tuple[str, Callable[[], object]]] = [
            ("Upsert", lambda: c.upsert([{"key": "x", "vector": np.zeros(DIM)}])),
            ("SetLabels", lambda: c.set_labels({"cat/1-0": "dog"})),
            ("Delete", lambda: c.delete(["cat/1-0"])),
            ("SetSplits", lambda: c.set_splits({"cat/1-0": "none"})),
            ("KeepFinding", lambda: c.keep_finding("outlier", ["cat/1-0"])),
            ("RebuildIndex", lambda: c.rebuild_index()),
            ("GetOperation", lambda: c.get_operation("x")),
        ]
        for name, call in writes:
            with pytest.raises(RemoteError) as err:
                call()
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION, name
            assert name in err.value.details and "read replica" in err.value.details
            assert cluster.primary.target in err.value.details
        # reads are answered, and the refused writes changed nothing
        assert c.classify(vector=center("dog")).labels[0].label == "dog"
        assert len(c.audit(n=2).findings) == 2  # the labelling reads are served as well
        with pytest.raises(RemoteError) as err:  # Embed is a read: this bank just has no model
            c.embed(b"not an image")
        assert "read replica" not in err.value.details
        assert not any(n.key == "x" for n in c.search(vector=np.zeros(DIM), k=5).neighbors)
    with FeatureBankClient(cluster.primary.target) as p:
        assert not p.info().HasField("replica")


def test_replica_options_are_checked(tmp_path: Path) -> None:
    bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=2, index=False)
    with pytest.raises(InvalidInput, match="--replica"):
        ServeConfig(bank=bank, primary="127.0.0.1:1").check()
    with pytest.raises(InvalidInput, match="--checkpoint"):
        ServeConfig(bank=bank, replica=True, checkpoint=CheckpointPolicy(max_items=5)).check()
    with pytest.raises(InvalidInput, match="--follow-interval"):
        FeatureBankServer(ServeConfig(bank=bank, replica=True, follow_interval_s=0))


def test_get_info_says_how_far_behind_a_replica_is(tmp_path: Path) -> None:
    from featurebank import store as store_mod

    bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=5)
    config = ServeConfig(bank=bank, port=free_port(), replica=True, follow_interval_s=3600)
    with RunningServer(config) as rs, FeatureBankClient(rs.target) as c:
        r = c.info().replica
        assert (r.generations_behind, r.seconds_behind) == (0, 0.0)
        with store_mod.open(bank) as st:  # the primary commits; the next poll is an hour away
            st.set_labels({"cat/1-0": "dog"})
            st.set_labels({"cat/1-1": "dog"})
        r = c.info().replica
        assert r.bank_store_generation == r.applied_store_generation + 2
        assert r.generations_behind == 2 and r.seconds_behind > 0 and r.healthy


# ------------------------------------------------------------------- health


def test_replica_goes_not_serving_while_the_bank_is_unreadable(tmp_path: Path) -> None:
    bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=5)
    moved = tmp_path / "moved"
    config = ServeConfig(bank=bank, port=free_port(), replica=True, follow_interval_s=0.05)
    with RunningServer(config) as rs, FeatureBankClient(rs.target) as c:
        c.wait_until_serving(10)
        assert c.classify(vector=center("fox")).labels[0].label == "fox"
        bank.rename(moved)  # e.g. the volume holding the bank went away
        until(lambda: c.health() == "NOT_SERVING", 10)
        behind = rs.server.metrics.replica_seconds_behind.labels(bank.name)
        until(lambda: behind._value.get() > 0, 10)  # type: ignore[attr-defined]
        for call in (lambda: c.classify(vector=center("fox")), lambda: c.search(key="fox/1-0"),
                     c.info, lambda: c.thumbnails(["fox/1-0"]), c.report):
            with pytest.raises(RemoteError) as err:
                call()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            assert "cannot read its bank" in err.value.details
        moved.rename(bank)
        until(lambda: c.health() == "SERVING", 10)
        assert c.classify(vector=center("fox")).labels[0].label == "fox"
        assert c.info().replica.healthy
        until(lambda: behind._value.get() == 0, 10)  # type: ignore[attr-defined]


def test_replica_started_before_the_first_index_serves_once_it_is_published(
    tmp_path: Path,
) -> None:
    from featurebank.index.build import build_index

    bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=5, index=False)
    config = ServeConfig(bank=bank, port=free_port(), replica=True, follow_interval_s=0.05)
    with RunningServer(config) as rs, FeatureBankClient(rs.target) as c:
        assert c.health() == "NOT_SERVING"
        with pytest.raises(RemoteError) as err:
            c.classify(vector=center("cat"))
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        build_index(bank)  # what the primary publishes
        until(lambda: c.health() == "SERVING", freshness_bound(0.05))
        assert c.classify(vector=center("cat")).labels[0].label == "cat"


# ------------------------------------------------------------------- the multi-target client


def test_multi_target_client_skips_a_dead_target_and_gives_up_when_all_are(
    tmp_path: Path,
) -> None:
    bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=5)
    dead = f"127.0.0.1:{free_port()}"
    with RunningServer(ServeConfig(bank=bank, port=free_port())) as rs:
        with MultiTargetClient([dead, rs.target], health_interval_s=0.05) as mc:
            for _ in range(6):  # round-robin would send half of these to the dead target
                assert mc.classify(vector=center("dog")).labels[0].label == "dog"
            until(lambda: mc.serving() == [rs.target], 5)
            with pytest.raises(Exception, match="no primary"):
                mc.primary  # noqa: B018
        with MultiTargetClient([dead], retry_timeout_s=0.3) as mc:
            with pytest.raises(RemoteError) as err:
                mc.classify(vector=center("dog"))
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            assert mc.retries > 0
    with pytest.raises(InvalidInput):
        MultiTargetClient([])


def test_multi_target_client_reads_only_from_serving_targets_and_writes_to_the_primary(
    tmp_path: Path,
) -> None:
    bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=5)
    empty = make_vector_bank(tmp_path / "empty", dim=DIM, n_per_class=5, index=False)
    with RunningServer(ServeConfig(bank=bank, port=free_port())) as rs, \
            RunningServer(ServeConfig(bank=empty, port=free_port())) as loading:
        with FeatureBankClient(loading.target) as c:
            assert c.health() == "NOT_SERVING"  # no index yet
        with MultiTargetClient([loading.target, rs.target], primary=rs.target,
                               health_interval_s=0.05) as mc:
            until(lambda: mc.serving() == [rs.target], 5)
            # the NOT_SERVING target would answer FAILED_PRECONDITION, which is never retried
            for _ in range(6):
                assert mc.classify(vector=center("fox")).labels[0].label == "fox"
            with pytest.raises(RemoteError) as err:  # the caller's mistake: no retry
                mc.classify(vector=np.zeros(DIM + 1))
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and mc.retries == 0
            assert mc.primary.set_labels({"fox/1-0": "cat"}).updated == 1
            assert mc.search(key="fox/1-1", k=20, labels=["cat"]).neighbors[0].key == "fox/1-0"


# ------------------------------------------------------------------- load with a SIGKILL


@dataclass
class LoadSeen:
    calls: int
    failures: list[BaseException]
    mixed: list[list[tuple[int, int]]]  # ClassifyBatch responses whose results differ in generation
    retries: int
    generations: set[int]  # index generations the answers came from


def run_load_with_replica_kill(
    cluster: Cluster, clients: int, seconds: float, kill_after: float
) -> LoadSeen:
    """Classify and ClassifyBatch through the multi-target client while the primary writes and
    one replica is SIGKILLed, then restarted; returns what the callers saw."""
    rng = np.random.default_rng(7)
    centers = class_centers(DIM)
    inputs = [make_input(vector=centers[i % len(CLASSES)]) for i in range(4)]
    failures: list[BaseException] = []
    mixed: list[list[tuple[int, int]]] = []
    generations: set[int] = set()
    calls = [0]
    lock = threading.Lock()
    stop = threading.Event()
    targets = [r.target for r in cluster.replicas]

    with MultiTargetClient(targets, retry_timeout_s=30, health_interval_s=0.1, timeout=30) as mc:

        def worker(seed: int) -> None:
            r = random.Random(seed)
            while not stop.is_set():
                try:
                    if r.random() < 0.5:
                        q = centers[r.randrange(len(CLASSES))] + 0.01 * rng.normal(size=DIM)
                        gens = {(mc.classify(vector=q).index_generation, 0)}
                    else:
                        results = mc.classify_batch(inputs)
                        gens = {(x.index_generation, x.head_generation) for x in results}
                    with lock:
                        generations.update(g for g, _ in gens)
                        if len(gens) != 1:
                            mixed.append(sorted(gens))
                except BaseException as e:  # noqa: BLE001
                    with lock:
                        failures.append(e)
                with lock:
                    calls[0] += 1

        def writer() -> None:  # commits and published generations while the load runs
            with FeatureBankClient(cluster.primary.target, timeout=60) as p:
                i = 0
                while not stop.wait(0.3):
                    label = CLASSES[i % len(CLASSES)]
                    try:
                        p.upsert([{"key": f"load/{i}", "vector": centers[i % len(CLASSES)],
                                   "label": label}])
                        p.set_labels({f"load/{i}": label})
                        if i % 2 == 0:
                            assert not p.rebuild_index(wait=True).error.code
                    except BaseException as e:  # noqa: BLE001
                        with lock:
                            failures.append(e)
                    i += 1

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(clients)]
        threads.append(threading.Thread(target=writer))
        for t in threads:
            t.start()
        victim = cluster.replicas[0]
        time.sleep(kill_after)
        victim.kill()
        time.sleep(min(1.0, seconds / 4))
        victim.start()  # same port: back in the rotation once its health says SERVING
        until(lambda: victim.target in mc.serving(), 30)
        time.sleep(max(0.0, seconds - kill_after - 1.0))
        stop.set()
        for t in threads:
            t.join(60)
        retries = mc.retries
    return LoadSeen(calls[0], failures, mixed, retries, generations)


def test_load_survives_a_replica_killed_and_restarted(cluster: Cluster) -> None:
    seen = run_load_with_replica_kill(cluster, clients=4, seconds=4.0, kill_after=1.0)
    assert seen.failures == [], seen.failures
    assert seen.mixed == []
    assert len(seen.generations) > 1, seen  # the primary published while the load ran


@pytest.mark.slow
def test_sixteen_clients_for_thirty_seconds_survive_a_replica_kill(cluster: Cluster) -> None:
    seen = run_load_with_replica_kill(cluster, clients=16, seconds=30.0, kill_after=10.0)
    assert seen.failures == [], seen.failures
    assert seen.mixed == []
    assert len(seen.generations) > 1, seen


# ------------------------------------------------------------------- one generation per call


def test_a_call_split_across_batches_is_answered_from_one_generation(tmp_path: Path) -> None:
    """A swap between the batches of one ClassifyBatch must not show in its results."""
    import asyncio

    from featurebank.index.build import build_index
    from featurebank.server.engine import Engine
    from featurebank.server.reads import ClassifyJob, ClassifyOptions

    bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=5)

    async def run() -> tuple[list[tuple[int, int | None]], int]:
        engine = Engine(bank, max_batch_size=2, search_threads=1)
        batcher = engine.reads.classify_batcher
        answer = batcher.run
        batches = 0

        def swap_after_first_batch(jobs: list[ClassifyJob]) -> list[object]:
            nonlocal batches
            out = answer(jobs)
            batches += 1
            if batches == 1:  # what a replica's follower does when the primary publishes
                build_index(bank)
                engine._load_models()
            return out  # type: ignore[return-value]

        batcher.run = swap_after_first_batch  # type: ignore[assignment]
        engine.open()
        try:
            options = ClassifyOptions(None, None, 1, False, None)
            jobs = [ClassifyJob(center(c), options) for c in (*CLASSES, "cat")]
            results = await engine.reads.classify(jobs)
            return [(r.index_generation, r.head_generation) for r in results], batches
        finally:
            await engine.close()

    generations, batches = asyncio.run(run())
    assert generations == [(2, None)] * 4  # knn: no head generation used
    assert batches == 4  # split in two, and answered again (in two) after the swap
