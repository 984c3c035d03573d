"""`featurebank store info|export|import` and `labels import`, run through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.cli import main
from tests.support.specs import make_vectors


@pytest.fixture
def imported(tmp_path: Path, bank: Path) -> Path:
    """A bank made by `store import` from a .npy, a keys file and a labels CSV."""
    np.save(tmp_path / "x.npy", make_vectors(6).astype(np.float16))
    (tmp_path / "keys.txt").write_text("".join(f"k{i}\n" for i in range(6)))
    (tmp_path / "labels.csv").write_text("key,label,split\nk0,cat,train\nk1,dog,val\nk2,cat\n")
    code = main(
        [
            "store", "import", "--bank", str(bank), "--vectors", str(tmp_path / "x.npy"),
            "--keys", str(tmp_path / "keys.txt"), "--labels", str(tmp_path / "labels.csv"),
            "--model", "clip-vit-b32",
        ]
    )  # fmt: skip
    assert code == 0
    return bank


def test_import_records_model_and_labels(imported: Path) -> None:
    with store_mod.open(imported, readonly=True) as st:
        assert st.spec.backbone == "clip-vit-b32" and st.spec.weights == "external"
        assert st.spec.dim == 8 and st.spec.dtype == "float16"
        items = st.to_numpy()
    assert items.keys == [f"k{i}" for i in range(6)]
    assert items.labels == ["cat", "dog", "cat", None, None, None]
    assert items.splits == ["train", "val", "none", "none", "none", "none"]
    np.testing.assert_array_equal(items.vectors, make_vectors(6).astype(np.float16))


def test_import_again_skips_stored_keys(
    imported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "store",
        "import",
        "--bank",
        str(imported),
        "--vectors",
        str(tmp_path / "x.npy"),
        "--keys",
        str(tmp_path / "keys.txt"),
        "--model",
        "clip-vit-b32",
    ]
    assert main(args) == 0
    assert "imported 0 vectors (6 already there)" in capsys.readouterr().out
    assert main([*args[:-1], "other-model"]) == 2  # another spec is refused
    assert "spec mismatch" in capsys.readouterr().err


def test_info(imported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with store_mod.open(imported) as st:
        st.record_error("broken.jpg", "cannot decode")
    assert main(["store", "info", "--bank", str(imported)]) == 0
    out = capsys.readouterr().out
    assert "clip-vit-b32" in out and "items       6 (3 labelled, 3 not)" in out
    assert "train=1" in out and "broken.jpg: cannot decode" in out and "MiB on disk" in out
    assert main(["store", "info", "--bank", str(imported), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["labels"] == {"cat": 2, "dog": 1} and stats["errors"] == 1


def test_labels_import(imported: Path, tmp_path: Path) -> None:
    csv = tmp_path / "new.csv"
    csv.write_text("k0,\nk3,bird,test\nk4,bird\n")
    assert main(["labels", "import", "--bank", str(imported), str(csv)]) == 0
    with store_mod.open(imported, readonly=True) as st:
        items = st.get_by_keys(["k0", "k3", "k4"])
    assert items.labels == [None, "bird", "bird"] and items.splits == ["train", "test", "none"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("k0,cat\nghost,dog\n", "'ghost' is not in bank"),
        ("k0,cat,holdout\n", "holdout"),
        ("k0\n", "expected key,label"),
        ("k0,cat\nk0,dog\n", "appears twice"),
    ],
)
def test_bad_labels_file_changes_nothing(
    imported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    assert main(["labels", "import", "--bank", str(imported), str(csv)]) == 2
    assert message in capsys.readouterr().err
    with store_mod.open(imported, readonly=True) as st:
        assert st.get_by_keys(["k0"]).labels == ["cat"]


def test_export_npy_and_parquet(imported: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["store", "export", "--bank", str(imported), "--out", str(out)]) == 0
    vectors = np.load(out / "vectors.npy")
    assert vectors.dtype == np.float16 and vectors.shape == (6, 8)
    np.testing.assert_array_equal(vectors, make_vectors(6).astype(np.float16))
    assert (out / "keys.txt").read_text().split() == [f"k{i}" for i in range(6)]
    assert (out / "labels.csv").read_text().splitlines()[:2] == ["key,label,split", "k0,cat,train"]
    assert json.loads((out / "spec.json").read_text())["backbone"] == "clip-vit-b32"

    pq = pytest.importorskip("pyarrow.parquet")
    assert (
        main(["store", "export", "--bank", str(imported), "--out", str(out), "--format", "parquet"])
        == 0
    )
    table = pq.read_table(out / "items.parquet").to_pydict()
    assert table["key"] == [f"k{i}" for i in range(6)] and table["label"][1] == "dog"
    np.testing.assert_array_equal(np.array(table["vector"], np.float16), vectors)


def test_import_shape_mismatch(
    tmp_path: Path, bank: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "x.npy", make_vectors(3))
    (tmp_path / "keys.txt").write_text("a\nb\n")
    code = main(
        [
            "store",
            "import",
            "--bank",
            str(bank),
            "--vectors",
            str(tmp_path / "x.npy"),
            "--keys",
            str(tmp_path / "keys.txt"),
        ]
    )
    assert code == 2 and "has shape (3, 8) but" in capsys.readouterr().err
    assert not (bank / "store").exists()


def test_store_command_starts_without_tensorflow(imported: Path) -> None:
    code = (
        "import sys; from featurebank.cli import main; rc = main(['store', 'info', '--bank', "
        f"{str(imported)!r}]); assert 'tensorflow' not in sys.modules; sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "clip-vit-b32" in result.stdout


def test_missing_files_are_clear_errors(
    imported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["labels", "import", "--bank", str(imported), str(tmp_path / "no.csv")]) == 2
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "junk.npy").write_text("junk")
    args = ["store", "import", "--bank", str(imported), "--vectors", str(tmp_path / "junk.npy")]
    assert main([*args, "--keys", str(tmp_path / "keys.txt")]) == 2
    assert "not a .npy array" in capsys.readouterr().err
    assert main(["store", "info", "--bank", str(tmp_path / "nobank")]) == 2
    assert "no store" in capsys.readouterr().err


def test_info_shows_index_and_flags_a_stale_head(
    bank: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from featurebank.classify.head_training import train_head
    from featurebank.index.build import build_index
    from tests.support.specs import make_spec

    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(c, 0.1, size=(20, 8)) for c in (-1.0, 1.0)]).astype(np.float32)
    with store_mod.create(bank, make_spec(8)) as st:
        st.put_batch([f"k{i}" for i in range(40)], x, ["a"] * 20 + ["b"] * 20)
    assert main(["store", "info", "--bank", str(bank)]) == 0
    out = capsys.readouterr().out
    assert "index       none" in out and "head        none" in out
    build_index(bank)
    train_head(bank, epochs=5, stacked=False)
    assert main(["store", "info", "--bank", str(bank)]) == 0
    out = capsys.readouterr().out
    assert "index       generation 1: Flat" in out and "2 classes, current" in out
    assert "chosen by cross-validation" in out  # the hybrid's weight, or the mode it became
    with store_mod.open(bank) as st:
        st.set_labels({"k0": "b"})
    assert main(["store", "info", "--bank", str(bank), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["head"]["stale"] is True and stats["index"]["generation"] == 1
    assert stats["head"]["hybrid_acts_as"] in ("hybrid", "knn", "head")


def test_backup_is_a_working_bank_taken_while_a_writer_commits(
    bank: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from featurebank.classify.classifier import Classifier
    from featurebank.index.build import build_index
    from tests.support.specs import make_spec

    x = make_vectors(50)
    with store_mod.create(bank, make_spec(8)) as writer:
        writer.put_batch([f"k{i}" for i in range(50)], x, ["a", "b"] * 25)
        build_index(bank)
        writer.put_batch(["late"], make_vectors(1, seed=1))  # writer still open and holding
        assert main(["store", "backup", "--bank", str(bank), "--out", str(tmp_path / "b")]) == 0
        assert "backed up 51 items" in capsys.readouterr().out
        assert main(["store", "backup", "--bank", str(bank), "--out", str(tmp_path / "b")]) == 2
    with store_mod.open(tmp_path / "b", readonly=True) as copy:
        items = copy.to_numpy()
        assert items.keys[-1] == "late" and len(items) == 51
        np.testing.assert_array_equal(items.vectors[:50], x)
    with Classifier(tmp_path / "b") as clf:
        assert clf.classify(x[:1], k=3)[0].labels


def test_import_reads_keys_from_crlf_files(bank: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", make_vectors(2))
    (tmp_path / "keys.txt").write_bytes(b"a.jpg\r\nb.jpg\r\n")
    argv = ["store", "import", "--bank", str(bank), "--vectors", str(tmp_path / "x.npy"),
            "--keys", str(tmp_path / "keys.txt")]  # fmt: skip
    assert main(argv) == 0
    with store_mod.open(bank, readonly=True) as st:
        assert st.to_numpy().keys == ["a.jpg", "b.jpg"]


def test_backup_copies_the_model_and_the_reports(
    store: store_mod.Store, bank: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store.put_batch(["k0"], make_vectors(1))
    (bank / "reports").mkdir()
    (bank / "reports" / "report.json").write_text("{}")
    (bank / "models").mkdir()
    (bank / "models" / "ab12.keras").write_bytes(b"model")
    assert main(["store", "backup", "--bank", str(bank), "--out", str(tmp_path / "b")]) == 0
    assert "models/, reports/" in capsys.readouterr().out
    assert (tmp_path / "b" / "reports" / "report.json").read_text() == "{}"
    assert (tmp_path / "b" / "models" / "ab12.keras").read_bytes() == b"model"
