"""Suggest, Audit, GetThumbnails and GetReport on a real server; suggest and audit commands."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.classify.report import latest_report
from featurebank.cli import main
from featurebank.server.app import ServeConfig
from featurebank.server.auth import Tokens
from featurebank.server.client import FeatureBankClient, RemoteError
from tests.support.server import RunningServer, class_centers, clustered, free_port
from tests.support.specs import make_spec

DIM = 16


def make_bank(root: Path) -> Path:
    """Three overlapping-enough clusters that the tuned vote is not all-or-nothing."""
    from featurebank.classify.head_training import train_head
    from featurebank.index.build import build_index

    keys, vectors, labels = clustered(20, DIM, noise=0.15)
    splits = ["val" if i % 5 == 0 else "train" for i in range(len(keys))]
    with store_mod.create(root, make_spec(DIM)) as st:
        st.put_batch(keys, vectors, labels=labels, splits=splits)
    build_index(root)
    train_head(root, epochs=30)
    return root


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    bank = make_bank(tmp_path_factory.mktemp("labelling") / "bank")
    tokens = Tokens({"read": ["r0"], "write": ["w0"]})
    with RunningServer(ServeConfig(bank=bank, port=free_port(), tokens=tokens)) as rs:
        c = class_centers(DIM)
        rng = np.random.default_rng(5)
        items = [{"key": f"new/{i}", "vector": c[i % 3] + 0.05 * rng.normal(size=DIM)}
                 for i in range(6)]
        items.append({"key": "new/cat-dog", "vector": 0.5 * (c[0] + c[1])})
        with FeatureBankClient(rs.target, token="w0") as w:
            w.upsert(items)
            w.set_labels({"dog/1-3": "fox"})  # a wrong label, through the single writer
        yield rs, bank


def test_suggest_over_grpc_ranks_the_item_between_classes_first(
    served: tuple[RunningServer, Path],
) -> None:
    rs, _ = served
    with FeatureBankClient(rs.target, token="r0") as c:
        r = c.suggest(n=3)
        assert r.suggestions[0].key == "new/cat-dog"
        assert {x.label for x in r.suggestions[0].labels[:2]} == {"cat", "dog"}
        assert len(r.suggestions) == 3 and r.labels_generation > 0
        everyone = c.suggest(n=100, strategy="diverse")
        assert sorted(s.key for s in everyone.suggestions) == sorted(
            [f"new/{i}" for i in range(6)] + ["new/cat-dog"]
        )
        for bad, message in ((lambda: c.suggest(label="wolf"), "unknown label 'wolf'"),
                             (lambda: c.suggest(n=20_000), "n=20000 is out of range")):
            with pytest.raises(RemoteError, match=message) as e:
                bad()
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_audit_over_grpc_finds_the_label_set_wrong(served: tuple[RunningServer, Path]) -> None:
    rs, _ = served
    with FeatureBankClient(rs.target, token="r0") as c:
        r = c.audit(n=5)
    top = r.findings[0]
    assert (top.key, top.label, top.suggested) == ("dog/1-3", "fox", "dog")
    assert top.confidence > 0.5 and top.has_head
    assert top.neighbors and "dog/1-3" not in {n.key for n in top.neighbors}
    assert all(n.label == "dog" for n in top.neighbors)


def test_thumbnails_and_report_errors(served: tuple[RunningServer, Path]) -> None:
    rs, _ = served
    with FeatureBankClient(rs.target, token="r0") as c:
        assert c.thumbnails(["cat/1-0"]) == {}  # vectors only: no thumbnails kept
        with pytest.raises(RemoteError, match="not in this bank") as e:
            c.thumbnails(["nobody"])
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(RemoteError, match="GetThumbnails got no keys"):
            c.thumbnails([])
        with pytest.raises(RemoteError, match="run `featurebank eval` first") as e:
            c.report()
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(RemoteError) as e:  # labelling still needs the write role
            c.set_labels({"new/0": "cat"})
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_latest_report_is_the_newest_complete_one(tmp_path: Path) -> None:
    assert latest_report(tmp_path / "reports") is None
    for name, complete in (("20260101-000000", True), ("20260102-000000", True),
                           ("20260102-000000-2", True), ("20260103-000000", False)):
        d = tmp_path / "reports" / name
        d.mkdir(parents=True)
        (d / "index.html").write_text(f"<p>{name}</p>")
        if complete:  # metrics.json is written last: a report being written has none
            (d / "metrics.json").write_text(json.dumps({"n": name}))
    found = latest_report(tmp_path / "reports")
    assert found == {"name": "20260102-000000-2", "html": "<p>20260102-000000-2</p>",
                     "metrics": {"n": "20260102-000000-2"}}


def test_suggest_and_audit_commands(
    served: tuple[RunningServer, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, bank = served  # read-only beside the running server
    out_csv = tmp_path / "suggest.csv"
    assert main(["suggest", "--bank", str(bank), "--n", "2", "--strategy", "entropy",
                 "--out", str(out_csv)]) == 0
    rows = list(csv.reader(out_csv.open()))
    assert rows[0] == ["key", "score", "guesses"] and rows[1][0] == "new/cat-dog"
    assert len(rows) == 3
    assert main(["audit", "--bank", str(bank), "--n", "1", "--mode", "knn"]) == 0
    out, err = capsys.readouterr()
    assert out.split()[1:4] == ["dog/1-3", "fox", "->"] and "1 labels the bank" in err
    assert main(["suggest", "--bank", str(bank), "--class", "wolf"]) == 2
    assert "unknown label 'wolf'" in capsys.readouterr().err


def test_page_api_forwards_to_the_server_and_reports_its_errors(
    served: tuple[RunningServer, Path],
) -> None:
    from featurebank.server.ui import create_app

    rs, bank = served
    with FeatureBankClient(rs.target, token="w0") as c:
        web = create_app(c).test_client()
        info = web.get("/api/info").get_json()
        assert info["labels"] == ["cat", "dog", "fox"] and info["count"] == 67
        assert web.get("/").status_code == 200 and b"page.js" in web.get("/").data
        assert web.get("/static/page.js").mimetype == "text/javascript"
        assert web.get("/static/secret.py").status_code == 404
        r = web.post("/api/search", data={"key": "cat/1-0"})
        assert r.status_code == 200
        assert [n["label"] for n in r.get_json()["neighbors"] if n["label"]][0] == "cat"
        assert "cat/1-0" not in {n["key"] for n in r.get_json()["neighbors"]}
        cases = [
            (web.post("/api/search", data={}), 400, "give an image file or a key"),
            (web.post("/api/labels", data={"labels": "x"}), 400, "send a JSON body"),
            (web.post("/api/labels", json={"labels": {"nobody": "cat"}}), 404, "unknown key"),
            (web.get("/api/suggest?n=lots"), 400, "n must be a whole number"),
            (web.get("/api/suggest?strategy=random"), 400, "unknown strategy"),
            (web.get("/api/thumb?key=nobody"), 404, "not in this bank"),
            (web.get("/api/operation/nope"), 404, "no operation"),
            (web.get("/report"), 404, "run `featurebank eval` first"),
            (web.get("/api/info?bank=elsewhere"), 404, "elsewhere"),  # a bank the server lacks
        ]
        listed = web.get("/api/banks").get_json()
        assert listed["default"] == bank.name and [b["name"] for b in listed["banks"]] == [bank.name]
        assert web.get(f"/api/info?bank={bank.name}").get_json()["count"] == 67
        for response, status, message in cases:
            assert response.status_code == status, (message, response.data)
            assert message in response.get_data(as_text=True)
        assert web.get("/api/thumb?key=cat/1-0").status_code == 404  # none kept
        r = web.post("/api/labels", json={"labels": {"new/0": "cat", "new/1": None}})
        assert r.status_code == 200 and r.get_json()["updated"] == 1  # new/1 had none already
        with store_mod.open(bank, readonly=True) as st:
            assert st.get_by_keys(["new/0"]).labels == ["cat"]
        with FeatureBankClient(rs.target, token="r0") as reader:
            denied = create_app(reader).test_client().post(
                "/api/labels", json={"labels": {"new/0": "dog"}}
            )
        assert denied.status_code == 403
        c.set_labels({"new/0": None})  # leave the fixture's bank as it was
