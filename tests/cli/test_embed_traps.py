"""Traps of `featurebank embed` with the user's own .keras model, run through the real CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurebank import store as store_mod
from featurebank.cli import main

ROOT = Path(__file__).resolve().parents[2]
DIGITS_MODEL = ROOT / "featurebank" / "embedder" / "models" / "digits_cnn.keras"


def write_digits(root: Path, n: int = 6) -> Path:
    """A folder of small gray images in two class subfolders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / f"class{i % 2}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(path)
    return root


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return write_digits(tmp_path / "images")


def embed(images: Path, bank: Path, *extra: str, model: Path = DIGITS_MODEL) -> int:
    return main(["embed", str(images), "--bank", str(bank), "--backbone", str(model),
                 "--no-progress", *extra])  # fmt: skip


def test_default_layer_cuts_the_classifier_and_says_so(
    images: Path, bank: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert embed(images, bank) == 0
    err = capsys.readouterr().err
    assert "layer features" in err and "classifier" in err  # the layer used and why
    with store_mod.open(bank, readonly=True) as st:
        assert st.spec.layer == "features" and st.spec.dim == 128
    assert embed(images, bank) == 0  # the same options again: nothing to do, no complaint
    assert "skipped 6" in capsys.readouterr().out


def test_rerun_with_another_layer_is_refused_without_new_images(
    images: Path, bank: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert embed(images, bank, "--layer", "digit") == 0  # the softmax output, dim 10
    assert "features from layer digit\n" in capsys.readouterr().err
    assert embed(images, bank, "--layer", "features") == 2
    err = capsys.readouterr().err
    assert "spec mismatch" in err and "layer=digit" in err and "layer=features" in err
    assert "dim: 10 vs 128" in err
    with store_mod.open(bank, readonly=True) as st:
        assert st.spec.layer == "digit" and st.spec.dim == 10 and st.count == 6


def test_rerun_with_another_resize_is_refused_without_new_images(
    images: Path, bank: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert embed(images, bank) == 0
    capsys.readouterr()
    assert embed(images, bank, "--resize", "pad") == 2
    err = capsys.readouterr().err
    assert "spec mismatch" in err and "resize: 'crop' vs 'pad'" in err


def test_a_bank_keeps_its_model_when_the_file_and_the_bank_move(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from featurebank.server.app import ServeConfig
    from tests.support.server import RunningServer, free_port

    model = tmp_path / "models" / "digits.keras"
    model.parent.mkdir()
    shutil.copyfile(DIGITS_MODEL, model)
    bank = tmp_path / "bank"
    assert embed(images, bank, model=model) == 0
    assert main(["index", "build", "--bank", str(bank), "--factory", "Flat", "--k", "3"]) == 0
    moved_model = tmp_path / "elsewhere.keras"
    model.rename(moved_model)
    moved_bank = tmp_path / "copied" / "bank"
    shutil.copytree(bank, moved_bank)
    shutil.rmtree(bank)

    more = write_digits(tmp_path / "more", n=8)  # the model at its new place embeds more
    capsys.readouterr()
    assert embed(more, moved_bank, model=moved_model) == 0
    assert "embedded 2, skipped 6" in capsys.readouterr().out
    moved_model.unlink()

    with RunningServer(ServeConfig(bank=moved_bank, port=free_port())) as rs:
        code = main(["classify", str(images / "class0" / "000.png"), "--server", rs.target])
    out = capsys.readouterr().out
    assert code == 0 and "class0" in out


def test_relink_and_the_error_when_no_model_is_left(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "digits.keras"
    shutil.copyfile(DIGITS_MODEL, model)
    bank = tmp_path / "bank"
    assert embed(images, bank, model=model) == 0
    model.unlink()
    shutil.rmtree(bank / "models")  # a bank made before banks kept their model
    more = write_digits(tmp_path / "more", n=8)
    capsys.readouterr()
    assert main(["store", "relink", "--bank", str(bank), "--model", str(more / "class0" / "000.png")]) == 2
    assert "does not match" in capsys.readouterr().err
    from featurebank.core.errors import FailedPrecondition
    from featurebank.embedder.embedding import Embedder

    with store_mod.open(bank, readonly=True) as st, pytest.raises(FailedPrecondition) as failed:
        Embedder.from_spec(st.spec)
    assert "store relink" in str(failed.value) and str(model) in str(failed.value)
    assert main(["serve", "--bank", str(bank), "--port", "0"]) == 2  # refused in one line
    err = capsys.readouterr().err
    assert "store relink" in err and len(err.strip().splitlines()) == 1, err

    again = tmp_path / "found" / "digits.keras"
    again.parent.mkdir()
    shutil.copyfile(DIGITS_MODEL, again)
    assert main(["store", "relink", "--bank", str(bank), "--model", str(again)]) == 0
    assert "relinked" in capsys.readouterr().out
    again.unlink()  # the bank holds its copy now
    with store_mod.open(bank, readonly=True) as st:
        assert Embedder.from_spec(st.spec, freeze=False).dim == 128


def test_train_val_test_folders_are_splits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for split in ("train", "val", "test"):
        write_digits(tmp_path / "images" / split, n=4)
    bank = tmp_path / "bank"
    assert embed(tmp_path / "images", bank) == 0
    with store_mod.open(bank, readonly=True) as st:
        items = st.to_numpy()
    got = {(k.split("/")[0], label, split) for k, label, split in
           zip(items.keys, items.labels, items.splits, strict=True)}  # fmt: skip
    assert got == {(s, f"class{c}", s) for s in ("train", "val", "test") for c in (0, 1)}
