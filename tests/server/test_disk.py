"""Appending a snapshot's files past the page cache (server/disk.py), on real file systems:
the temporary folder (ext4 or xfs here) and tmpfs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from featurebank.server.disk import BLOCK, Appender

SHM = Path("/dev/shm")


def chunks(sizes: list[int]) -> list[bytes]:
    return [os.urandom(n) for n in sizes]


def append_all(path: Path, parts: list[bytes]) -> Appender:
    out = Appender(path)
    for part in parts:
        out.append(part)
    out.sync_and_close()
    return out


@pytest.mark.parametrize("sizes", [
    [4 * BLOCK, 4 * BLOCK, 100],  # whole blocks, then a file's unaligned tail
    [3 * BLOCK + 7, 2 * BLOCK, BLOCK],  # unaligned in the middle: plain writes from there on
    [1, BLOCK - 1, BLOCK, 5],  # back on a block boundary: whole blocks past the cache again
])
def test_appended_bytes_are_the_chunks_in_order(tmp_path: Path, sizes: list[int]) -> None:
    parts = chunks(sizes)
    out = append_all(tmp_path / "f", parts)
    assert (tmp_path / "f").read_bytes() == b"".join(parts)
    assert out.size == sum(sizes)


def test_a_resumed_file_continues_from_its_size_whatever_it_is(tmp_path: Path) -> None:
    held = os.urandom(BLOCK + 123)  # a copy cut in the middle of a plain write
    (tmp_path / "f").write_bytes(held)
    out = Appender(tmp_path / "f")
    assert out.size == len(held)
    rest = chunks([2 * BLOCK, BLOCK, 9])
    for part in rest:
        out.append(part)
    out.close()
    assert (tmp_path / "f").read_bytes() == held + b"".join(rest)


def test_on_tmpfs_the_same_bytes_arrive() -> None:
    if not SHM.is_dir():
        pytest.skip("no tmpfs at /dev/shm")
    path = SHM / f"featurebank-test-{os.getpid()}"
    try:
        parts = chunks([4 * BLOCK, BLOCK + 1, 2 * BLOCK])
        append_all(path, parts)
        assert path.read_bytes() == b"".join(parts)
    finally:
        path.unlink(missing_ok=True)


def test_whole_blocks_go_past_the_page_cache_where_the_file_system_allows(tmp_path: Path) -> None:
    out = Appender(tmp_path / "f")
    if not out.direct:
        out.close()
        pytest.skip(f"{tmp_path} refuses O_DIRECT")
    out.append(os.urandom(8 * BLOCK))
    assert out.direct  # the write was accepted, not fallen back from
    out.close()
