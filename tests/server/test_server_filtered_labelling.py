"""A filter on Suggest and Audit: over gRPC, in the Python API (in process and remote) and the
suggest/audit commands. Only the items passing it are listed; every labelled item still votes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import featurebank as fb
from featurebank.cli import main
from featurebank.server.app import ServeConfig
from featurebank.server.client import FeatureBankClient, RemoteError
from tests.server.test_server_labelling import make_bank
from tests.support.server import RunningServer, class_centers, free_port

DIM = 16
CAM1 = {"new/1", "new/3", "new/5"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    bank = make_bank(tmp_path_factory.mktemp("filtered") / "bank")
    with RunningServer(ServeConfig(bank=bank, port=free_port())) as rs:
        c = class_centers(DIM)
        items = [{"key": f"new/{i}", "vector": c[i % 3] * (1 + 0.01 * i),
                  "metadata": {"cam": i % 2}} for i in range(6)]  # fmt: skip
        items.append({"key": "new/cat-dog", "vector": 0.5 * (c[0] + c[1]),
                      "metadata": {"cam": 0}})  # fmt: skip
        with FeatureBankClient(rs.target) as w:
            w.upsert(items)
            w.set_labels({"dog/1-3": "fox", "cat/1-2": "dog"})  # two wrong labels
        yield rs, bank


def test_suggest_lists_only_items_passing_the_filter(served: tuple[RunningServer, Path]) -> None:
    rs, _ = served
    with FeatureBankClient(rs.target) as c:
        assert "new/cat-dog" in {s.key for s in c.suggest(n=100).suggestions}
        assert {s.key for s in c.suggest(n=100, filter="meta.cam == 1").suggestions} == CAM1
        assert [s.key for s in c.suggest(n=100, filter='key prefix "new/cat"').suggestions] == [
            "new/cat-dog"
        ]
        assert list(c.suggest(n=100, filter="meta.cam == 7").suggestions) == []  # none passes
    remote = fb.connect(rs.target)
    try:
        assert {s.key for s in remote.suggest(100, filter="meta.cam == 1")} == CAM1
    finally:
        remote.close()


def test_audit_lists_only_items_passing_the_filter(served: tuple[RunningServer, Path]) -> None:
    rs, bank = served
    with FeatureBankClient(rs.target) as c:
        every = {f.key for f in c.audit(n=10).findings}
        assert {"dog/1-3", "cat/1-2"} <= every
        only = c.audit(n=10, filter='label == "fox"').findings
        assert [(f.key, f.suggested) for f in only] == [("dog/1-3", "dog")]  # still judged by all
        assert all(f.key.startswith("cat/") for f in c.audit(n=10, filter='key prefix "cat/"').findings)
        assert list(c.audit(n=10, filter='split == "test"').findings) == []
    with fb.open(bank) as local:  # in process, the same answer
        assert [f.key for f in local.audit(10, filter='label == "fox"')] == ["dog/1-3"]


@pytest.mark.parametrize("call", ["suggest", "audit"])
def test_a_malformed_filter_is_invalid_argument_naming_the_position(
    served: tuple[RunningServer, Path], call: str
) -> None:
    rs, _ = served
    with FeatureBankClient(rs.target) as c, pytest.raises(RemoteError, match="position 11") as e:
        getattr(c, call)(n=5, filter="meta.cam <")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_suggest_and_audit_commands_take_a_filter(
    served: tuple[RunningServer, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, bank = served
    assert main(["suggest", "--bank", str(bank), "--filter", "meta.cam == 1"]) == 0
    out = capsys.readouterr().out
    assert {line.split()[1] for line in out.strip().splitlines()[1:]} == CAM1
    assert main(["audit", "--bank", str(bank), "--mode", "knn", "--filter", 'label == "fox"']) == 0
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.strip().splitlines()] == ["dog/1-3"]  # no header
    assert main(["audit", "--bank", str(bank), "--filter", "label =="]) == 2
    err = capsys.readouterr().err
    assert "position 9" in err and "Traceback" not in err
