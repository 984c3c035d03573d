"""Giving freed heap memory back to the operating system after a big temporary job.

glibc keeps memory that a program frees in its allocator arenas. An index build
allocates far more for a moment (training, tuning, ground truth) than the index it
leaves; a long-running server that rebuilds would hold about that peak as resident
memory afterwards, although nothing uses it. `release_free_memory` asks glibc to
return it (`malloc_trim`); elsewhere it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import threading
from collections.abc import Iterator
from typing import Any


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_free_memory() -> bool:
    """Return freed heap pages to the OS; True when the C library could (glibc)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


M_ARENA_MAX = -8  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
M_TRIM_THRESHOLD = -1
MMAP_THRESHOLD = 128 * 1024  # glibc's starting value, kept from then on
TRIM_THRESHOLD = 128 * 1024  # glibc's default
STREAMING_MMAP_THRESHOLD = 32 << 20  # glibc's largest dynamic threshold
STREAMING_TRIM_THRESHOLD = 256 << 20


def limit_arenas(count: int) -> bool:
    """At most `count` glibc malloc arenas for this process (call before threads start).

    glibc gives each thread that allocates under contention an arena of its own (up to
    8 per core) and keeps each arena's freed memory; a server whose many threads take
    turns building, loading and dropping indexes then holds several copies of that
    churn. A few shared arenas keep resident memory near what is in use.
    """
    return _mallopt(M_ARENA_MAX, count)


def fix_mmap_threshold() -> bool:
    """Serve every allocation above 128 KiB from a mapping of its own, returned on free.

    glibc starts there, but each such free raises the threshold to the freed size (up to
    32 MiB); after a fold or rebuild freed its copies of the vectors and graph, later
    buffers of that size come from the heap, which keeps their freed space. In 60 s soaks
    with four streaming writers folding twice (benchmarks/soak.py) the server's own
    memory ended at 1.54-1.63x a fresh server's on the same bank; with the threshold
    fixed, at 1.16-1.29x.
    """
    global _fresh_mappings
    _fresh_mappings = _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    return _fresh_mappings


_fresh_mappings = False  # every big buffer a mapping of its own (fix_mmap_threshold)


def _mallopt(param: int, value: int) -> bool:
    """glibc's mallopt; False where the C library has none (or it refused)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(param, value))


_streams = 0
_streams_lock = threading.Lock()


@contextlib.contextmanager
def streaming_buffers() -> Iterator[None]:
    """While a snapshot streams through this process: buffers of up to 32 MiB from the
    heap, whose freed space is kept and used again.

    Why: with the threshold fixed (above), each 4 MiB chunk a snapshot stream reads,
    encodes and hands to gRPC is a fresh mapping whose every page faults on first touch.
    A 1.1 GiB bootstrap took 1.43 million page faults and 5.4-6.1 s of the primary's CPU;
    with the heap serving the chunks, 6-11 thousand faults and 1.2 s. The threshold is fixed
    again, and the heap trimmed, when the last stream ends (streams are rare: a replica's
    bootstrap).
    """
    global _streams
    with _streams_lock:
        _streams += 1
        if _streams == 1:
            _mallopt(M_MMAP_THRESHOLD, STREAMING_MMAP_THRESHOLD)
            _mallopt(M_TRIM_THRESHOLD, STREAMING_TRIM_THRESHOLD)
    try:
        yield
    finally:
        with _streams_lock:
            _streams -= 1
            if _streams == 0:
                _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                _mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                release_free_memory()


def _hugepage_switch() -> Any:
    """numpy's switch for its huge-page hint on big arrays (None where it has none)."""
    import numpy as np

    core = getattr(np, "_core", None) or getattr(np, "core", None)
    return getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)


_small = 0
_small_lock = threading.Lock()
_hint_was = True


@contextlib.contextmanager
def small_pages() -> Iterator[None]:
    """While a job of short-lived big temporaries runs: numpy's arrays without its
    huge-page hint (madvise MADV_HUGEPAGE on arrays of 4 MiB and more).

    Why: where the kernel compacts memory for hinted regions on first touch (Debian's
    and Ubuntu's default `transparent_hugepage/defrag = madvise`), each fresh 2 MiB page
    of a temporary can stall while the kernel assembles it. The quality pass makes and
    drops hundreds of MiB of them: its 100k update in process (benchmarks/quality_bench.py's
    speed case) took 0.81-1.07 s with the hint in eight runs and 0.67-0.82 s without in
    six. Long-lived arrays made outside the job keep the hint.

    Where every big buffer is a fresh mapping (`fix_mmap_threshold`: `featurebank serve`)
    the hint is kept: there each temporary faults in whole, and 2 MiB pages take a 512th of
    the faults. Served, the same update took 0.52-0.72 s with the hint and 0.70-0.79 s
    without (three runs each, alternated).
    """
    global _small, _hint_was
    switch = _hugepage_switch()
    if switch is None or _fresh_mappings:
        yield
        return
    with _small_lock:
        _small += 1
        if _small == 1:
            _hint_was = bool(switch(False))
    try:
        yield
    finally:
        with _small_lock:
            _small -= 1
            if _small == 0:
                switch(_hint_was)
