"""SIGKILL a serving process at random moments while clients write: nothing acknowledged is lost.

Each trial restarts the server on the bank the previous trial killed, checks that
every Upsert acknowledged so far is stored and found by the first searches after
SERVING (the restarted server catches up from the store before it reports
SERVING), then writes from several clients with checkpoints folding every few
items, and kills the process with SIGKILL at a random moment (in a commit, a
catch-up, a fold or between them).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.server.client import FeatureBankClient, RemoteError
from tests.support.server import free_port, make_vector_bank

DIM = 16
ROOT = Path(__file__).resolve().parents[2]


def serve(bank: Path, port: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "featurebank", "serve", "--bank", str(bank), "--port", str(port),
           "--checkpoint-items", "40", "--checkpoint-seconds", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def write_until_killed(target: str, acked: dict[str, np.ndarray], trial: int,
                       proc: subprocess.Popen[str], rng: random.Random) -> None:
    stop = threading.Event()
    lock = threading.Lock()

    def writer(w: int) -> None:
        gen = np.random.default_rng(1000 * trial + w)
        with FeatureBankClient(target, timeout=30) as client:
            call = 0
            while not stop.is_set():
                rows = {f"t{trial}/w{w}/{call}/{i}": gen.normal(size=DIM).astype(np.float32)
                        for i in range(1 + call % 3)}
                try:
                    client.upsert([{"key": k, "vector": v} for k, v in rows.items()])
                except RemoteError:
                    return  # killed mid-call: not acknowledged
                with lock:
                    acked.update(rows)
                call += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    time.sleep(rng.uniform(0.3, 2.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    stop.set()
    for t in threads:
        t.join(60)


def check_everything_acknowledged(
    bank: Path, target: str, acked: dict[str, np.ndarray], base: int, latest: str,
    rng: random.Random,
) -> None:
    """Every acknowledged key is stored; those of the last trial (and a sample of older
    ones) are found first by a search for their vector right after SERVING."""
    keys = [k for k in acked if k.startswith(latest)]
    older = [k for k in acked if not k.startswith(latest)]
    keys += rng.sample(older, min(len(older), 200))
    with FeatureBankClient(target, timeout=60) as client:
        client.wait_until_serving(timeout=120)
        lost = [k for k in keys if client.search(vector=acked[k], k=1).neighbors[0].key != k]
        assert not lost, f"{len(lost)} acknowledged items not found after restart: {lost[:5]}"
        with store_mod.open(bank, readonly=True) as st:  # a reader beside the serving writer
            assert st.missing(list(acked)) == []
        stored = client.info()
        assert stored.count >= base + len(acked)  # (keys are unique: nothing acknowledged gone)
        assert stored.index.ntotal == stored.count  # generation + segment cover the whole store


def run_trials(tmp_path: Path, trials: int, seed: int) -> None:
    bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=20)
    base = 20 * 3
    acked: dict[str, np.ndarray] = {}
    rng = random.Random(seed)
    for trial in range(trials + 1):
        port = free_port()
        proc = serve(bank, port)
        try:
            check_everything_acknowledged(bank, f"127.0.0.1:{port}", acked, base, f"t{trial - 1}/",
                                          rng)
            if trial < trials:
                write_until_killed(f"127.0.0.1:{port}", acked, trial, proc, rng)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)
    assert len(acked) > 0


def test_sigkill_while_writing_loses_nothing_acknowledged(tmp_path: Path) -> None:
    run_trials(tmp_path, trials=2, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sigkill_at_random_moments_many_trials(tmp_path: Path) -> None:
    run_trials(tmp_path, trials=12, seed=2)
