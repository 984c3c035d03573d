"""A real nginx in front of a primary and two replicas on other "hosts" (own folders, own
processes, loopback for the network): reads go to the replicas, writes to the primary by
method path, and a replica SIGKILLed and restarted under 32 readers costs no call beyond
the clients' retry bound, every answer coming from one generation.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from featurebank.server.client import FeatureBankClient, RemoteError, make_input
from tests.support.proxy import RETRIES, Nginx, Serving, backoff, nginx_binary, primary_methods
from tests.support.server import CLASSES, class_centers, make_vector_bank

pytestmark = pytest.mark.skipif(nginx_binary() is None,
                                reason="nginx is not installed (.ci/run installs it)")

DIM = 8
RETRIED = ("UNAVAILABLE",)


@dataclass
class Behind:
    primary: Serving
    replicas: list[Serving]
    nginx: Nginx


@pytest.fixture(scope="module")
def behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Behind]:
    root = tmp_path_factory.mktemp("proxy")
    bank = make_vector_bank(root / "bank", dim=DIM, n_per_class=20)
    started: list[Serving] = []
    try:
        started.append(Serving("--bank", str(bank)))
        primary = started[0]
        for i in range(2):
            started.append(Serving("--replica", "--primary", primary.target,
                                   "--data", str(root / f"replica{i}"), "--follow-interval", "0.05"))
        with Nginx(root / "nginx", primary.target, [r.target for r in started[1:]]) as nginx:
            yield Behind(primary, started[1:], nginx)
    finally:
        for s in started:
            s.stop()


def call(fn: object, *args: object, **kw: object) -> tuple[object, int]:
    """`fn(*args, **kw)` under the retry policy; (answer, retries used)."""
    for attempt in range(RETRIES + 1):
        try:
            return fn(*args, **kw), attempt  # type: ignore[operator]
        except RemoteError as e:
            if e.code.name not in RETRIED or attempt == RETRIES:
                raise
            time.sleep(backoff(attempt))
    raise AssertionError("unreachable")


def test_writes_go_to_the_primary_and_reads_to_the_replicas(behind: Behind) -> None:
    assert "Upsert" in primary_methods() and "FollowStore" in primary_methods()
    assert "Search" not in primary_methods()
    with FeatureBankClient(behind.nginx.target) as c:
        written = c.upsert([{"key": "through-nginx", "vector": np.full(DIM, 3.0), "label": "cat"}])
        hits = c.search(vector=np.full(DIM, 3.0), k=1, min_store_generation=written.store_generation)
        assert hits.neighbors[0].key == "through-nginx"
        info = c.info()
        assert info.replica.primary == behind.primary.target  # answered by a replica


def test_thirty_two_readers_survive_a_replica_sigkilled_and_restarted(behind: Behind) -> None:
    centers = class_centers(DIM)
    inputs = [make_input(vector=centers[i % len(CLASSES)]) for i in range(4)]
    failures: list[BaseException] = []
    mixed: list[set[int]] = []
    generations: set[int] = set()
    counts = {"calls": 0, "retries": 0}
    lock = threading.Lock()
    stop = threading.Event()

    def reader(seed: int) -> None:
        r = random.Random(seed)
        with FeatureBankClient(behind.nginx.target, timeout=30) as c:
            while not stop.is_set():
                try:
                    if r.random() < 0.5:
                        q = centers[r.randrange(len(CLASSES))]
                        answer, retries = call(c.classify, vector=q)
                        gens = {answer.index_generation}  # type: ignore[attr-defined]
                    else:
                        answers, retries = call(c.classify_batch, inputs)
                        gens = {a.index_generation for a in answers}  # type: ignore[attr-defined]
                    with lock:
                        counts["calls"] += 1
                        counts["retries"] += retries
                        generations.update(gens)
                        if len(gens) != 1:
                            mixed.append(gens)
                except BaseException as e:  # noqa: BLE001
                    with lock:
                        failures.append(e)

    def writer() -> None:  # commits and new generations while the readers read
        with FeatureBankClient(behind.nginx.target, timeout=60) as c:
            i = 0
            while not stop.wait(0.2):
                try:
                    call(c.upsert, [{"key": f"load/{i}", "vector": centers[i % len(CLASSES)],
                                     "label": CLASSES[i % len(CLASSES)]}])
                    if i % 3 == 0:
                        assert not call(c.rebuild_index, wait=True)[0].error.code  # type: ignore[attr-defined]
                except BaseException as e:  # noqa: BLE001
                    with lock:
                        failures.append(e)
                i += 1

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(32)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        victim = behind.replicas[0]
        victim.kill()
        time.sleep(0.5)
        victim.start()  # same port and folder: resumes following, back in nginx's upstream
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == [], failures[:3]
    assert mixed == []
    assert counts["calls"] > 100, counts
    assert len(generations) > 1, generations  # the primary published while they read
    assert "bootstrapping again" not in victim.output()  # it resumed, no new snapshot
