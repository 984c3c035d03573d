"""Writing a large file fast and durably (a replica copying a snapshot).

Why `preallocate`: appending a gigabyte to a file on ext4 in 4 MiB writes measured several
times slower than writing into blocks allocated beforehand (the allocation is then one
call, not one per write). It allocates the rest of a file without changing its size (the
size is how much of it a resumed copy holds). A hint: where fallocate is missing or
refused, nothing changes but the speed.

Why `Appender`: the page cache is the slow part of writing a copy that is fsynced at once.
On this project's 2-core machine, 1 GiB of 4 MiB write()s took 2.6-3.8 s into the page
cache (when the memory it lands in is touched for the first time) and 0.7-0.9 s with
O_DIRECT, which also leaves nothing for fsync to write. So whole blocks go straight to
disk from one reused aligned buffer, and only a file's unaligned tail goes through the
page cache; where O_DIRECT is refused (tmpfs, some network file systems) everything does.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
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


BLOCK = 4096  # O_DIRECT's alignment of buffers, offsets and lengths (the page size covers all)


class Appender:
    """Appends to one file: whole blocks by O_DIRECT where the file allows it, the rest
    (and everything where it is refused) by plain write()."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.size = os.fstat(self.fd).st_size
        self._direct: int | None = None
        self._buffer: mmap.mmap | None = None
        if hasattr(os, "O_DIRECT"):
            with contextlib.suppress(OSError):  # refused: plain writes
                self._direct = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_DIRECT)

    @property
    def direct(self) -> bool:
        """Whether whole blocks still go past the page cache."""
        return self._direct is not None

    def append(self, data: bytes) -> None:
        view, done = memoryview(data), 0
        whole = len(view) // BLOCK * BLOCK
        if self._direct is not None and whole and self.size % BLOCK == 0:
            done = self._append_direct(view[:whole])
        while done < len(view):
            done += os.write(self.fd, view[done:])
        self.size += len(view)

    def _append_direct(self, view: memoryview) -> int:
        """Bytes written (0 where O_DIRECT turned out to be refused: plain writes from then on)."""
        if self._buffer is None or len(self._buffer) < len(view):
            if self._buffer is not None:
                self._buffer.close()
            self._buffer = mmap.mmap(-1, len(view))  # page-aligned, as O_DIRECT needs
        self._buffer[: len(view)] = view
        try:
            return os.write(self._direct, memoryview(self._buffer)[: len(view)])  # type: ignore[arg-type]
        except OSError:  # EINVAL: a device wanting a larger alignment
            self._close_direct()
            return 0

    def _close_direct(self) -> None:
        if self._direct is not None:
            os.close(self._direct)
            self._direct = None
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None

    def sync_and_close(self) -> None:
        try:
            os.fsync(self.fd)
        finally:
            self.close()

    def close(self) -> None:
        self._close_direct()
        os.close(self.fd)
