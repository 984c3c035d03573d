"""The data-quality pass and kept findings in the Python API: the same report in process
and over gRPC (a real store, a real index, a real server on a loopback port), and kept
findings from two processes at once both remembered."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import featurebank as fb
from featurebank.core.errors import InvalidInput, NotFound
from featurebank.server.client import RemoteError
from tests.support.server import clustered

DIM = 16
ROOT = Path(__file__).resolve().parents[2]


def planted(path: Path) -> tuple[fb.LocalBank, list[str]]:
    """Three clusters of 40 with two labels flipped, a train item copied into test, and
    two items far from every cluster."""
    keys, vectors, labels = clustered(40, DIM, noise=0.15)
    labels[3], labels[50] = "dog", "cat"
    far = 3 * np.random.default_rng(9).normal(size=(2, DIM)).astype(np.float32)
    bank = fb.create(path, dim=DIM)
    bank.upsert(vectors, keys=keys, labels=labels, splits="train")
    bank.upsert(np.concatenate([vectors[7:8], far]), keys=["copy-of-7", "far/0", "far/1"],
                splits=["test", "none", "none"])
    bank.build_index(factory="Flat")
    return bank, keys


def findings(q: fb.Quality) -> tuple[object, ...]:
    return (
        q.items, q.labelled, {f.key for f in q.label_errors}, q.swapped and q.swapped[0][:2],
        [(d.keys, d.splits, d.exact) for d in q.duplicates],
        [(x.train, x.held_out, x.split) for x in q.leaks], [o.key for o in q.outliers],
        q.counts, q.splits,
    )


def test_quality_in_process_and_over_grpc_give_one_report(tmp_path: Path) -> None:
    bank, keys = planted(tmp_path / "b")
    local = bank.quality()
    assert local.items == 123 and local.labelled == 120
    assert {keys[3], keys[50]} <= {f.key for f in local.label_errors}
    assert local.estimated_wrong is not None and abs(local.estimated_wrong - 2) <= 1
    assert set(local.wrong_per_class) == {"cat", "dog", "fox"}
    assert local.swapped[0][:2] == ("cat", "dog")
    assert [(x.train, x.held_out, x.split) for x in local.leaks] == [(keys[7], "copy-of-7", "test")]
    assert [sorted(d.keys) for d in local.duplicates] == [sorted([keys[7], "copy-of-7"])]
    assert {o.key for o in local.outliers[:2]} == {"far/0", "far/1"}
    assert local.outliers[0].neighbors and local.to_dict()["leaks"][0]["split"] == "test"
    assert len(bank.quality(n=1).outliers) == 1
    with bank.serve() as served, fb.connect(served.address) as remote:
        over = remote.quality()
        assert findings(over) == findings(local)
        assert over.label_errors[0].neighbors and over.label_errors[0].key == local.label_errors[0].key
        kept = remote.keep("outlier", "far/0")
        assert (kept.kind, kept.keys) == ("outlier", ["far/0"])
        assert "far/0" not in [o.key for o in remote.quality().outliers]
        with pytest.raises(RemoteError, match="NOT_FOUND: key 'nope'"):
            remote.keep("outlier", "nope")
    assert "far/0" not in [o.key for o in bank.quality().outliers]  # remembered in the bank
    assert bank.keep("label", keys[3]).label == "dog"
    assert keys[3] not in {f.key for f in bank.quality().label_errors}
    for bad, match in (({"n": 0}, "n must be"), ({"precision": 1.5}, "precision must be"),
                       ({"precision": "high"}, "precision must be")):
        with pytest.raises(InvalidInput, match=match):
            bank.quality(**bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="unknown finding kind"):
        bank.keep("typo", keys[0])
    with pytest.raises(NotFound, match="nope"):
        bank.keep("outlier", "nope")
    bank.close()


def test_a_bank_without_labels_reports_duplicates_and_outliers(tmp_path: Path) -> None:
    _, vectors, _ = clustered(30, DIM, noise=0.15)
    far = 3 * np.random.default_rng(4).normal(size=(1, DIM)).astype(np.float32)
    with fb.create(tmp_path / "b", dim=DIM) as bank:
        bank.upsert(np.concatenate([vectors, vectors[:1], far]),
                    keys=[f"v{i}" for i in range(len(vectors))] + ["again", "far"])
        bank.build_index(factory="Flat")
        q = bank.quality()
        assert q.estimated_wrong is None and q.label_errors == [] and q.labelled == 0
        assert [sorted(d.keys) for d in q.duplicates] == [["again", "v0"]]
        assert q.outliers[0].key == "far"


KEEP = """
import os, pathlib, sys, time
import featurebank as fb
bank, go = fb.open(sys.argv[1]), pathlib.Path(sys.argv[2])
(go.parent / f"ready-{os.getpid()}").touch()
while not go.exists():  # all three start keeping at once
    time.sleep(0.001)
for key in sys.argv[3:]:
    bank.keep("outlier", key)
"""


def test_findings_kept_by_three_processes_at_once_are_all_remembered(tmp_path: Path) -> None:
    keys, vectors, _ = clustered(40, DIM)
    with fb.create(tmp_path / "b", dim=DIM) as bank:
        bank.upsert(vectors, keys=keys)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", KEEP, str(tmp_path / "b"), str(go), *keys[i::3]],
                              cwd=ROOT) for i in range(3)]
    while len(list(tmp_path.glob("ready-*"))) < 3 and all(p.poll() is None for p in procs):
        time.sleep(0.01)
    go.touch()
    assert [p.wait(120) for p in procs] == [0, 0, 0]
    from featurebank.classify.quality.decisions import load
    from featurebank.core.bank import Bank

    kept = {k.keys[0] for k in load(Bank(tmp_path / "b"))}
    assert kept == set(keys)


def test_a_held_out_split_unlike_train_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Train: cats, dogs and foxes. Val: drawn like train. Test: cats and dogs only, plus
    owls from a region train has nothing in, and one owl among the cats (uncovered by its
    label: train has no owl to learn it from)."""
    keys, vectors, labels = clustered(60, DIM, noise=0.15)
    rng = np.random.default_rng(3)
    val = rng.choice(len(keys), size=30, replace=False)
    splits = ["train"] * len(keys)
    for i in val:
        splits[i] = "val"
    more, more_vectors, more_labels = clustered(10, DIM, classes=("cat", "dog"), seed=2, noise=0.15)
    test = list(range(len(more)))
    region = 2.5 + 0.05 * rng.normal(size=(6, DIM)).astype(np.float32)
    with fb.create(tmp_path / "b", dim=DIM) as bank:
        bank.upsert(vectors, keys=keys, labels=labels, splits=splits)
        bank.upsert(more_vectors, keys=more, labels=more_labels, splits="test")
        bank.upsert(region, keys=[f"new/{i}" for i in range(6)], labels="owl", splits="test")
        bank.upsert(more_vectors[:1], keys=["owl-among-cats"], labels="owl", splits="test")
        bank.build_index(factory="Flat")
        checks = {c.split: c for c in bank.quality().splits}
        with bank.serve() as served, fb.connect(served.address) as remote:
            over = {c.split: c for c in remote.quality().splits}
    assert {s: (c.items, c.uncovered, c.uncovered_keys, c.missing_labels, c.unseen_labels)
            for s, c in over.items()} == {
        s: (c.items, c.uncovered, c.uncovered_keys, c.missing_labels, c.unseen_labels)
        for s, c in checks.items()}
    assert set(checks) == {"val", "test"}
    assert checks["val"].uncovered <= 1 and checks["val"].missing_labels == []  # by chance, at most
    assert checks["val"].label_distance < 0.2
    t = checks["test"]
    assert t.items == len(test) + 7 and 7 <= t.uncovered <= 8
    assert sorted(t.uncovered_keys[:6]) == [f"new/{i}" for i in range(6)]  # the farthest first
    assert "owl-among-cats" in t.uncovered_keys
    assert t.missing_labels == ["fox"] and t.unseen_labels == ["owl"] and t.label_distance > 0.3
    assert checks["val"].unseen_labels == []
    from featurebank.cli import main

    assert main(["quality", "--bank", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert f"split test: {len(test) + 7} items, {t.uncovered} unlike every train item" in out
    assert "no item labelled fox, labels train has none of: owl" in out and "  uncovered new/0" in out


def test_a_bank_with_no_train_split_has_no_split_checks(tmp_path: Path) -> None:
    keys, vectors, labels = clustered(20, DIM)
    with fb.create(tmp_path / "b", dim=DIM) as bank:
        bank.upsert(vectors, keys=keys, labels=labels, splits="test")
        bank.build_index(factory="Flat")
        assert bank.quality().splits == []
