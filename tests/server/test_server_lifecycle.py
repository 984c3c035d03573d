"""Health transitions, limits, SIGTERM of a real `featurebank serve`, rebuild swaps under load."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from featurebank.server.app import ServeConfig
from featurebank.server.client import FeatureBankClient, RemoteError
from featurebank.v1 import featurebank_pb2 as pb
from tests.support.server import CLASSES, RunningServer, class_centers, free_port, make_vector_bank

DIM = 8
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthWatch:
    """A Health.Watch stream whose updates land in a queue."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        stub = health_pb2_grpc.HealthStub(self.channel)
        self.updates: queue.Queue[int] = queue.Queue()
        self.call = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.updates.put(response.status)
        except grpc.RpcError:
            pass

    def wait_for(self, status: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"health never became {status}"
            if self.updates.get(timeout=left) == status:
                return

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


class HeldUpsert:
    """An Upsert whose request stream stays open until `release()`: an in-flight call."""

    def __init__(
        self, client: FeatureBankClient, key: str, started: Callable[[], bool],
        timeout: float = 60,
    ) -> None:
        self._go = threading.Event()
        self.result: queue.Queue[object] = queue.Queue()
        self._sent = threading.Event()

        def items() -> Iterator[pb.UpsertItem]:
            yield pb.UpsertItem(key=key, vector=pb.Vector(values=[0.5] * DIM), label="cat")
            self._sent.set()
            self._go.wait(timeout)

        def run() -> None:
            try:
                self.result.put(client._call(client.stub.Upsert, items(), timeout))
            except BaseException as e:  # noqa: BLE001
                self.result.put(e)

        threading.Thread(target=run, daemon=True).start()
        assert self._sent.wait(30)
        deadline = time.monotonic() + 30
        while not started():  # until the server is handling it, not merely sent
            assert time.monotonic() < deadline, "the server never started the Upsert"
            time.sleep(0.02)

    def release(self) -> object:
        self._go.set()
        return self.result.get(timeout=60)


def upsert_in_flight(rs: RunningServer) -> Callable[[], bool]:
    assert rs.server.engine is not None
    gauge = rs.server.engine.metrics.in_flight_of("Upsert")
    return lambda: gauge._value.get() >= 1  # type: ignore[attr-defined, no-any-return]


def upsert_in_flight_http(metrics_port: int) -> Callable[[], bool]:
    def check() -> bool:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        return re.search(r'featurebank_requests_in_flight\{bank="[^"]+",method="Upsert"\} 1\.0', text) is not None

    return check


def test_health_follows_index_and_shutdown(tmp_path: Path) -> None:
    bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=10, index=False)
    rs = RunningServer(ServeConfig(bank=bank, port=free_port()))
    watch = HealthWatch(rs.target)
    try:
        with FeatureBankClient(rs.target, timeout=60) as client:
            watch.wait_for(NOT_SERVING)
            assert client.health() == "NOT_SERVING"
            with pytest.raises(RemoteError) as info:
                client.classify(vector=np.ones(DIM))
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "index" in info.value.details
            op = client.rebuild_index(wait=True, poll_s=0.05, timeout=120)
            assert op.done and not op.error.code, op.error.message
            watch.wait_for(SERVING)
            assert client.health() == "SERVING"
            assert client.classify(vector=class_centers(DIM)[1]).labels[0].label == CLASSES[1]
            held = HeldUpsert(client, "inflight/1", upsert_in_flight(rs))
            stopper = threading.Thread(target=rs.stop, kwargs={"grace": 30})
            stopper.start()
            watch.wait_for(NOT_SERVING)  # drains first ...
            watch.close()  # (a Watch stream would hold shutdown for the whole grace period)
            result = held.release()  # ... while the in-flight call still completes
            assert isinstance(result, pb.UpsertResponse), result
            stopper.join(60)
    finally:
        watch.close()
    from featurebank import store as store_mod

    with store_mod.open(bank) as st:  # closed cleanly: writable again, upsert committed
        st.acquire_writer()
        assert st.has("inflight/1")


def test_max_concurrent_rpcs_gives_resource_exhausted(tmp_path: Path) -> None:
    bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=5, index=False)
    config = ServeConfig(bank=bank, port=free_port(), max_concurrent_rpcs=1)
    with RunningServer(config) as rs, FeatureBankClient(rs.target, timeout=30) as client:
        held = HeldUpsert(client, "held/1", upsert_in_flight(rs))
        with pytest.raises(RemoteError) as info:
            client.info()
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert isinstance(held.release(), pb.UpsertResponse)
        assert client.info().count == 16


def test_rebuild_swaps_under_concurrent_classify_load(tmp_path: Path) -> None:
    bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=30)
    centers = class_centers(DIM)
    failures: list[BaseException] = []
    wrong: list[str] = []
    generations: set[int] = set()
    stop = threading.Event()
    calls = [0]

    with RunningServer(ServeConfig(bank=bank, port=free_port())) as rs:

        def load(i: int) -> None:
            with FeatureBankClient(rs.target, timeout=60) as c:
                while not stop.is_set():
                    try:
                        r = c.classify(vector=centers[i % 3], mode="knn", k=5)
                    except BaseException as e:  # noqa: BLE001
                        failures.append(e)
                        continue
                    calls[0] += 1
                    generations.add(r.index_generation)
                    if r.labels[0].label != CLASSES[i % 3]:
                        wrong.append(r.labels[0].label)

        threads = [threading.Thread(target=load, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        with FeatureBankClient(rs.target, timeout=60) as admin:
            first = admin.info().index.generation
            for factory in ("Flat", "auto"):
                op = admin.rebuild_index(factory=factory, wait=True, poll_s=0.05, timeout=120)
                assert not op.error.code, op.error.message
            last = admin.info().index.generation
            while calls[0] < 200 or max(generations) < last:
                time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(60)
    assert not failures, failures[:3]
    assert not wrong
    assert last >= first + 2 and {first, last} <= generations


def _serve_cmd(bank: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "featurebank", "serve", "--bank", str(bank), "--port", str(port),
            *extra]


def test_sigterm_drains_in_flight_calls_and_closes_the_store(tmp_path: Path) -> None:
    bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=10)
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    root = Path(__file__).resolve().parents[2]
    cmd = _serve_cmd(bank, port, "--grace", "30", "--metrics-port", str(metrics_port))
    proc = subprocess.Popen(cmd, cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        target = f"127.0.0.1:{port}"
        with FeatureBankClient(target, timeout=30) as client:
            client.wait_until_serving(timeout=120)
            assert client.classify(vector=class_centers(DIM)[0]).labels[0].label == CLASSES[0]
            watch = HealthWatch(target)
            watch.wait_for(SERVING)
            held = HeldUpsert(client, "sigterm/1", upsert_in_flight_http(metrics_port))
            proc.send_signal(signal.SIGTERM)
            watch.wait_for(NOT_SERVING)
            watch.close()
            result = held.release()
            assert isinstance(result, pb.UpsertResponse), result
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert f"127.0.0.1:{port}" in out and "stopped" in err
    assert "images: no model: the bank holds vectors made elsewhere" in out  # the device report
    from featurebank import store as store_mod

    with store_mod.open(bank) as st:
        st.acquire_writer()
        assert st.has("sigterm/1")


def test_serve_refuses_public_address_without_protection(tmp_path: Path) -> None:
    bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=2, index=False)
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run(_serve_cmd(bank, free_port(), "--host", "0.0.0.0"), cwd=root,
                       capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items()
                            if not k.startswith("FEATUREBANK_")})
    assert r.returncode == 2
    assert "refusing to listen on 0.0.0.0 without TLS or tokens" in r.stderr


def test_server_is_the_single_writer(tmp_path: Path) -> None:
    from featurebank.core.errors import WriterBusy

    bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=5, index=False)
    code = ("import sys; from featurebank import store; s = store.open(sys.argv[1]); "
            "s.acquire_writer(); print('writer', flush=True); sys.stdin.read()")
    root = Path(__file__).resolve().parents[2]
    holder = subprocess.Popen([sys.executable, "-c", code, str(bank)], cwd=root,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "writer"
        with pytest.raises(WriterBusy):
            RunningServer(ServeConfig(bank=bank, port=free_port()))
    finally:
        holder.communicate("", timeout=30)
    with RunningServer(ServeConfig(bank=bank, port=free_port())), pytest.raises(WriterBusy):
        other = subprocess.run([sys.executable, "-c", code.replace("sys.stdin.read()", ""),
                                str(bank)], cwd=root, capture_output=True, text=True, timeout=60)
        if "WriterBusy" in other.stderr:
            raise WriterBusy(other.stderr)


def test_first_upsert_into_an_empty_bank_builds_the_index(tmp_path: Path) -> None:
    from featurebank import store as store_mod
    from featurebank.core.spec import Spec

    spec = Spec(backbone="external", weights="external", input_size=None, resize="none", dim=DIM)
    store_mod.create(tmp_path / "bank", spec).close()
    with RunningServer(ServeConfig(bank=tmp_path / "bank", port=free_port())) as rs, \
            FeatureBankClient(rs.target, timeout=60) as client:
        assert client.health() == "NOT_SERVING"
        centers = class_centers(DIM)
        r = client.upsert([{"key": f"k{i}", "vector": centers[i], "label": CLASSES[i]}
                           for i in range(3)])
        assert r.added == 3 and r.index_generation == 1
        client.wait_until_serving(timeout=30)  # health follows on the server's loop
        assert client.classify(vector=centers[2], k=1).labels[0].label == CLASSES[2]
