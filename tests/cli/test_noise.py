"""What the CLI prints besides its answer: no TensorFlow start-up lines, no progress bars in
logs, a warning for random weights, a wrong path reported before TensorFlow starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from featurebank.cli import main
from tests.support.server import make_vector_bank

ROOT = Path(__file__).resolve().parents[2]
TF_NOISE = ("absl::InitializeLog", "cuInit", "cuda drivers", "oneDNN", "cpu_feature_guard")


def cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m featurebank ARGV`, its stderr a pipe (as in a log), not a terminal."""
    return subprocess.run([sys.executable, "-m", "featurebank", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_head_train_prints_no_tensorflow_start_up_lines(tmp_path: Path) -> None:
    bank = make_vector_bank(tmp_path / "bank", dim=8, n_per_class=10)
    r = cli("head", "train", "--bank", str(bank), "--epochs", "3", "--folds", "2")
    assert r.returncode == 0, r.stderr
    assert "head generation 1" in r.stdout
    assert not [n for n in TF_NOISE if n in r.stderr], r.stderr


def test_no_progress_bar_in_a_log(tmp_path: Path) -> None:
    bank = make_vector_bank(tmp_path / "bank", dim=8, n_per_class=10, index=False)
    r = cli("index", "build", "--bank", str(bank), "--k", "3")
    assert r.returncode == 0, r.stderr
    assert "vec/s" not in r.stderr and "indexing" not in r.stderr, r.stderr


def test_a_wrong_source_is_reported_before_tensorflow_starts(tmp_path: Path) -> None:
    code = (
        "import sys\nfrom featurebank.cli import main\n"
        f"rc = main(['embed', {str(tmp_path / 'nope')!r}, '--bank', {str(tmp_path / 'b')!r}, "
        "'--backbone', 'MobileNetV3Small', '--weights', 'none'])\n"
        "print(rc, 'tensorflow' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.stdout.split() == ["2", "False"], r.stderr
    assert f"source {tmp_path / 'nope'} does not exist" in r.stderr


def test_random_weights_are_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.cli.test_embed_traps import write_digits

    images = write_digits(tmp_path / "images", n=2)
    argv = ["embed", str(images), "--bank", str(tmp_path / "bank"), "--backbone",
            "MobileNetV3Small", "--weights", "none", "--image-size", "32", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "--weights none: the backbone is randomly initialised" in capsys.readouterr().err
