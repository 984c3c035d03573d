"""Tokens scoped to banks, across every RPC of a real multi-bank server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from featurebank.server.app import ServeConfig
from featurebank.server.auth import Tokens
from featurebank.server.client import FeatureBankClient, RemoteError
from featurebank.v1 import featurebank_pb2 as pb
from tests.support.server import RunningServer, class_centers, free_port, make_vector_bank

TOKENS = """\
read r-small small
read r-prod prod
write w-small small
write w-all *
"""

VECTOR = pb.Input(vector=pb.Vector(values=[0.1] * 8))


def requests(bank: str) -> dict[str, Any]:
    """One request of every per-bank RPC, naming `bank`."""
    return {
        "Classify": pb.ClassifyRequest(input=VECTOR, bank=bank),
        "ClassifyBatch": pb.ClassifyBatchRequest(inputs=[VECTOR], bank=bank),
        "Search": pb.SearchRequest(input=VECTOR, bank=bank),
        "Embed": pb.EmbedRequest(image=b"x", bank=bank),
        "GetInfo": pb.GetInfoRequest(bank=bank),
        "Suggest": pb.SuggestRequest(bank=bank),
        "Audit": pb.AuditRequest(bank=bank),
        "GetThumbnails": pb.GetThumbnailsRequest(keys=["cat/1-0"], bank=bank),
        "GetReport": pb.GetReportRequest(bank=bank),
        "Upsert": iter([pb.UpsertItem(key="k", vector=VECTOR.vector, bank=bank)]),
        "SetLabels": pb.SetLabelsRequest(labels=[pb.LabelAssignment(key="cat/1-0", label="cat")],
                                         bank=bank),
        "Delete": pb.DeleteRequest(keys=["nope"], ignore_missing=True, bank=bank),
        "RebuildIndex": pb.RebuildIndexRequest(bank=bank),
        "GetOperation": pb.GetOperationRequest(id="op-1", bank=bank),
    }


WRITES = {"Upsert", "SetLabels", "Delete", "RebuildIndex", "GetOperation"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("scoped") / "banks"
    make_vector_bank(root / "small", dim=8, n_per_class=5)
    make_vector_bank(root / "wide", dim=8, n_per_class=6)
    tokens_file = root.parent / "tokens"
    tokens_file.write_text(TOKENS)
    config = ServeConfig(banks_dir=root, port=free_port(), tokens=Tokens.load(tokens_file, {}))
    with RunningServer(config) as rs:
        with FeatureBankClient(rs.target, token="w-all", timeout=30) as admin:
            admin.set_alias("prod", "small")
        yield rs


def call(rs: RunningServer, token: str, method: str, request: Any) -> grpc.StatusCode:
    with FeatureBankClient(rs.target, token=token, timeout=30) as c:
        try:
            c._call(getattr(c.stub, method), request)
        except RemoteError as e:
            assert token not in e.details
            if e.code == grpc.StatusCode.PERMISSION_DENIED:
                assert "does not reach bank '" in e.details or "needs a write token" in e.details
            return e.code
        return grpc.StatusCode.OK


def test_a_token_outside_its_banks_is_denied_on_every_rpc(served: RunningServer) -> None:
    for method in requests("wide"):
        for token in ("r-small", "w-small", "r-prod"):
            code = call(served, token, method, requests("wide")[method])  # a fresh Upsert stream
            assert code == grpc.StatusCode.PERMISSION_DENIED, (method, token, code)
    with FeatureBankClient(served.target, token="w-small", timeout=30, bank="wide") as c:
        with pytest.raises(RemoteError) as err:
            c.search(vector=class_centers(8)[0])
        assert "does not reach bank 'wide'" in err.value.details


def test_a_token_inside_its_banks_gets_past_the_scope(served: RunningServer) -> None:
    for method, request in requests("small").items():
        code = call(served, "w-small", method, request)
        assert code != grpc.StatusCode.PERMISSION_DENIED, (method, code)
        read_code = call(served, "r-small", method, requests("small")[method])
        want_denied = method in WRITES  # a read token still cannot write
        assert (read_code == grpc.StatusCode.PERMISSION_DENIED) == want_denied, (method, read_code)
    with FeatureBankClient(served.target, token="w-all", timeout=30, bank="wide") as c:
        assert c.search(vector=class_centers(8)[0], k=1).neighbors


def test_an_alias_in_scope_reaches_its_bank_and_unknown_banks_reveal_nothing(
    served: RunningServer,
) -> None:
    with FeatureBankClient(served.target, token="r-prod", timeout=30, bank="prod") as c:
        assert c.info().name == "small"
    for token in ("r-small", "r-prod"):
        assert call(served, token, "Search", requests("secret")["Search"]) == \
            grpc.StatusCode.PERMISSION_DENIED  # not NOT_FOUND listing the server's banks
    assert call(served, "w-all", "Search", requests("secret")["Search"]) == grpc.StatusCode.NOT_FOUND


def test_lifecycle_is_scoped_too(served: RunningServer) -> None:
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert call(served, "w-small", "CreateBank", pb.CreateBankRequest(
        name="other", spec=pb.Spec(dim=8))) == denied
    assert call(served, "w-small", "DropBank", pb.DropBankRequest(name="wide")) == denied
    assert call(served, "w-small", "SetAlias", pb.SetAliasRequest(alias="prod", bank="wide")) == denied
    assert call(served, "w-small", "SetAlias", pb.SetAliasRequest(alias="x", bank="small")) == denied
    assert call(served, "r-small", "CreateBank", pb.CreateBankRequest(
        name="small2", spec=pb.Spec(dim=8))) == denied  # the write role is needed first
    assert call(served, "w-all", "CreateBank", pb.CreateBankRequest(
        name="other", spec=pb.Spec(dim=8))) == grpc.StatusCode.OK
    assert call(served, "w-all", "DropBank", pb.DropBankRequest(name="other")) == grpc.StatusCode.OK


def test_getinfo_lists_only_reachable_banks_and_what_each_role_reaches(served: RunningServer) -> None:
    with FeatureBankClient(served.target, token="r-small", timeout=30) as c:
        info = c.info()
        assert [b.name for b in info.banks] == ["small"]
        assert {r.role: list(r.banks) for r in info.roles} == {"read": ["prod", "small"],
                                                                "write": ["*"]}
    with FeatureBankClient(served.target, token="w-all", timeout=30) as c:
        assert [b.name for b in c.info().banks] == ["small", "wide"]
    assert served.config.tokens is not None
    assert served.config.tokens.describe() == (
        "2 read, 2 write; read reaches prod, small; write reaches *"
    )


def test_tokens_file_scopes_are_checked(tmp_path: Path) -> None:
    from featurebank.core.errors import InvalidInput

    bad = tmp_path / "tokens"
    bad.write_text("read r1 a,,b\n")
    with pytest.raises(InvalidInput, match=r"tokens:1: empty bank name"):
        Tokens.load(bad, {})
    bad.write_text("read r1 a b\n")
    with pytest.raises(InvalidInput, match=r"tokens:1: expected 'ROLE TOKEN' or 'ROLE TOKEN BANKS'"):
        Tokens.load(bad, {})
