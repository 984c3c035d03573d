"""Upsert streams that do not end the way a client means them to: cancelled, cut off, too big.

A stream is all or nothing and committed only once the client completed it (half-close).
Every test here uses a real server, real gRPC clients (and a client process killed with
SIGKILL) and then asks the server what it stored.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from featurebank.server.app import ServeConfig
from featurebank.server.client import FeatureBankClient, RemoteError
from featurebank.v1 import featurebank_pb2 as pb
from featurebank.v1 import featurebank_pb2_grpc as pb_grpc
from tests.support.server import RunningServer, free_port, make_vector_bank

DIM = 16
KiB = 1 << 10


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    bank = make_vector_bank(tmp_path_factory.mktemp("bank") / "bank", dim=DIM, n_per_class=10)
    config = ServeConfig(
        bank=bank, port=free_port(),
        max_upsert_stream_bytes=96 * KiB, max_upsert_inflight_bytes=160 * KiB,
    )
    with RunningServer(config) as rs:
        yield rs


@pytest.fixture(scope="module")
def client(served: RunningServer) -> Iterator[FeatureBankClient]:
    with FeatureBankClient(served.target, timeout=60) as c:
        yield c


def item(key: str, pad: int = 0) -> pb.UpsertItem:
    """A vector item; `pad` bytes of uri make it as large as a test needs."""
    vec = np.random.default_rng(abs(hash(key)) % 2**32).normal(size=DIM).astype(np.float32)
    return pb.UpsertItem(key=key, vector=pb.Vector(values=vec.tolist()), label="cat",
                         uri="u" * pad)  # fmt: skip


def stored(client: FeatureBankClient, keys: list[str]) -> list[str]:
    """Which of `keys` the server has (a Search by key fails with NOT_FOUND for the others)."""
    found = []
    for key in keys:
        try:
            client.search(key=key, k=1)
            found.append(key)
        except RemoteError as e:
            assert e.code == grpc.StatusCode.NOT_FOUND, e
    return found


class HeldStream:
    """A client stream that sends `items`, then waits (without half-closing) until released."""

    def __init__(self, items: list[pb.UpsertItem]) -> None:
        self.items = items
        self.sent = threading.Event()
        self.release = threading.Event()

    def __iter__(self) -> Iterator[pb.UpsertItem]:
        yield from self.items
        self.sent.set()
        self.release.wait(30)


@pytest.mark.parametrize("delay_s", [0.0, 0.005, 0.05, 0.3])
def test_a_cancelled_stream_commits_nothing(served: RunningServer, client: FeatureBankClient,
                                            delay_s: float) -> None:
    keys = [f"cancelled/{delay_s}/{i}" for i in range(6)]
    with grpc.insecure_channel(served.target) as channel:
        stub = pb_grpc.FeatureBankStub(channel)
        for trial in range(5):
            stream = HeldStream([item(f"{k}/{trial}") for k in keys])
            call = stub.Upsert.future(iter(stream), timeout=30)
            assert stream.sent.wait(10)
            time.sleep(delay_s)  # the server has had time to read the items
            call.cancel()
            stream.release.set()
            with pytest.raises(grpc.FutureCancelledError):
                call.result()
    time.sleep(0.3)  # a commit that slipped through would be done by now
    assert stored(client, [f"{k}/{t}" for k in keys for t in range(5)]) == []


def test_a_completed_stream_commits_all_of_it(client: FeatureBankClient) -> None:
    keys = [f"complete/{i}" for i in range(6)]
    done = client.upsert(item(k) for k in keys)
    assert done.added == 6
    assert stored(client, keys) == keys


def test_a_stream_past_its_deadline_commits_nothing(client: FeatureBankClient) -> None:
    keys = [f"deadline/{i}" for i in range(6)]
    stream = HeldStream([item(k) for k in keys])
    threading.Timer(3.0, stream.release.set).start()
    with pytest.raises(RemoteError) as e:
        client.upsert(stream, timeout=0.5)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(0.3)
    assert stored(client, keys) == []


CLIENT_PROCESS = textwrap.dedent("""
    import sys, time
    import grpc
    from featurebank.v1 import featurebank_pb2 as pb
    from featurebank.v1 import featurebank_pb2_grpc as pb_grpc

    def items():
        for i in range(6):
            yield pb.UpsertItem(key=f"killed/{i}", vector=pb.Vector(values=[0.1] * 16))
        print("sent", flush=True)
        time.sleep(600)

    channel = grpc.insecure_channel(sys.argv[1])
    pb_grpc.FeatureBankStub(channel).Upsert(items(), timeout=600)
""")


def test_a_client_killed_mid_stream_commits_nothing(served: RunningServer,
                                                    client: FeatureBankClient) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", CLIENT_PROCESS, served.target],
                            stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "sent"
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.5)
    assert stored(client, [f"killed/{i}" for i in range(6)]) == []
    assert client.health() == "SERVING"


def test_a_stream_over_its_byte_bound_is_refused_whole(client: FeatureBankClient) -> None:
    keys = [f"big/{i}" for i in range(20)]  # 20 x 8 KiB > 96 KiB
    with pytest.raises(RemoteError) as e:
        client.upsert(item(k, pad=8 * KiB) for k in keys)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert re.match(r"Upsert stream exceeds 98304 bytes at item 1\d:", e.value.details)
    assert "send smaller streams" in e.value.details
    assert stored(client, keys) == []  # all or nothing: not even the first items


def test_streams_together_over_the_server_bound_are_refused(served: RunningServer,
                                                            client: FeatureBankClient) -> None:
    first = [f"held/{i}" for i in range(10)]  # 10 x 8 KiB = 80 KiB, held open
    second = [f"late/{i}" for i in range(11)]  # 88 KiB more would pass 160 KiB in all
    held = HeldStream([item(k, pad=8 * KiB) for k in first])
    result: dict[str, object] = {}

    def run_first() -> None:
        try:
            result["first"] = client.upsert(held)
        except RemoteError as e:  # pragma: no cover - reported by the assert below
            result["first"] = e

    t = threading.Thread(target=run_first)
    t.start()
    try:
        assert held.sent.wait(10)
        time.sleep(0.2)  # the server has read the first stream
        with pytest.raises(RemoteError) as e:
            client.upsert(item(k, pad=8 * KiB) for k in second)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Upsert streams in flight" in e.value.details and "retry" in e.value.details
    finally:
        held.release.set()
        t.join(30)
    response = result["first"]
    assert isinstance(response, pb.UpsertResponse) and response.added == 10
    assert stored(client, second) == []
    # What the streams held is given back: two more streams of 80 KiB pass one after another.
    for n in range(2):
        assert client.upsert(item(f"again/{n}/{i}", pad=8 * KiB) for i in range(10)).added == 10


def test_budget_is_given_back_after_refusals(client: FeatureBankClient) -> None:
    for n in range(3):
        with pytest.raises(RemoteError):
            client.upsert(item(f"refused/{n}/{i}", pad=8 * KiB) for i in range(20))
        with pytest.raises(RemoteError):  # a bad item also ends the stream: bytes given back
            client.upsert([item(f"bad/{n}/0", pad=8 * KiB), pb.UpsertItem(key="")])
    assert client.upsert(item(f"after/{i}", pad=8 * KiB) for i in range(11)).added == 11


def test_stream_budget_options_are_checked(tmp_path: Path) -> None:
    from featurebank.core.errors import InvalidInput

    bank = tmp_path / "bank"
    with pytest.raises(InvalidInput, match="exceeds the server-wide"):
        ServeConfig(bank=bank, max_upsert_stream_bytes=2 << 20,
                    max_upsert_inflight_bytes=1 << 20).check()  # fmt: skip
    with pytest.raises(InvalidInput, match="must be positive"):
        ServeConfig(bank=bank, max_upsert_stream_bytes=0).check()
