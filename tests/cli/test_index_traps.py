"""`featurebank index build|update` while a server holds the bank, through the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from featurebank.cli import main
from featurebank.core.bank import current_generation
from featurebank.server.client import FeatureBankClient
from tests.support.server import free_port, make_vector_bank

ROOT = Path(__file__).resolve().parents[2]


def test_offline_builds_are_refused_while_a_server_holds_the_bank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bank = make_vector_bank(tmp_path / "bank", dim=8, n_per_class=10)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "featurebank", "serve", "--bank", str(bank),
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        with FeatureBankClient(f"127.0.0.1:{port}", timeout=30) as client:
            client.wait_until_serving(timeout=120)
        for command in ("build", "update"):
            assert main(["index", command, "--bank", str(bank)]) == 2
            err = capsys.readouterr().err
            assert f"held by process {proc.pid}" in err and "featurebank serve" in err
            assert "featurebank rebuild --server" in err
        assert current_generation(bank / "indexes") == 1  # nothing published beside it
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert main(["index", "build", "--bank", str(bank), "--k", "3"]) == 0  # once it is gone
    assert current_generation(bank / "indexes") == 2
