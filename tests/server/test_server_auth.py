"""Bearer-token roles for every RPC, TLS and mutual TLS, with certificates made here."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from featurebank.server.app import ServeConfig
from featurebank.server.auth import Tokens
from featurebank.server.client import FeatureBankClient, RemoteError
from tests.support.server import RunningServer, free_port, make_certs, make_vector_bank

DIM = 8
READ_TOKEN = "read-7f3a9c"
WRITE_TOKEN = "write-91be04"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("auth")
    bank = make_vector_bank(root / "bank", dim=DIM, n_per_class=10)
    tokens_file = root / "tokens"
    tokens_file.write_text(f"read {READ_TOKEN}\nwrite {WRITE_TOKEN}\n")
    config = ServeConfig(bank=bank, port=free_port(), tokens=Tokens.load(tokens_file, environ={}))
    with RunningServer(config) as rs:
        yield rs


Call = Callable[[FeatureBankClient], object]
V = np.ones(DIM, dtype=np.float32)

READ_CALLS: dict[str, Call] = {
    "Classify": lambda c: c.classify(vector=V),
    "ClassifyBatch": lambda c: c.classify_batch([]),
    "Search": lambda c: c.search(vector=V, k=2),
    "Embed": lambda c: c.embed(b"x"),
    "GetInfo": lambda c: c.info(),
}
WRITE_CALLS: dict[str, Call] = {
    "Upsert": lambda c: c.upsert([{"key": "auth/1", "vector": V, "label": "cat"}]),
    "SetLabels": lambda c: c.set_labels({"no/such": "cat"}),
    "Delete": lambda c: c.delete(["no/such"], ignore_missing=True),
    "RebuildIndex": lambda c: c.rebuild_index(target_recall=5.0),  # refused after auth
    "GetOperation": lambda c: c.get_operation("nope"),
}
DENIED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def outcome(client: FeatureBankClient, call: Call) -> grpc.StatusCode:
    try:
        call(client)
    except RemoteError as e:
        return e.code
    return grpc.StatusCode.OK


@pytest.mark.parametrize("token", [None, "wrong-token", READ_TOKEN, WRITE_TOKEN])
def test_auth_matrix(served: RunningServer, token: str | None) -> None:
    with FeatureBankClient(served.target, token=token, timeout=30) as client:
        for name, call in {**READ_CALLS, **WRITE_CALLS}.items():
            got = outcome(client, call)
            if token in (None, "wrong-token"):
                assert got == grpc.StatusCode.UNAUTHENTICATED, name
            elif token == READ_TOKEN and name in WRITE_CALLS:
                assert got == grpc.StatusCode.PERMISSION_DENIED, name
            else:
                assert got not in DENIED, (name, got)
        assert client.health() == "SERVING"  # health needs no token


def test_denials_say_what_is_missing(served: RunningServer) -> None:
    with (
        FeatureBankClient(served.target, timeout=30) as anonymous,
        pytest.raises(RemoteError, match="missing bearer token"),
    ):
        anonymous.info()
    with (
        FeatureBankClient(served.target, token=READ_TOKEN, timeout=30) as reader,
        pytest.raises(RemoteError, match="Delete needs a write token"),
    ):
        reader.delete(["x"])
    denied = served.server.metrics.requests.labels("", "Delete", "PERMISSION_DENIED")._value.get()
    assert denied >= 1


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _tls_server(root: Path, certs: dict[str, Path], mutual: bool) -> RunningServer:
    bank = make_vector_bank(root / "bank", dim=DIM, n_per_class=5, index=False)
    return RunningServer(ServeConfig(
        bank=bank, port=free_port(), tls_cert=certs["server_cert"], tls_key=certs["server_key"],
        tls_client_ca=certs["ca"] if mutual else None,
    ))


def test_tls(tmp_path: Path, certs: dict[str, Path]) -> None:
    with _tls_server(tmp_path, certs, mutual=False) as rs:
        with FeatureBankClient(rs.target, tls_ca=certs["ca"], timeout=10) as c:
            assert c.info().count == 15
        with FeatureBankClient(rs.target, timeout=3) as plain, pytest.raises(RemoteError) as info:
            plain.info()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(tmp_path: Path, certs: dict[str, Path]) -> None:
    with _tls_server(tmp_path, certs, mutual=True) as rs:
        with FeatureBankClient(rs.target, tls_ca=certs["ca"], tls_cert=certs["client_cert"],
                               tls_key=certs["client_key"], timeout=10) as c:
            assert c.info().count == 15
            assert c.health() == "NOT_SERVING"  # no index in this bank yet
        with (
            FeatureBankClient(rs.target, tls_ca=certs["ca"], timeout=3) as no_cert,
            pytest.raises(RemoteError) as info,
        ):
            no_cert.info()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
