"""The client commands against a real server: search, labels set, rebuild, errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from featurebank.cli import main
from featurebank.server.app import ServeConfig
from featurebank.server.auth import Tokens
from featurebank.server.client import FeatureBankClient, RemoteError
from tests.support.server import RunningServer, free_port, make_vector_bank

DIM = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    bank = make_vector_bank(tmp_path_factory.mktemp("cli") / "bank", dim=DIM, n_per_class=10)
    tokens = Tokens({"read": ["r0"], "write": ["w0"]})
    with RunningServer(ServeConfig(bank=bank, port=free_port(), tokens=tokens)) as rs:
        yield rs


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_search_by_key(served: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "search", "--key", "dog/1-0", "--k", "3",
                       "--server", served.target, "--token", "r0")
    assert code == 0
    header, *lines = out.strip().splitlines()
    assert header.split() == ["score", "label", "key"]
    assert len(lines) == 3 and all(" dog " in line for line in lines)
    code, out, _ = run(capsys, "search", "--key", "dog/1-0", "--k", "2", "--json",
                       "--server", served.target, "--token", "r0")
    assert len(json.loads(out)["neighbors"]) == 2


def test_labels_set_and_rebuild(served: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "labels", "set", "cat/1-0=lynx", "cat/1-1=",
                       "--server", served.target, "--token", "w0")
    assert code == 0 and "updated 2 labels" in out
    code, out, _ = run(capsys, "rebuild", "--factory", "Flat",
                       "--server", served.target, "--token", "w0")
    assert code == 0 and "rebuilt: index generation" in out


def test_labels_set_from_a_csv_file(
    served: RunningServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The same key,label[,split] format as `featurebank labels import`."""
    (tmp_path / "labels.csv").write_text("key,label\ncat/1-2,tiger\ncat/1-3,\n")
    code, out, _ = run(capsys, "labels", "set", "--from-csv", str(tmp_path / "labels.csv"),
                       "--server", served.target, "--token", "w0")
    assert code == 0 and "updated 2 labels" in out
    code, out, _ = run(capsys, "search", "--key", "cat/1-0", "--k", "9", "--json",
                       "--server", served.target, "--token", "r0")
    labels = {n["key"]: n.get("label", "") for n in json.loads(out)["neighbors"]}
    assert labels["cat/1-2"] == "tiger" and labels["cat/1-3"] == ""
    (tmp_path / "bad.csv").write_text("cat/1-2,a\ncat/1-2,b\n")
    code, _, err = run(capsys, "labels", "set", "--from-csv", str(tmp_path / "bad.csv"),
                       "--server", served.target, "--token", "w0")
    assert code == 2 and "appears twice" in err


def test_errors_exit_2_with_the_status(
    served: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "labels", "set", "cat/1-0=x", "--server", served.target,
                       "--token", "r0")
    assert code == 2 and "PERMISSION_DENIED" in err and "write token" in err
    code, _, err = run(capsys, "search", "--key", "nope", "--server", served.target,
                       "--token", "r0")
    assert code == 2 and "NOT_FOUND" in err and "nope" in err
    code, _, err = run(capsys, "labels", "set", "no-equals-sign", "--server", served.target)
    assert code == 2 and "KEY=LABEL" in err


def test_failed_rebuild_exits_nonzero_in_json_mode_too(
    served: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["rebuild", "--factory", "NoSuchIndex", "--server", served.target, "--token", "w0"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "NoSuchIndex" in err
    code, out, _ = run(capsys, *argv, "--json")
    assert code != 0 and "NoSuchIndex" in out


def test_an_imported_bank_serves_vectors_and_keys_and_refuses_images(tmp_path: Path) -> None:
    """Embeddings made elsewhere (`store import --model NAME`) are served through the real CLI."""
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((2, DIM)).astype(np.float32) * 3
    x = np.concatenate([centres[i] + 0.1 * rng.standard_normal((20, DIM)) for i in (0, 1)])
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    keys = [f"{'ab'[i // 20]}-{i}" for i in range(40)]
    (tmp_path / "keys.txt").write_text("\n".join(keys) + "\n")
    (tmp_path / "labels.csv").write_text("".join(f"{k},{k[0]}\n" for k in keys))
    bank = tmp_path / "bank"
    assert main(["store", "import", "--bank", str(bank), "--vectors", str(tmp_path / "x.npy"),
                 "--keys", str(tmp_path / "keys.txt"), "--labels", str(tmp_path / "labels.csv"),
                 "--model", "clip-vit-b32"]) == 0
    assert main(["index", "build", "--bank", str(bank), "--k", "5"]) == 0
    port = free_port()
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "featurebank", "serve", "--bank", str(bank),
                             "--port", str(port)], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        with FeatureBankClient(f"127.0.0.1:{port}", timeout=30) as client:
            client.wait_until_serving(timeout=120)
            assert client.classify(vector=centres[1]).labels[0].label == "b"
            assert client.classify(key="a-3").labels[0].label == "a"
            assert {n.key[0] for n in client.search(key="b-25", k=3).neighbors} == {"b"}
            Image.new("RGB", (16, 16), "red").save(tmp_path / "red.png")
            with pytest.raises(RemoteError) as e:
                client.classify(tmp_path / "red.png")
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "no model to embed images" in str(e.value)
            info = client.info()
            assert info.spec.backbone == "clip-vit-b32"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "there is no model" not in err


def test_stacked_abstention_error_does_not_suggest_retraining(tmp_path: Path) -> None:
    from featurebank.classify.head_training import train_head

    bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=10)
    train_head(bank, epochs=5, folds=2, stacked=True)
    with (
        RunningServer(ServeConfig(bank=bank, port=free_port())) as rs,
        FeatureBankClient(rs.target) as client,
        pytest.raises(RemoteError) as e,
    ):
        client.classify(key="cat/1-0", mode="stacked", abstain_below=0.9)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "'stacked'" in e.value.details and "retrain" not in e.value.details
    assert "abstain with one of those" in e.value.details


def test_token_on_the_command_line_is_refused_beside_the_variable(
    served: RunningServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--token VALUE` shows in `ps`: with $FEATUREBANK_TOKEN set it is refused, not preferred."""
    monkeypatch.setenv("FEATUREBANK_TOKEN", "r0")
    code, _, err = run(capsys, "search", "--key", "dog/1-0", "--k", "1",
                       "--server", served.target, "--token", "r0")  # fmt: skip
    assert code == 2 and "drop --token" in err and "r0" not in err, err
    code, out, _ = run(capsys, "search", "--key", "dog/1-0", "--k", "1", "--server", served.target)
    assert code == 0 and " dog " in out  # the variable alone
