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
