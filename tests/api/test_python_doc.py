"""docs/python.md is a notebook session that runs: every example there is a doctest here,
with a real bank on disk, the shipped digits CNN, and a real server on a loopback port."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "python.md"


def test_python_doc_session_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pandas")  # the session shows to_pandas(); pandas is optional
    monkeypatch.chdir(tmp_path)  # the session creates "digits.bank" where it runs
    result = doctest.testfile(
        str(DOC), module_relative=False, optionflags=doctest.ELLIPSIS, verbose=False,
        report=True,
    )
    assert result.attempted > 20, result
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {DOC} failed"
    assert (tmp_path / "digits.bank" / "store").is_dir()
