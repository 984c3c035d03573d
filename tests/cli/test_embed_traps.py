"""Traps of `featurebank embed` with the user's own .keras model, run through the real CLI."""

from __future__ import annotations

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
    capsys.readouterr()
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
