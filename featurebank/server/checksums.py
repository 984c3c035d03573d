"""crc32s of snapshot files, each byte read once (server/replication.py, replication_copy.py).

Why `crc32_combine`: a snapshot chunk carries the crc32 of its data, and a file's last
chunk the crc32 of the whole file. Both sides used to run zlib.crc32 over every byte twice
(once per chunk, once for the file); combining the chunks' crc32s gives the file's from
the first pass alone. zlib has crc32_combine but Python does not expose it, so this is
zlib's own method (the crc32 of `n` zero bytes is a linear operator over GF(2), a 32x32
bit matrix), with the operator cached per length: chunks are mostly one length, so a
combine costs 32 shifts and xors.
"""

from __future__ import annotations

import functools
import os
import zlib

_POLY = 0xEDB88320  # the reflected crc32 polynomial zlib uses
_Matrix = tuple[int, ...]  # 32 columns: the image of each bit


def _times(matrix: _Matrix, vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _compose(a: _Matrix, b: _Matrix) -> _Matrix:
    return tuple(_times(a, column) for column in b)


@functools.lru_cache(maxsize=64)
def _zeros(length: int) -> _Matrix:
    """The operator that turns crc32(A) into crc32(A + `length` zero bytes), unconditioned."""
    power: _Matrix = (_POLY, *(1 << n for n in range(31)))  # one zero bit
    for _ in range(3):  # 8 zero bits: one zero byte
        power = _compose(power, power)
    result: _Matrix = tuple(1 << n for n in range(32))  # identity
    while length:
        if length & 1:
            result = _compose(power, result)
        length >>= 1
        if length:
            power = _compose(power, power)
    return result


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """zlib.crc32(A + B) from crc1 = zlib.crc32(A), crc2 = zlib.crc32(B) and len(B)."""
    if length2 <= 0:
        return crc1
    return _times(_zeros(length2), crc1) ^ crc2


def crc32_prefix(path: os.PathLike[str] | str, size: int) -> int:
    """zlib.crc32 of a file's first `size` bytes (where a resumed stream starts)."""
    crc, left = 0, size
    with open(path, "rb") as f:
        while left > 0 and (block := f.read(min(left, 8 << 20))):
            crc, left = zlib.crc32(block, crc), left - len(block)
    return crc
