"""Freed heap goes back to the OS when asked (what keeps a rebuilding server's RSS flat)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import ctypes, sys
from featurebank.core.memory import limit_arenas, release_free_memory

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024

assert limit_arenas(2)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
base = rss()
blocks, kept = [], []
for _ in range(3000):  # 190 MB of heap blocks, each followed by a small one that stays
    blocks.append(libc.malloc(65536))
    kept.append(libc.malloc(16))
for b in blocks:
    ctypes.memset(b, 1, 65536)
for b in blocks:
    libc.free(b)  # the holes between kept blocks cannot shrink the heap
held = rss()
assert release_free_memory()
print(base, held, rss())
"""


def test_release_free_memory_returns_freed_heap_to_the_os() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    base, held, after = map(int, out.split())
    assert held - base > 100, (base, held, after)  # glibc kept (most of) the freed blocks
    assert after - base < 30, (base, held, after)  # and gave them back when asked


THRESHOLD_SCRIPT = """
import ctypes, sys
from featurebank.core.memory import fix_mmap_threshold

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024

if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
big = libc.malloc(16 << 20)  # a fold's copy: freed, it raises glibc's threshold to 16 MiB
ctypes.memset(big, 1, 16 << 20)
libc.free(big)
base = anon()
blocks, kept = [], []
for _ in range(40):  # 160 MiB of 4 MiB buffers, each followed by a 64 KiB one that stays
    blocks.append(libc.malloc(4 << 20))
    kept.append(libc.malloc(65536))
    ctypes.memset(blocks[-1], 1, 4 << 20)
for b in blocks:
    libc.free(b)
print(base, anon())
"""


def held_after_free(mode: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", THRESHOLD_SCRIPT, mode], env=env, cwd=ROOT,
                         check=True, capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    base, after = map(int, out.split())
    return after - base


def test_a_fixed_mmap_threshold_returns_freed_large_buffers_at_once() -> None:
    assert held_after_free("default") > 100  # glibc kept the freed buffers in its heap
    assert held_after_free("fixed") < 20  # each was a mapping of its own, unmapped on free


def _advised_hugepages(a: object) -> bool:
    """Whether the mapping holding the middle of array `a`'s data was advised
    MADV_HUGEPAGE ('hg' in its VmFlags, /proc/self/smaps; numpy advises from the first
    2 MiB boundary on, so the mapping's head is split off without it)."""
    import numpy as np

    arr = np.asarray(a)
    at = arr.ctypes.data + arr.nbytes // 2
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= at < hi
        elif inside and head == "VmFlags:":
            return "hg" in line.split()[1:]
    raise AssertionError("no mapping holds the array")


SMALL_PAGES_SCRIPT = """
import numpy as np
from tests.core.test_memory import _advised_hugepages
from featurebank.core.memory import _hugepage_switch, small_pages

_hugepage_switch()(True)
before = np.ones(8 << 20)  # 64 MiB: numpy hints arrays from 4 MiB on
with small_pages(), small_pages():  # nested, as two banks' passes at once
    within = np.ones(8 << 20)
after = np.ones(8 << 20)
print(*(_advised_hugepages(a) for a in (before, within, after)))
"""


def _hinted(script: str) -> list[str]:
    """What a script printed, run in a process of its own (the hint and glibc's mmap
    threshold are the whole process's)."""
    import pytest

    from featurebank.core.memory import _hugepage_switch

    if _hugepage_switch() is None or not Path("/proc/self/smaps").exists():
        pytest.skip("numpy without its huge-page switch, or no /proc/self/smaps")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, check=True,
                          capture_output=True, text=True, timeout=120).stdout.split()


def test_small_pages_leaves_arrays_made_within_without_the_huge_page_hint() -> None:
    assert _hinted(SMALL_PAGES_SCRIPT) == ["True", "False", "True"]


FRESH_MAPPINGS_SCRIPT = """
import sys
import numpy as np
from tests.core.test_memory import _advised_hugepages
from featurebank.core.memory import _hugepage_switch, fix_mmap_threshold, small_pages

assert fix_mmap_threshold()
_hugepage_switch()(True)
with small_pages():
    within = np.ones(8 << 20)
print(_advised_hugepages(within))
"""


def test_small_pages_keeps_the_hint_where_every_big_buffer_is_a_fresh_mapping() -> None:
    """As in `featurebank serve` (fix_mmap_threshold), where huge pages make a fresh
    temporary's faults fewer."""
    assert _hinted(FRESH_MAPPINGS_SCRIPT) == ["True"]
