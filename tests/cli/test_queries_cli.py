"""`featurebank search --filter ...` and `featurebank recommend` against a real server."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from featurebank.cli import main
from featurebank.server.app import ServeConfig
from featurebank.server.client import FeatureBankClient
from tests.support.server import RunningServer, free_port, make_vector_bank


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    bank = make_vector_bank(tmp_path_factory.mktemp("cliq") / "bank", dim=8, n_per_class=10)
    with RunningServer(ServeConfig(bank=bank, port=free_port())) as rs:
        with FeatureBankClient(rs.target) as client:
            keys = [n.key for n in client.scroll(limit=1000).items]
            client.set_metadata({k: {"even": int(k.rsplit("-", 1)[1]) % 2 == 0} for k in keys})
        yield rs


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_search_with_a_filter_and_groups(served: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "search", "--key", "dog/1-0", "--k", "4", "--json", "--metadata",
                       "--filter", "meta.even == false", "--server", served.target)
    assert code == 0
    hits = json.loads(out)["neighbors"]
    assert len(hits) == 4 and all(h["metadata"]["even"] is False for h in hits)
    code, out, _ = run(capsys, "search", "--key", "dog/1-0", "--k", "6", "--group-by", "label",
                       "--group-size", "2", "--json", "--server", served.target)
    labels = [h.get("label") for h in json.loads(out)["neighbors"]]
    assert code == 0 and max(labels.count(x) for x in labels) == 2


def test_a_malformed_filter_exits_2_naming_the_position(
    served: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "search", "--key", "dog/1-0", "--filter", "meta.even ==",
                       "--server", served.target)
    assert code == 2 and "INVALID_ARGUMENT" in err and "position 13" in err
    assert "Traceback" not in err


def test_recommend(served: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "recommend", "--pos", "dog/1-0", "--pos", "dog/1-1", "--neg",
                       "cat/1-0", "--k", "3", "--server", served.target)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 3 and all(" dog " in line for line in lines)
    assert not any(line.endswith(("dog/1-0", "dog/1-1")) for line in lines)
