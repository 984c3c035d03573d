"""crc32s of snapshot files, each byte read once (server/replication.py, replication_copy.py).

A snapshot chunk carries the crc32 of its data, and a file's last chunk the crc32 of the
whole file, combined from its chunks' (`crc32_combine`), so every byte is summed once on
each side. Why ISA-L's crc32 and not zlib's: the values are the same (zlib's polynomial),
but zlib's ran at about 3 GiB/s here and was the largest single cost of a bootstrap on
both sides (about 0.5 s of CPU per GiB between them); ISA-L's runs at memory speed.
"""

from __future__ import annotations

import os

from isal.isal_zlib import crc32, crc32_combine

__all__ = ["crc32", "crc32_combine", "crc32_prefix"]


def crc32_prefix(path: os.PathLike[str] | str, size: int) -> int:
    """crc32 of a file's first `size` bytes (where a resumed stream starts)."""
    value, left = 0, size
    with open(path, "rb") as f:
        while left > 0 and (block := f.read(min(left, 8 << 20))):
            value, left = crc32(block, value), left - len(block)
    return value
