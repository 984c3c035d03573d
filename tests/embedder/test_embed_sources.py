"""Sources: folder trees, manifests and array files become keyed, labelled records."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from featurebank.core.errors import InvalidInput, NotFound
from featurebank.embedder import sources


def write_png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 10, 3), value, np.uint8)).save(path)


def test_folder_tree_labels_from_subfolders(tmp_path: Path) -> None:
    for rel in ["cat/a.png", "cat/deeper/b.png", "dog/c.PNG", "top.png", ".hidden/x.png"]:
        write_png(tmp_path / rel)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "dog" / "scan.tiff").write_bytes(b"x")  # listed: reported as unsupported
    src = sources.open_source(tmp_path)
    got = {r.key: r.label for r in src.records}
    assert got == {
        "cat/a.png": "cat",
        "cat/deeper/b.png": "cat",
        "dog/c.PNG": "dog",
        "dog/scan.tiff": "dog",
        "top.png": None,
    }
    assert src.ignored == 1
    pixels, meta = src.load(src.records[0], (4, 4), "crop")
    assert pixels.shape == (4, 4, 3) and meta["size"] > 0 and len(meta["sha256"]) == 64
    unlabelled = sources.open_source(tmp_path, labels="none")
    assert {r.label for r in unlabelled.records} == {None}
    with pytest.raises(InvalidInput, match="manifest"):
        sources.open_source(tmp_path, labels="manifest")


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    for i in range(3):
        write_png(tmp_path / f"{i}.png")
    src = sources.open_source(str(tmp_path))
    assert [(r.key, r.label) for r in src.records] == [(f"{i}.png", None) for i in range(3)]


def test_missing_and_empty_sources(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        sources.open_source(tmp_path / "nope")
    with pytest.raises(InvalidInput, match="no image files"):
        sources.open_source(tmp_path)


def test_csv_manifest_with_header(tmp_path: Path) -> None:
    write_png(tmp_path / "img" / "a.png")
    write_png(tmp_path / "img" / "b.png")
    (tmp_path / "m.csv").write_text(
        "key,path,split,label\nA,img/a.png,train,cat\nB,img/b.png,val,\n"
    )
    src = sources.open_source(tmp_path / "m.csv", labels="manifest")
    assert [(r.key, r.label, r.split) for r in src.records] == [
        ("A", "cat", "train"),
        ("B", None, "val"),
    ]
    assert src.records[0].path == str(tmp_path / "img" / "a.png")
    # "folders" (the default) takes a manifest's own labels too; "none" drops them
    assert sources.open_source(tmp_path / "m.csv").records[0].label == "cat"
    assert sources.open_source(tmp_path / "m.csv", labels="none").records[0].label is None


def test_tsv_manifest_positional(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png")
    (tmp_path / "m.tsv").write_text("# comment\na.png\tcat\ttest\nsub/../a.png\tdog\t\tother\n")
    src = sources.open_source(tmp_path / "m.tsv")
    assert [(r.key, r.label, r.split) for r in src.records] == [
        ("a.png", "cat", "test"),
        ("other", "dog", "none"),
    ]


def test_manifest_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("a.png,cat,holdout\n")
    with pytest.raises(InvalidInput, match="line 1: split 'holdout'"):
        sources.open_source(tmp_path / "bad.csv")
    (tmp_path / "nolabel.csv").write_text("path\na.png\n")
    with pytest.raises(InvalidInput, match="no label column"):
        sources.open_source(tmp_path / "nolabel.csv", labels="manifest")
    (tmp_path / "dup.csv").write_text("a.png\na.png\n")
    with pytest.raises(InvalidInput, match="more than once"):
        sources.open_source(tmp_path / "dup.csv")


def test_npy_with_labels(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 255, (5, 6, 7, 3), dtype=np.uint8)
    np.save(tmp_path / "digits.npy", x)
    np.save(tmp_path / "digits_labels.npy", np.array([0, 1, 2, 1, 0]))
    src = sources.open_source(tmp_path / "digits.npy")
    assert [r.key for r in src.records][:2] == ["digits.npy#0", "digits.npy#1"]
    assert [r.label for r in src.records] == ["0", "1", "2", "1", "0"]
    pixels, meta = src.load(src.records[3], None, "crop")
    assert np.array_equal(pixels, x[3]) and meta["uri"] == "digits.npy#3"


def test_npz_and_float_range(tmp_path: Path) -> None:
    x = np.full((3, 4, 4), 0.2, np.float32)  # 0-1 floats, gray
    x[0] = 0.9
    np.savez(tmp_path / "d.npz", x=x, y=np.array(["a", "b", "c"]))
    src = sources.open_source(tmp_path / "d.npz")
    assert [r.label for r in src.records] == ["a", "b", "c"]
    assert src.load(src.records[1], None, "crop")[0][0, 0].tolist() == [51, 51, 51]


def test_hdf5_dataset_and_labels(tmp_path: Path) -> None:
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f["train/images"] = np.zeros((4, 9, 9, 1), np.uint8)
        f["train/labels"] = np.array([b"x", b"y", b"x", b"y"])
        f["other"] = np.zeros((4, 9, 9), np.uint8)
    src = sources.open_source(f"{path}:train/images")
    assert src.records[1].key == "data.h5:train/images#1"
    assert [r.label for r in src.records] == ["x", "y", "x", "y"]
    assert src.load(src.records[0], (5, 5), "crop")[0].shape == (5, 5, 3)
    src.close()
    explicit = sources.open_source(f"{path}:other:train/labels")
    assert explicit.records[3].label == "y"
    explicit.close()
    with pytest.raises(InvalidInput, match="say which dataset"):
        sources.open_source(str(path))
    with pytest.raises(NotFound, match="no dataset"):
        sources.open_source(f"{path}:nothing")


def test_embedder_modules_import_without_tensorflow() -> None:
    """Search-only processes import these; TensorFlow must wait until a model runs."""
    import subprocess
    import sys

    code = (
        "import sys, featurebank.store, featurebank.embedder.sources, "
        "featurebank.embedder.images, featurebank.embedder.backbones, "
        "featurebank.embedder.embedding, featurebank.embedder.pipeline, featurebank.cli.embed; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
