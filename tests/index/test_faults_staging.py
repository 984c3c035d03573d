"""Staging folders of builds killed with SIGKILL are removed by the next build; live ones stay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from featurebank.core.bank import STAGING, remove_dead_staging
from featurebank.index.build import build_index
from featurebank.index.searcher import Searcher

ROOT = Path(__file__).resolve().parents[2]

HOLDER = """
import sys, time
from pathlib import Path
from featurebank.core.bank import staging_dir
staging = staging_dir(Path(sys.argv[1]))
(staging / "index.faiss").write_bytes(b"half written")
print(staging, flush=True)
time.sleep(600)
"""


def holder(indexes: Path) -> tuple[subprocess.Popen[str], Path]:
    """A process that made a staging folder the way a build does and is still in it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(indexes)], env=env,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)  # reaped: its pid is gone


def make_bank(root: Path) -> Path:
    from featurebank import store as store_mod
    from featurebank.core.spec import Spec

    spec = Spec(backbone="external", weights="external", input_size=None, resize="none",
                dim=8, dtype="float32")  # fmt: skip
    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    with store_mod.create(root, spec) as st:
        st.put_batch([f"k{i}" for i in range(300)], x, labels=["a", "b", "c"] * 100)
    return root


def test_next_build_removes_staging_of_killed_builds_only(tmp_path: Path) -> None:
    bank = make_bank(tmp_path / "bank")
    indexes = bank / "indexes"
    build_index(bank, factory="Flat", k=5)
    killed, dead = holder(indexes)
    live_proc, live = holder(indexes)
    try:
        kill(killed)
        assert dead.exists() and live.exists()
        old = indexes / f"{STAGING}otherhost-123-abcd"  # another machine's: judged by age only
        old.mkdir()
        manifest = build_index(bank, factory="Flat", k=5)
        assert not dead.exists(), "the killed build's staging folder is still there"
        assert live.exists(), "a running build's staging folder was removed"
        assert old.exists()
        os.utime(old, (time.time() - 25 * 3600,) * 2)
        kill(live_proc)
        assert sorted(p.name for p in remove_dead_staging(indexes)) == sorted([live.name, old.name])
        with Searcher.load(bank) as searcher:
            assert searcher.generation == manifest["generation"]
        assert not list(indexes.glob(f"{STAGING}*"))
    finally:
        for p in (killed, live_proc):
            if p.poll() is None:
                kill(p)
