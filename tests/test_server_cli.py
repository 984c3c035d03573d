"""The client commands against a real server: search, labels set, rebuild, errors."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from server_fixtures import RunningServer, free_port, make_vector_bank

from featurebank.cli import main
from featurebank.server.app import ServeConfig
from featurebank.server.auth import Tokens

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
    lines = out.strip().splitlines()
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
