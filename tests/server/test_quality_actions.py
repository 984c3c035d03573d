"""Acting on Quality findings over gRPC: SetSplits and KeepFinding on a real server and bank."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.server.app import ServeConfig
from featurebank.server.auth import Tokens
from featurebank.server.client import FeatureBankClient, RemoteError
from tests.support.server import RunningServer, clustered, free_port
from tests.support.specs import make_spec

DIM = 16
KEYS, VECTORS, LABELS = clustered(30, DIM, noise=0.15)
WRONG = KEYS[3]  # a cat labelled dog
COPY = "copy-of-7"  # a train item copied into test
FAR = "far/0"


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[RunningServer, Path]]:
    from featurebank.index.build import build_index

    bank = tmp_path / "bank"
    labels = list(LABELS)
    labels[3] = "dog"
    far = 3 * np.random.default_rng(9).normal(size=(1, DIM)).astype(np.float32)
    with store_mod.create(bank, make_spec(DIM)) as st:
        st.put_batch(KEYS, VECTORS, labels=labels, splits=["train"] * len(KEYS))
        st.put_batch([COPY, FAR], np.concatenate([VECTORS[7:8], far]), splits=["test", "none"])
    build_index(bank, factory="Flat")
    tokens = Tokens({"read": ["r0"], "write": ["w0"]})
    with RunningServer(ServeConfig(bank=bank, port=free_port(), tokens=tokens)) as rs:
        yield rs, bank


def findings(c: FeatureBankClient) -> dict[str, set[object]]:
    r = c.quality()
    return {
        "label": {f.key for f in r.label_errors},
        "leak": {(x.train, x.held_out) for x in r.leaks},
        "duplicate": {tuple(sorted(m.key for m in g.members)) for g in r.duplicates},
        "outlier": {o.key for o in r.outliers},
        "kept": {r.counts["kept"]},  # findings left out because they were kept
    }


def test_kept_findings_are_remembered_in_the_bank_and_not_listed_again(
    served: tuple[RunningServer, Path],
) -> None:
    rs, bank = served
    with FeatureBankClient(rs.target, token="w0") as c:
        before = findings(c)
        assert WRONG in before["label"] and FAR in before["outlier"]
        assert (KEYS[7], COPY) in before["leak"] and before["kept"] == {0}
        kept = c.keep_finding("label", [WRONG])
        assert (kept.kind, list(kept.keys), kept.label) == ("label", [WRONG], "dog")
        c.keep_finding("outlier", [FAR])
        kept = c.keep_finding("duplicate", [COPY, KEYS[7]])
        assert list(kept.keys) == sorted([COPY, KEYS[7]]) and kept.label == ""
        after = findings(c)
    assert WRONG not in after["label"] and FAR not in after["outlier"]
    assert not after["leak"] and tuple(sorted([COPY, KEYS[7]])) not in after["duplicate"]
    assert min(after["kept"]) >= 3  # the label, the outlier, the pair (as a group and a leak)
    rows = json.loads((bank / "quality" / "decisions.json").read_text())["kept"]
    assert {(r["kind"], tuple(r["keys"]), r.get("label")) for r in rows} == {
        ("label", (WRONG,), "dog"), ("outlier", (FAR,), None),
        ("duplicate", tuple(sorted([COPY, KEYS[7]])), None),
    }
    with FeatureBankClient(rs.target, token="w0") as c:  # a relabel makes the label finding new
        c.set_labels({WRONG: "fox"})
        assert WRONG in findings(c)["label"]


def test_moving_a_leaked_copy_out_of_test_ends_the_leak(served: tuple[RunningServer, Path]) -> None:
    rs, bank = served
    with FeatureBankClient(rs.target, token="w0") as c:
        r = c.set_splits({COPY: "none", KEYS[0]: "train"})  # the second is already there
        assert r.updated == 1
        after = findings(c)
    assert not after["leak"]
    assert tuple(sorted([COPY, KEYS[7]])) in after["duplicate"]  # still a copy, now both train-side
    with store_mod.open(bank, readonly=True) as st:
        assert st.get_by_keys([COPY, KEYS[0]]).splits == ["none", "train"]
        assert st.generation == r.store_generation


@pytest.mark.parametrize(
    ("call", "code", "message"),
    [
        (lambda c: c.set_splits({COPY: "holdout"}), grpc.StatusCode.INVALID_ARGUMENT,
         "splits[0]: split 'holdout' is not one of train, val, test, none"),
        (lambda c: c.set_splits({COPY: "none", "nope": "none"}), grpc.StatusCode.NOT_FOUND,
         "unknown key 'nope'"),
        (lambda c: c.keep_finding("leak", [COPY]), grpc.StatusCode.INVALID_ARGUMENT,
         "unknown finding kind 'leak'"),
        (lambda c: c.keep_finding("duplicate", [COPY]), grpc.StatusCode.INVALID_ARGUMENT,
         "a kept duplicate names 2 different key(s)"),
        (lambda c: c.keep_finding("outlier", ["nope"]), grpc.StatusCode.NOT_FOUND,
         "key 'nope' is not in"),
        (lambda c: c.keep_finding("label", [COPY]), grpc.StatusCode.INVALID_ARGUMENT,
         "has no label to keep"),
        (lambda c: c.keep_finding("outlier", []), grpc.StatusCode.INVALID_ARGUMENT,
         "KeepFinding got no keys"),
    ],
)
def test_bad_actions_change_nothing(
    served: tuple[RunningServer, Path], call: object, code: grpc.StatusCode, message: str
) -> None:
    rs, bank = served
    with FeatureBankClient(rs.target, token="w0") as c:
        generation = c.info().store_generation
        with pytest.raises(RemoteError) as e:
            call(c)  # type: ignore[operator]
        assert e.value.code == code and message in e.value.details, e.value.details
        assert c.info().store_generation == generation
    assert not (bank / "quality" / "decisions.json").exists()
    with store_mod.open(bank, readonly=True) as st:
        assert st.get_by_keys([COPY]).splits == ["test"]


def test_a_read_token_may_not_act(served: tuple[RunningServer, Path]) -> None:
    rs, bank = served
    with FeatureBankClient(rs.target, token="r0") as c:
        for name, call in (("SetSplits", lambda: c.set_splits({COPY: "none"})),
                           ("KeepFinding", lambda: c.keep_finding("outlier", [FAR]))):
            with pytest.raises(RemoteError) as e:
                call()
            assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert e.value.details == f"{name} needs a write token; this token only grants read"
    assert not (bank / "quality" / "decisions.json").exists()


def test_page_api_acts_on_findings_and_reports_errors(served: tuple[RunningServer, Path]) -> None:
    from featurebank.server.ui import create_app

    rs, bank = served
    with FeatureBankClient(rs.target, token="w0") as c:
        web = create_app(c).test_client()
        r = web.get("/api/quality?n=5&precision=0.9").get_json()
        assert r["label_cut"] == "precision 0.9" and WRONG in {f["key"] for f in r["label_errors"]}
        assert [x["held_out"] for x in r["leaks"]] == [COPY]
        assert web.post("/api/keep", json={"kind": "outlier", "keys": [FAR]}).get_json() == {
            "kind": "outlier", "keys": [FAR], "label": ""
        }
        assert web.post("/api/splits", json={"splits": {COPY: "none"}}).get_json()["updated"] == 1
        assert web.post("/api/delete", json={"keys": [KEYS[0]]}).get_json()["deleted"] == 1
        r = web.get("/api/quality").get_json()
        assert FAR not in {o["key"] for o in r["outliers"]} and not r["leaks"]
        cases = [
            (web.get("/api/quality?precision=high"), 400, "precision must be a number"),
            (web.get("/api/quality?precision=2"), 400, "precision must be in (0, 1]"),
            (web.post("/api/splits", json={"splits": [COPY]}), 400, "splits must be an object"),
            (web.post("/api/splits", json={"splits": {COPY: "dev"}}), 400, "is not one of"),
            (web.post("/api/delete", json={"keys": "a"}), 400, "keys must be a list of strings"),
            (web.post("/api/delete", json={"keys": ["nobody"]}), 404, "unknown key"),
            (web.post("/api/keep", json={"kind": "odd", "keys": [FAR]}), 400, "unknown finding kind"),
        ]
        for response, status, message in cases:
            assert response.status_code == status, (message, response.data)
            assert message in response.get_data(as_text=True)
    with FeatureBankClient(rs.target, token="r0") as reader:
        denied = create_app(reader).test_client().post("/api/keep", json={"kind": "label", "keys": [WRONG]})
    assert denied.status_code == 403 and denied.get_json()["code"] == "PERMISSION_DENIED"
    assert "KeepFinding needs a write token" in denied.get_json()["error"]
    with store_mod.open(bank, readonly=True) as st:
        assert st.get_by_keys([COPY]).splits == ["none"] and st.missing([KEYS[0]]) == [KEYS[0]]
