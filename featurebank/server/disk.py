"""Allocating a file's blocks ahead, where the platform can (a replica copying a snapshot).

Why: appending a gigabyte to a file on ext4 in 4 MiB writes measured several times slower
than writing into blocks allocated beforehand (the allocation is then one call, not one per
write). `preallocate` allocates the rest of a file without changing its size (the size is
how much of it a resumed copy holds). A hint: where fallocate is missing or refused,
nothing changes but the speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

_FALLOC_FL_KEEP_SIZE = 0x01


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def preallocate(fd: int, offset: int, length: int) -> None:
    """Allocate bytes [offset, offset + length) of the file, keeping its size."""
    if _LIBC is not None and length > 0:
        _LIBC.fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length)
