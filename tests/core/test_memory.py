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
