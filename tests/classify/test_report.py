"""`featurebank eval` and the report: every figure, valid JSON, self-contained HTML."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurebank import store as store_mod
from featurebank.classify.evaluate import evaluate, format_table
from featurebank.classify.report import FIGURES, write_report
from featurebank.cli import main
from featurebank.index.build import build_index
from tests.support.specs import make_spec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ("circle", "square", "stripe")


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes of overlapping clusters, each item backed by a real image file (its uri)."""
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)).astype(np.float32)
    keys, vecs, labels, splits, meta = [], [], [], [], []
    for i in range(150):
        c = i % 3
        path = root / "images" / CLASSES[c] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img = np.zeros((12, 12, 3), np.uint8)
        img[..., c] = 200
        Image.fromarray(img).save(path)
        keys.append(f"{CLASSES[c]}/{i}.png")
        vecs.append(centers[c] + 0.9 * rng.normal(size=16).astype(np.float32))
        labels.append(CLASSES[c])
        splits.append(("train", "train", "train", "val", "test")[(i // 3) % 5])
        meta.append({"uri": str(path)})
    b = root / "bank"
    with store_mod.create(b, make_spec(16)) as st:
        st.put_batch(keys, np.stack(vecs), labels, splits, meta)
    build_index(b, transform="cl2n")
    rc = main(["head", "train", "--bank", str(b), "--epochs", "15", "--hidden", "8"])
    assert rc == 0
    return b


def test_evaluate_scores_every_mode_beside_sklearn(bank: Path) -> None:
    ev = evaluate(bank, "test")
    assert set(ev.probs) == {"knn", "head", "hybrid", "stacked", "sklearn_logreg", "sklearn_knn"}
    assert len(ev.y) == 30 and ev.vocabulary == sorted(CLASSES)
    for m in ev.summary.values():
        assert 0.0 <= m["accuracy"] <= 1.0 and m["log_loss"] >= 0 and 0 <= m["ece"] <= 1
    assert ev.summary["knn"]["accuracy"] > 0.6
    assert ev.accuracy_vs_k and min(ev.accuracy_vs_k) == 1
    table = format_table(ev)
    assert "hybrid *" in table and "sklearn_logreg" in table


def test_report_has_every_figure_and_valid_json(bank: Path, tmp_path: Path) -> None:
    ev = evaluate(bank, "val")
    page = write_report(ev, tmp_path / "r", projection="tsne")
    out = page.parent
    for name in FIGURES:
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    data = json.loads((out / "metrics.json").read_text())
    assert data["split"] == "val" and data["n"] == 30
    assert set(data["modes"]) >= {"knn", "head", "hybrid", "stacked", "sklearn_logreg"}
    assert data["head"]["generation"] == 1 and data["note"]
    assert set(data["figures"]) == set(FIGURES)
    for m in data["mistakes"]:
        assert m["true"] != m["predicted"] and m["neighbors"]
    html = page.read_text()
    assert len(re.findall(r'src="data:image/png;base64,', html)) == len(FIGURES)
    assert 'src="http' not in html and "<script" not in html


def test_eval_command_prints_table_and_report_path(
    bank: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "--bank", str(bank), "--abstain", "0.95"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "sklearn_knn" in out
    assert "abstention at a requested precision of 0.95" in out
    page = Path(out.strip().splitlines()[-1].removeprefix("report: "))
    assert page.exists() and page.parent.parent == bank / "reports"
    data = json.loads((page.parent / "metrics.json").read_text())
    assert data["split"] == "test"
    # every mode with cross-validated scores: the rate it abstains and the precision it reaches
    assert set(data["abstention"]) == {"knn", "head", "hybrid"}
    for a in data["abstention"].values():
        assert 0.0 <= a["abstain_rate"] <= 1.0 and a["answered"] <= 30
        assert a["answered"] == 0 or 0.0 <= a["precision"] <= 1.0
    assert "Abstention at a requested precision of 0.95" in page.read_text()


def test_head_info_command(bank: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["head", "info", "--bank", str(bank)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["generation"] == 1 and info["stale"] is False and info["hidden"] == 8
    assert info["hybrid_acts_as"] in ("hybrid", "knn", "head")
    assert set(info["cv_accuracy"]) == {"knn", "head", "hybrid"}


def test_eval_without_labelled_split_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b = tmp_path / "bank"
    with store_mod.create(b, make_spec(4)) as st:
        st.put_batch(["a", "b", "c"], np.eye(3, 4, dtype=np.float32), ["x", "y", "x"])
    build_index(b, k=2)
    assert main(["eval", "--bank", str(b)]) == 2
    assert "no labelled 'test' items" in capsys.readouterr().err


def test_eval_and_report_without_a_head(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(2, 6)).astype(np.float32)
    y = np.arange(40) % 2
    x = centers[y] + 0.3 * rng.normal(size=(40, 6)).astype(np.float32)
    b = tmp_path / "bank"
    with store_mod.create(b, make_spec(6)) as st:
        st.put_batch(
            [f"k{i}" for i in range(40)], x, [f"c{c}" for c in y], ["train"] * 30 + ["test"] * 10
        )
    build_index(b)
    ev = evaluate(b, "test")
    assert ev.default_mode == "knn" and set(ev.probs) == {"knn", "sklearn_logreg", "sklearn_knn"}
    assert ev.summary["knn"]["accuracy"] == 1.0
    page = write_report(ev, tmp_path / "r")
    data = json.loads((page.parent / "metrics.json").read_text())
    assert data["head"] is None and data["mistakes"] == []
    for name in FIGURES:
        assert (page.parent / f"{name}.png").read_bytes()[:8] == PNG_MAGIC


def test_report_on_a_full_disk_leaves_the_last_one_whole(tmp_path: Path) -> None:
    """A report is written beside its folder and swapped in: a full disk changes nothing."""
    import os
    import subprocess

    from featurebank.core.errors import InvalidInput, StorageFull

    rng = np.random.default_rng(2)
    y = np.arange(40) % 2
    x = rng.normal(size=(2, 6)).astype(np.float32)[y] + 0.3 * rng.normal(size=(40, 6)).astype(np.float32)
    b = tmp_path / "bank"
    with store_mod.create(b, make_spec(6)) as st:
        st.put_batch([f"k{i}" for i in range(40)], x, [f"c{c}" for c in y], ["train"] * 30 + ["test"] * 10)
    build_index(b)
    ev = evaluate(b, "test")
    with pytest.raises(InvalidInput, match="holds other files than a report"):
        write_report(ev, b)  # never swaps away a folder that is not a report
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("cannot mount a tmpfs here (needs root where mount is permitted)")
    try:
        page = write_report(ev, small / "report")
        before = {p.name: p.read_bytes() for p in page.parent.iterdir()}
        free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
        (small / "filler").write_bytes(bytes(max(0, free - 8192)))
        with pytest.raises(StorageFull, match="disk full"):
            write_report(ev, small / "report")
        assert {p.name: p.read_bytes() for p in page.parent.iterdir()} == before
        assert sorted(p.name for p in small.iterdir()) == ["filler", "report"]  # no staging left
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
