"""`featurebank quality` through the real CLI on real image files and a real bank.

The labelled bank (tests/support/quality.py): scikit-learn's digits rendered as PNG files
and embedded with the shipped digits CNN (layer `features`, thumbnails kept), with
planted copies (byte-identical, re-encoded as JPEG, saved at twice the size, trimmed by
a pixel a side), copies placed in the test split (leaks), face crops (off-domain
outliers) and flipped labels. The unlabelled bank: plain vectors.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.cli import main
from tests.support.quality import CROPPED, EXACT, FACES, FLIPS, PER_CLASS, REENCODED, RESIZED
from tests.support.quality import digits_bank as quality_bank
from tests.support.specs import make_spec

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "featurebank", *args], capture_output=True, text=True,
        cwd=ROOT, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def digits_bank(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    bank, copies, _ = quality_bank(tmp_path_factory.mktemp("quality"))
    return bank, {"copies": copies}


def run_json(bank: Path, *extra: str) -> dict[str, Any]:
    proc = cli("quality", "--bank", str(bank), "--json", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def test_flipped_labels_are_found_counted_and_cut_at_the_estimate(
    digits_bank: tuple[Path, dict[str, Any]],
) -> None:
    bank, _ = digits_bank
    report = run_json(bank)
    le = report["labels"]
    flipped = {f"images/d{r:03d}.png" for r in FLIPS}
    listed = {f["key"] for f in le["findings"]}
    assert len(listed & flipped) >= len(FLIPS) - 1, (listed, flipped)
    assert len(listed - flipped) <= 2
    assert abs(le["estimated_wrong"] - len(FLIPS)) <= 3
    assert le["selected"] == len(le["findings"]) == round(le["estimated_wrong"])
    first = le["findings"][0]
    assert first["key"] in flipped and first["suggested"] != first["label"]
    assert len(first["neighbors"]) == 5
    assert all(nb["label"] == first["suggested"] for nb in first["neighbors"][:3])
    per_class = {c["label"]: c["wrong"] for c in le["classes"]}
    assert sum(per_class.values()) == pytest.approx(le["estimated_wrong"])


def test_precision_moves_the_cut(digits_bank: tuple[Path, dict[str, Any]]) -> None:
    bank, _ = digits_bank
    strict = run_json(bank, "--precision", "1.0")["labels"]
    loose = run_json(bank, "--precision", "0.3")["labels"]
    assert strict["cut"] == "precision 1" and loose["cut"] == "precision 0.3"
    assert strict["selected"] <= loose["selected"] <= loose["candidates"]
    assert loose["estimated_precision"] >= 0.3
    assert all(1 - f["p_label"] == pytest.approx(1.0) for f in strict["findings"])


def test_copies_are_grouped_with_their_originals_and_test_copies_are_leaks(
    digits_bank: tuple[Path, dict[str, Any]],
) -> None:
    bank, info = digits_bank
    report = run_json(bank)
    assert report["items"] == 10 * PER_CLASS + len(EXACT + REENCODED + RESIZED + CROPPED) + FACES
    dups = report["duplicates"]
    pairs = {frozenset((p["a"], p["b"])): p for g in dups["groups"] for p in g["pairs"]}
    copies: dict[str, str] = info["copies"]
    for copy, original in copies.items():  # every copy is found beside its original
        pair = pairs[frozenset((copy, original))]
        assert pair["exact"] is ("exact" in copy)
        if "exact" in copy:
            assert pair["distance"] == 0.0
    by_thumbnails = [p for p in pairs.values() if p["match"]]  # too far by features alone
    assert by_thumbnails and all(p["match"] >= 0.99 and p["distance"] > dups["threshold"]
                                 for p in by_thumbnails)
    assert any("crop" in p["a"] + p["b"] for p in by_thumbnails)
    assert len(pairs) - len(copies) <= 1  # hardly any pair between distinct digits
    assert report["counts"]["exact_groups"] == len(EXACT)
    leaks = {(x["train"], x["held_out"]) for x in report["duplicates"]["leaks"]}
    planted = {(o, c) for j, (c, o) in enumerate(copies.items()) if j % 2 == 0}
    assert leaks == planted
    assert all(x["split"] == "test" for x in report["duplicates"]["leaks"])
    for x in report["duplicates"]["leaks"]:  # a leak shows its pair's evidence
        assert x["match"] == pairs[frozenset((x["train"], x["held_out"]))]["match"]


def test_face_crops_are_the_outliers(digits_bank: tuple[Path, dict[str, Any]]) -> None:
    bank, _ = digits_bank
    report = run_json(bank)
    top = [o["key"] for o in report["outliers"][: 2 * FACES]]
    faces = {f"images/face{j}.png" for j in range(FACES)}
    assert len(faces & set(top)) >= FACES - 1, top
    assert report["outliers"][0]["key"] in faces
    assert len(report["outliers"][0]["neighbors"]) == 5


def test_text_report_names_each_finding(digits_bank: tuple[Path, dict[str, Any]]) -> None:
    bank, _ = digits_bank
    proc = cli("quality", "--bank", str(bank), "--n", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for needle in ("labels: about", "  label ", "duplicates:", "group exact:", "leaks:",
                   "  leak ", "outliers:", "  outlier "):
        assert needle in out, needle
    assert out.count("  label ") == 3
    listed = [float(line.split()[2]) for line in out.splitlines() if line.startswith("  label p ")]
    assert len(listed) == 3 and listed == sorted(listed)  # least probable label first


def test_a_bank_without_labels_still_gets_duplicates_and_outliers(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    x = np.concatenate([c + 0.3 * rng.normal(size=(50, 16)) for c in centres])
    x = np.concatenate([x, x[[5, 60]], 8 * rng.normal(size=(3, 16))]).astype(np.float32)
    keys = [f"v{i}" for i in range(200)] + ["copy5", "copy60", "far0", "far1", "far2"]
    with store_mod.create(tmp_path / "b", make_spec(16)) as st:
        st.put_batch(keys, x)
    assert main(["index", "build", "--bank", str(tmp_path / "b"), "--factory", "Flat"]) == 0
    report = run_json(tmp_path / "b")
    assert report["labels"] is None and report["labelled"] == 0
    pairs = {frozenset((p["a"], p["b"])) for g in report["duplicates"]["groups"]
             for p in g["pairs"]}
    assert pairs == {frozenset(("v5", "copy5")), frozenset(("v60", "copy60"))}
    assert {o["key"] for o in report["outliers"][:3]} == {"far0", "far1", "far2"}
    text = cli("quality", "--bank", str(tmp_path / "b"))
    assert "labels: none in the bank" in text.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--precision", "1.5"], "precision must be in (0, 1], got 1.5"),
        (["--n", "0"], "n must be a positive integer, got 0"),
    ],
)
def test_bad_arguments_get_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    with store_mod.create(tmp_path / "b", make_spec(4)) as st:
        st.put_batch(["a", "b", "c"], np.eye(3, 4, dtype=np.float32))
    assert main(["index", "build", "--bank", str(tmp_path / "b"), "--factory", "Flat",
                 "--k", "2"]) == 0
    proc = cli("quality", "--bank", str(tmp_path / "b"), *args)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"featurebank: error: {message}"


def test_a_bank_without_an_index_is_named(tmp_path: Path) -> None:
    with store_mod.create(tmp_path / "b", make_spec(4)) as st:
        st.put_batch(["a"], np.ones((1, 4), np.float32))
    proc = cli("quality", "--bank", str(tmp_path / "b"))
    assert proc.returncode == 2
    assert "no index yet" in proc.stderr and "featurebank index build" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_kept_findings_are_remembered_in_the_bank(tmp_path: Path) -> None:
    """Keep a label, a duplicate pair and an outlier: the next pass lists none of them,
    a copied bank remembers them, and relabelling the kept item makes its finding new."""
    rng = np.random.default_rng(3)
    centres = 3 * rng.normal(size=(3, 16))
    x = np.concatenate([c + 0.3 * rng.normal(size=(40, 16)) for c in centres])
    x = np.concatenate([x, x[[7]], 8 * rng.normal(size=(1, 16))]).astype(np.float32)
    keys = [f"v{i}" for i in range(120)] + ["copy7", "far"]
    labels: list[str | None] = [str(i // 40) for i in range(120)] + [None, None]
    labels[5] = "2"  # wrong
    bank = tmp_path / "b"
    with store_mod.create(bank, make_spec(16)) as st:
        st.put_batch(keys, x, labels=labels, splits=["train"] * 120 + ["test", "none"])
    assert main(["index", "build", "--bank", str(bank), "--factory", "Flat"]) == 0
    before = run_json(bank)
    assert [f["key"] for f in before["labels"]["findings"]] == ["v5"]
    assert [(x["train"], x["held_out"]) for x in before["duplicates"]["leaks"]] == [("v7", "copy7")]
    assert before["outliers"][0]["key"] == "far"
    proc = cli("quality", "--bank", str(bank), "--keep", "label", "v5",
               "--keep", "duplicate", "copy7", "v7", "--keep", "outlier", "far", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "kept label v5 = 2" in proc.stderr
    after = json.loads(proc.stdout)
    assert after["labels"]["findings"] == [] and after["labels"]["kept"] == 1
    assert after["duplicates"]["groups"] == [] and after["duplicates"]["leaks"] == []
    assert "far" not in {o["key"] for o in after["outliers"]}
    assert after["counts"]["kept"] == 4  # the label, the group, its leak and the outlier
    shutil.copytree(bank, tmp_path / "copy")
    assert run_json(tmp_path / "copy")["counts"]["kept"] == 4
    with store_mod.open(bank) as st:
        st.set_labels({"v5": "1"})  # still wrong, but not the label that was kept
    again = run_json(bank)
    assert [f["key"] for f in again["labels"]["findings"]] == ["v5"]
    for args, message in (
        (["--keep", "typo", "v1"], "unknown finding kind 'typo'"),
        (["--keep", "duplicate", "v1"], "a kept duplicate names 2 different key(s), got ['v1']"),
        (["--keep", "outlier", "nope"], "key 'nope' is not in bank"),
        (["--keep", "label", "far"], "key 'far' has no label to keep"),
    ):
        proc = cli("quality", "--bank", str(bank), *args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    (bank / "quality" / "decisions.json").write_text("{not json")
    proc = cli("quality", "--bank", str(bank))
    assert proc.returncode == 2
    assert f"quality decisions file {bank / 'quality' / 'decisions.json'} is damaged" in proc.stderr
