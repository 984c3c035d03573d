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


def test_items_lists_and_counts_through_a_filter_on_a_server_and_a_bank(
    served: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    bank = served.server.config.bank
    even = sorted(f"{c}/1-{j}" for c in ("cat", "dog", "fox") for j in range(0, 10, 2))
    for where in (("--server", served.target), ("--bank", str(bank))):
        code, out, _ = run(capsys, "items", *where, "--filter", "meta.even == true", "--keys-only")
        assert code == 0 and out.split() == even  # in key order, every one, nothing else
        code, out, _ = run(capsys, "items", *where, "--filter", "meta.even == true", "--count")
        assert (code, out.strip()) == (0, "15")
        code, out, _ = run(capsys, "items", *where, "--filter", 'meta.even == false and label == "cat"',
                           "--format", "jsonl", "--metadata")
        rows = [json.loads(line) for line in out.splitlines()]
        assert len(rows) == 5 and all(r["label"] == "cat" and r["metadata"]["even"] is False
                                      for r in rows)
        code, out, _ = run(capsys, "items", *where, "--filter", "meta.even == true", "--label", "dog",
                           "--count")
        assert (code, out.strip()) == (0, "5")  # --label narrows the filter's items further
        code, out, err = run(capsys, "items", *where, "--filter", "meta.even ==")
        assert code == 2 and out == "" and "position" in err
