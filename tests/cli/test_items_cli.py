"""`featurebank items | labels list | delete | store compact | info`, labels files with a
header, a byte-order mark or another encoding, and output into a closed pipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from featurebank import store as store_mod
from featurebank.cli import main
from featurebank.server.app import ServeConfig
from tests.support.server import RunningServer, free_port, make_vector_bank

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def vbank(tmp_path: Path) -> Path:
    """30 items: cat/dog/fox, every fifth in val."""
    return make_vector_bank(tmp_path / "bank", dim=8, n_per_class=10, index=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_items_lists_and_filters(vbank: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "items", "--bank", str(vbank))
    lines = out.splitlines()
    assert code == 0 and lines[0] == "key\tlabel\tsplit" and len(lines) == 31
    assert lines[1] == "cat/1-0\tcat\tval"
    code, out, _ = run(capsys, "items", "--bank", str(vbank), "--label", "dog", "--split", "val",
                       "--format", "jsonl", "--metadata")  # fmt: skip
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["key"] for r in rows] == ["dog/1-0", "dog/1-5"]
    assert all(r["label"] == "dog" and r["split"] == "val" and "added" in r["metadata"]
               for r in rows)  # fmt: skip
    code, out, _ = run(capsys, "items", "--bank", str(vbank), "--label", "fox", "--keys-only")
    assert out.splitlines() == [f"fox/1-{i}" for i in range(10)]
    with store_mod.open(vbank) as st:
        st.set_labels({"fox/1-0": None})
    code, out, _ = run(capsys, "items", "--bank", str(vbank), "--unlabelled", "--format", "csv")
    assert out.splitlines() == ["key,label,split", "fox/1-0,,val"]


def test_labels_list(vbank: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with store_mod.open(vbank) as st:
        st.set_labels({"fox/1-0": None, "fox/1-1": "cat"})
    code, out, _ = run(capsys, "labels", "list", "--bank", str(vbank))
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["label", "items"]
    assert [ln.split() for ln in lines[1:4]] == [["cat", "11"], ["dog", "10"], ["fox", "8"]]
    assert lines[4] == "3 labels; 29 items labelled, 1 not"
    code, out, _ = run(capsys, "labels", "list", "--bank", str(vbank), "--json")
    assert json.loads(out) == {"labels": {"cat": 11, "dog": 10, "fox": 8}, "unlabelled": 1}


def test_delete_from_arguments_and_a_file_then_compact(
    vbank: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "delete", "cat/1-0", "cat/1-1", "--bank", str(vbank))
    assert code == 0 and "deleted 2 keys" in out
    (tmp_path / "keys.txt").write_text("dog/1-0\ndog/1-1\n\n")
    code, out, _ = run(capsys, "delete", "--from", str(tmp_path / "keys.txt"), "--bank", str(vbank))
    assert code == 0 and "deleted 2 keys" in out
    code, _, err = run(capsys, "delete", "nope", "cat/1-2", "--bank", str(vbank))
    assert code == 2 and "'nope'" in err
    code, out, _ = run(capsys, "delete", "nope", "cat/1-2", "--ignore-missing", "--bank", str(vbank))
    assert code == 0 and "deleted 1 keys" in out
    code, _, err = run(capsys, "delete", "--bank", str(vbank))
    assert code == 2 and "no keys given" in err
    with store_mod.open(vbank, readonly=True) as st:
        assert st.count == 25 and st.stats()["deleted_pending_compact"] == 5
    code, out, _ = run(capsys, "store", "compact", "--bank", str(vbank))
    assert code == 0 and "5 deleted rows removed" in out
    with store_mod.open(vbank, readonly=True) as st:
        assert st.count == 25 and st.stats()["deleted_pending_compact"] == 0
        assert not st.has("cat/1-0") and st.has("cat/1-3")


def test_info_and_delete_through_a_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bank = make_vector_bank(tmp_path / "bank", dim=8, n_per_class=10)
    with RunningServer(ServeConfig(bank=bank, port=free_port())) as rs:
        code, out, _ = run(capsys, "info", "--server", rs.target)
        assert code == 0
        fields = dict(line.split(None, 1) for line in out.splitlines())
        assert fields["count"] == "30" and fields["labels"] == "cat, dog, fox"
        assert fields["spec.dim"] == "8" and "index.generation" in fields
        code, out, _ = run(capsys, "delete", "cat/1-0", "--server", rs.target)
        assert code == 0 and "deleted 1 keys" in out
        code, out, _ = run(capsys, "info", "--server", rs.target, "--json")
        assert json.loads(out)["count"] == "29"  # uint64 fields are strings in JSON


def test_labels_file_with_a_header_a_bom_or_another_encoding(
    vbank: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "excel.csv").write_bytes("\ufeffpath,class\ncat/1-0,lynx\n".encode())
    code, out, err = run(capsys, "labels", "import", "--bank", str(vbank), str(tmp_path / "excel.csv"))
    assert code == 0, err
    with store_mod.open(vbank, readonly=True) as st:
        assert st.get_by_keys(["cat/1-0"]).labels == ["lynx"]
        assert not st.has("path")
    (tmp_path / "latin1.csv").write_bytes("key,label\ncat/1-1,chat\ncat/1-2,caf\xe9\n".encode("latin-1"))
    code, _, err = run(capsys, "labels", "import", "--bank", str(vbank), str(tmp_path / "latin1.csv"))
    assert code == 2 and f"{tmp_path / 'latin1.csv'} line 3: not UTF-8 text" in err


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    bank = make_vector_bank(tmp_path / "bank", dim=4, n_per_class=2000, index=False)
    proc = subprocess.Popen([sys.executable, "-m", "featurebank", "items", "--bank", str(bank)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"key\tlabel\tsplit\n"  # as `| head -1` reads
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == "", err


def test_suggest_prints_a_header(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bank = make_vector_bank(tmp_path / "bank", dim=8, n_per_class=10)
    with store_mod.open(bank) as st:
        st.set_labels({"cat/1-1": None, "dog/1-1": None})
    code, out, _ = run(capsys, "suggest", "--bank", str(bank), "--n", "2", "--mode", "knn")
    header, *rows = out.splitlines()
    assert code == 0 and header.split()[:3] == ["score", "key", "guesses"]
    assert sorted(r.split()[1] for r in rows) == ["cat/1-1", "dog/1-1"]
