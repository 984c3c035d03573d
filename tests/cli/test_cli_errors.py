"""What a user can get wrong on the command line gets one line naming it, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from featurebank.cli import main
from tests.support.server import make_vector_bank

ROOT = Path(__file__).resolve().parents[2]


def cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m featurebank ARGV` in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "featurebank", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_serving_on_a_port_in_use(tmp_path: Path) -> None:
    bank = make_vector_bank(tmp_path / "bank", dim=8, n_per_class=5, index=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(cli("serve", "--bank", str(bank), "--port", str(port)))
        assert f"could not listen on 127.0.0.1:{port}: the port is in use" in line
        line = one_error_line(cli("serve", "--bank", str(bank), "--port", "0",
                                  "--metrics-port", str(port)))  # fmt: skip
    assert f"could not serve metrics on 127.0.0.1:{port}" in line


@pytest.mark.parametrize(
    "argv, named",
    [
        (["serve", "--bank", "b", "--port", "70000"], "argument --port: a port is 0 to 65535, got 70000"),
        (["search", "--key", "k", "--k", "-3"], "argument --k: must be at least 1, got -3"),
        (["search", "--key", "k", "--server", "host:99999"], "port 99999 of 'host:99999'"),
        (["classify", "x.png", "--server", "host"], "expected HOST:PORT, got 'host'"),
    ],
)
def test_arguments_out_of_range(argv: list[str], named: str) -> None:
    assert named in one_error_line(cli(*argv))


def test_classify_given_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "photos").mkdir()
    assert main(["classify", str(tmp_path / "photos"), "--server", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert f"image {tmp_path / 'photos'} cannot be read: it is a folder" in err
    assert main(["search", str(tmp_path / "gone.png"), "--server", "127.0.0.1:1"]) == 2
    assert f"image {tmp_path / 'gone.png'} does not exist" in capsys.readouterr().err
