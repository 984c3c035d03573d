"""The Quality call on a real server over a loopback port, over a real bank."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import featurebank as fb
from featurebank import store as store_mod
from featurebank.server.app import ServeConfig
from featurebank.server.auth import Tokens
from featurebank.server.client import FeatureBankClient, RemoteError
from tests.support.server import RunningServer, class_centers, clustered, free_port
from tests.support.specs import make_spec

DIM = 16


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Three clusters of 40 with two labels flipped, a train item copied into test, and
    two items far from every cluster."""
    from featurebank.index.build import build_index

    bank = tmp_path_factory.mktemp("quality") / "bank"
    keys, vectors, labels = clustered(40, DIM, noise=0.15)
    labels[3], labels[50] = "dog", "cat"  # a cat called dog, a dog called cat
    far = 3 * np.random.default_rng(9).normal(size=(2, DIM)).astype(np.float32)
    with store_mod.create(bank, make_spec(DIM)) as st:
        st.put_batch(keys, vectors, labels=labels, splits=["train"] * len(keys))
        st.put_batch(["copy-of-7", "far/0", "far/1"], np.concatenate([vectors[7:8], far]),
                     splits=["test", "none", "none"])
    build_index(bank, factory="Flat")
    tokens = Tokens({"read": ["r0"], "write": ["w0"]})
    with RunningServer(ServeConfig(bank=bank, port=free_port(), tokens=tokens)) as rs:
        yield rs


def test_quality_over_grpc_reports_every_finding_type(served: RunningServer) -> None:
    keys, _, _ = clustered(40, DIM, noise=0.15)
    with FeatureBankClient(served.target, token="r0") as c:
        r = c.quality()
    assert r.items == 123 and r.labelled == 120 and r.has_labels
    wrong = {f.key for f in r.label_errors}
    assert {keys[3], keys[50]} <= wrong and len(wrong) <= 3
    assert r.label_cut == "estimate" and r.label_selected == len(r.label_errors)
    assert abs(r.estimated_wrong - 2) <= 1
    assert r.label_errors[0].neighbors and r.label_errors[0].suggested != r.label_errors[0].label
    assert {(s.a, s.b) for s in r.swaps} == {("cat", "dog")}
    assert {c.label: c.items for c in r.classes} == {"cat": 40, "dog": 40, "fox": 40}
    assert [(x.train, x.held_out, x.split) for x in r.leaks] == [(keys[7], "copy-of-7", "test")]
    assert [sorted(m.key for m in g.members) for g in r.duplicates] == [
        sorted([keys[7], "copy-of-7"])
    ]
    assert {o.key for o in r.outliers[:2]} == {"far/0", "far/1"}
    assert len(r.outliers[0].neighbors) == 5
    assert r.counts["leaks"] == 1 and r.counts["outliers"] == len(r.outliers)


def test_quality_sees_an_upsert_at_once(served: RunningServer) -> None:
    keys, vectors, _ = clustered(40, DIM, noise=0.15)
    with FeatureBankClient(served.target, token="w0") as w:
        w.upsert([{"key": "copy-of-90", "vector": vectors[90], "split": "val"}])
        r = w.quality(n=5)
        w.delete(["copy-of-90"])
    assert (keys[90], "copy-of-90", "val") in {(x.train, x.held_out, x.split) for x in r.leaks}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"precision": 1.5}, "precision must be in (0, 1], got 1.5"),
     ({"n": 20_000}, "n=20000 is out of range")],
)
def test_bad_quality_requests_are_invalid_argument(
    served: RunningServer, kwargs: dict[str, float], message: str
) -> None:
    with FeatureBankClient(served.target, token="r0") as c, pytest.raises(
        RemoteError, match=message.replace("(", r"\(").replace(")", r"\)")
    ) as e:
        c.quality(**kwargs)  # type: ignore[arg-type]
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def fresh_pass(bank: Path) -> dict[str, Any]:
    """A full pass over the bank read afresh: the CLI in another process, read-only."""
    proc = subprocess.run(
        [sys.executable, "-m", "featurebank", "quality", "--bank", str(bank), "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def test_quality_applies_upserts_to_its_last_pass_and_matches_a_fresh_one(
    tmp_path: Path,
) -> None:
    """Upsert a copy of a train item into test, a far item, ordinary items, a relabel and a
    delete: the next Quality call reuses its lists, finds the copy and the far item, and
    answers as a full pass over the changed bank does."""
    from featurebank.index.build import build_index

    bank = tmp_path / "bank"
    keys, vectors, labels = clustered(40, DIM, noise=0.15)
    labels[3] = "dog"
    with store_mod.create(bank, make_spec(DIM)) as st:
        st.put_batch(keys, vectors, labels=labels, splits=["train"] * len(keys))
    build_index(bank, factory="Flat")
    more_keys, more, more_labels = clustered(5, DIM, noise=0.15, seed=4)
    centers = class_centers(DIM)
    far = np.random.default_rng(5).normal(size=DIM)
    far = (far - centers.T @ np.linalg.lstsq(centers.T, far, rcond=None)[0]).astype(np.float32)
    tokens = Tokens({"write": ["w0"]})
    with RunningServer(ServeConfig(bank=bank, port=free_port(), tokens=tokens)) as rs, \
            FeatureBankClient(rs.target, token="w0") as c:
        first = c.quality()
        assert not first.incremental and keys[3] in {f.key for f in first.label_errors}
        assert not first.leaks
        c.upsert(
            [{"key": "copy-of-20", "vector": vectors[20], "split": "test"},
             {"key": "far/new", "vector": far, "split": "none"}]
            + [{"key": k, "vector": v, "label": lab, "split": "train"}
               for k, v, lab in zip(more_keys, more, more_labels, strict=True)]
        )
        c.set_labels({keys[60]: "cat"})  # a dog called cat
        c.delete([keys[100]])
        r = c.quality()
        assert r.incremental and r.changed_items == 2 + len(more_keys) + 2
        assert r.items == len(keys) + 2 + len(more_keys) - 1
        assert [(x.train, x.held_out) for x in r.leaks] == [(keys[20], "copy-of-20")]
        assert r.outliers[0].key == "far/new"
        assert {keys[3], keys[60]} <= {f.key for f in r.label_errors}
        again = c.quality()
        assert again.incremental and again.changed_items == 0
        fresh = fresh_pass(bank)
    assert fresh["items"] == r.items and fresh["counts"] == dict(r.counts)
    le = fresh["labels"]
    assert [(f["key"], f["suggested"]) for f in le["findings"]] == [
        (f.key, f.suggested) for f in r.label_errors
    ]
    assert [f["confidence"] for f in le["findings"]] == pytest.approx(
        [f.confidence for f in r.label_errors], abs=1e-5
    )
    assert le["estimated_wrong"] == pytest.approx(r.estimated_wrong, abs=1e-4)
    assert [(s["a"], s["b"]) for s in le["swaps"]] == [(s.a, s.b) for s in r.swaps]
    assert [sorted(m["key"] for m in g["members"]) for g in fresh["duplicates"]["groups"]] == [
        sorted(m.key for m in g.members) for g in r.duplicates
    ]
    assert [o["key"] for o in fresh["outliers"]] == [o.key for o in r.outliers]
    assert [o["score"] for o in fresh["outliers"]] == pytest.approx(
        [o.score for o in r.outliers], rel=1e-4
    )
    assert fresh["outlier_cut"] == pytest.approx(r.outlier_cut, rel=1e-4)


def test_crops_upserted_with_thumbnails_are_found_by_the_next_pass(tmp_path: Path) -> None:
    """Trimmed copies of ten train digits, upserted as images into test with thumbnails:
    the next Quality call applies them to its last pass and lists each as a leak of its
    original, those the features leave out decided by their thumbnails."""
    import io

    from PIL import Image

    from tests.support.quality import cropped, digits_bank

    bank, _, images = digits_bank(tmp_path)
    originals = [f"d{r:03d}.png" for r in range(5, 250, 25)]
    with RunningServer(ServeConfig(bank=bank, port=free_port())) as rs, \
            FeatureBankClient(rs.target, timeout=120) as c:
        first = c.quality(n=1000)
        items = []
        for name in originals:
            buf = io.BytesIO()
            cropped(Image.open(images / name).convert("RGB")).save(buf, "PNG")
            items.append({"key": f"trimmed/{name}", "image": buf.getvalue(), "split": "test",
                          "thumbnail": True})
        c.upsert(items)
        r = c.quality(n=1000)
        with fb.connect(rs.target) as remote:
            over = {x.held_out: x.match for x in remote.quality(n=1000).leaks}
    with fb.open(bank) as local:
        here = {x.held_out: x.match for x in local.quality(n=1000).leaks}
    assert set(over) == set(here) and all(over[k] == pytest.approx(here[k], abs=1e-6) for k in here)
    assert not first.incremental and r.incremental and r.changed_items == len(originals)
    leaks = {x.held_out: x for x in r.leaks if x.held_out.startswith("trimmed/")}
    assert {k: x.train for k, x in leaks.items()} == {
        f"trimmed/{n}": f"images/{n}" for n in originals
    }
    assert any(x.match >= 0.99 for x in leaks.values())
