"""What the operating system does with memory-mapped files: how much of one is resident in
a process, how to ask for random access, and how to drop one from the page cache (Linux,
read from /proc; elsewhere these report nothing and change nothing).

Why: an index whose lists are memory-mapped (index/stored_ids.py) is only as large in
memory as the pages its queries touched, and the only honest measure of that is the
kernel's own account of the mapping.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

_MADV_RANDOM = 1


def resident(pid: int, name: str) -> tuple[int, int]:
    """(resident bytes, mapped bytes) of the process's mappings of files called `name`."""
    rss = size = 0
    current = False
    try:
        lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    except OSError:
        return 0, 0
    for line in lines:
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            current = len(fields) >= 6 and fields[5].endswith("/" + name)
        elif current and fields[0] == "Rss:":
            rss += int(fields[1]) * 1024
        elif current and fields[0] == "Size:":
            size += int(fields[1]) * 1024
    return rss, size


def advise_random(path: Path) -> None:
    """Tell the kernel this process reads its mappings of `path` at random: without it each
    page fault reads ahead 128 KiB of neighbouring data (for an index: other lists)."""
    target = os.path.realpath(path)
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(v, 16) for v in fields[0].split("-"))
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_RANDOM)


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (written pages are flushed first), as after a
    restart; pages some process still maps stay."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
