"""The store across processes: one writer, crash safety, snapshots, fork, full disk."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.core.errors import WriterBusy
from tests.support.specs import make_spec, make_vectors

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = f"""
import json, os, signal, sys, time
sys.path[:0] = [{str(ROOT)!r}]
import numpy as np
from tests.support.specs import make_spec
from featurebank import store

def batch_keys(b):
    return [f"b{{b:05d}}-{{i}}" for i in range(1 + (b * 7) % 23)]

def batch_vectors(b, dim):
    n = len(batch_keys(b))
    v = np.zeros((n, dim), np.float32)
    v[:, 0], v[:, 1] = b, np.arange(n)
    return v
"""


def start(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PRELUDE + code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_line(proc: subprocess.Popen[str], want: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != want:
        proc.kill()
        raise AssertionError(f"child said {line!r}, stderr: {proc.communicate()[1]}")


def batch_size(b: int) -> int:
    return 1 + (b * 7) % 23


def batches_in(items: store_mod.Items) -> dict[int, int]:
    """Batch number -> how many of its rows a scan holds (rows must also be in order)."""
    counts: dict[int, int] = {}
    for key, v in zip(items.keys, items.vectors, strict=True):
        b, i = (int(x) for x in key[1:].split("-"))
        assert v[0] == b and v[1] == i, (key, v[:2])
        counts[b] = counts.get(b, 0) + 1
    return counts


# ---- one writer -------------------------------------------------------------------------------

HOLD_LOCK = """
st = store.open(sys.argv[1])
st.acquire_writer()
print("ready", flush=True)
time.sleep(120)
"""


def test_second_writer_gets_writer_busy(bank: Path) -> None:
    with store_mod.create(bank, make_spec()) as st:
        st.put_batch(["a"], make_vectors(1))
    child = start(HOLD_LOCK, str(bank))
    try:
        wait_line(child, "ready")
        with store_mod.open(bank) as st:
            with pytest.raises(WriterBusy, match=f"process {child.pid}") as e:
                st.put_batch(["b"], make_vectors(1))
            assert str(bank) in str(e.value)
            with pytest.raises(WriterBusy):
                st.acquire_writer()
            assert st.count == 1 and st.get_by_keys(["a"]).keys == ["a"]  # reading is fine
            with pytest.raises(WriterBusy):
                store_mod.create(bank, make_spec(), exist_ok=True)
            child.send_signal(signal.SIGKILL)
            child.wait()
            st.put_batch(["b"], make_vectors(1))  # the dead writer's lock went with it
            assert st.count == 2
    finally:
        child.kill()
        child.communicate()


def test_stores_of_one_process_share_the_writer_lock(store: store_mod.Store) -> None:
    with store_mod.open(store.bank.root) as other:
        other.put_batch(["x"], make_vectors(1))
        store.put_batch(["y"], make_vectors(1))
    store.put_batch(["z"], make_vectors(1))
    assert store.count == 3


# ---- crashes ----------------------------------------------------------------------------------

CRASHING_WRITER = """
dim = 16
st = store.open_or_create(sys.argv[1], make_spec(dim=dim, dtype="float16"), block_rows=8)
keys = st.to_numpy().keys
b = max((int(k[1:].split("-")[0]) for k in keys), default=0)  # redo the last step's tail
print("started", flush=True)
while True:
    keys = batch_keys(b)
    if st.missing(keys):
        st.put_batch(keys, batch_vectors(b, dim), labels=[f"l{b}"] * len(keys))
    if b % 10 == 9 and st.has(batch_keys(b - 5)[0]):
        st.delete(batch_keys(b - 5))
    if b % 15 == 14:
        st.compact()
    b += 1
"""


def check_batches_whole(bank: Path) -> int:
    """Every batch is wholly there or wholly gone; returns the last batch written."""
    with store_mod.open(bank, readonly=True) as st:
        items = st.to_numpy()
        counts = batches_in(items)
        assert len(st.missing([k for k in items.keys])) == 0
    for b, n in counts.items():
        assert n == batch_size(b), f"batch {b} has {n} of {batch_size(b)} rows"
    last = max(counts, default=-1)
    for b in range(last + 1):
        deletable = b % 10 == 4
        if not deletable:
            assert b in counts, f"batch {b} lost (last {last})"
        elif b + 5 < last:
            assert b not in counts, f"batch {b} not deleted (last {last})"
    return last


def test_killed_writer_leaves_whole_batches(bank: Path) -> None:
    rng = random.Random(1234)
    last = -1
    for _round in range(6):
        child = start(CRASHING_WRITER, str(bank))
        wait_line(child, "started")
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate()
        assert child.returncode == -signal.SIGKILL, err
        now = check_batches_whole(bank)
        assert now >= last
        last = now
    assert last > 0
    assert len(list((bank / "store").glob("env-*"))) <= 2  # a crashed compaction's leftovers


# ---- consistent snapshots for readers ---------------------------------------------------------

SCANNING_READER = """
bank, stop = sys.argv[1], sys.argv[2]
st = store.open(bank, readonly=True)
print("ready", flush=True)
scans, problems = 0, []

def check(keys, vectors, labels):
    counts, seen_labels = {}, {}
    for key, v, lab in zip(keys, vectors, labels):
        b = int(v[0])
        counts[b] = counts.get(b, 0) + 1
        seen_labels.setdefault(b, set()).add(lab)
    for b, n in counts.items():
        if n != len(batch_keys(b)):
            problems.append(f"batch {b}: {n} rows")
        if len(seen_labels[b]) != 1:
            problems.append(f"batch {b}: labels {seen_labels[b]}")

while True:
    done = os.path.exists(stop)
    items = st.to_numpy()
    check(items.keys, items.vectors, items.labels)
    parts = list(st.iter_batches(batch_size=37))
    check([k for p in parts for k in p.keys], [v for p in parts for v in p.vectors],
          [lab for p in parts for lab in p.labels])
    scans += 1
    if done:
        break
print(json.dumps({"scans": scans, "problems": problems[:10], "gen": st.generation}))
"""


def test_reader_process_sees_consistent_snapshots(bank: Path) -> None:
    dim = 128
    with store_mod.create(bank, make_spec(dim=dim), block_rows=16, map_size=1 << 20) as st:
        stop = bank / "stop"
        reader = start(SCANNING_READER, str(bank), str(stop))
        try:
            wait_line(reader, "ready")
            for b in range(90):
                keys = [f"b{b:05d}-{i}" for i in range(batch_size(b))]
                v = np.zeros((len(keys), dim), np.float32)
                v[:, 0], v[:, 1] = b, np.arange(len(keys))
                st.put_batch(keys, v, labels=[f"l{b}"] * len(keys))
                if b % 3 == 2:  # relabel a whole earlier batch at once
                    old = [f"b{b - 1:05d}-{i}" for i in range(batch_size(b - 1))]
                    st.set_labels(dict.fromkeys(old, f"r{b - 1}"))
                if b % 10 == 9:
                    st.delete([f"b{b - 5:05d}-{i}" for i in range(batch_size(b - 5))])
                if b % 30 == 29:
                    st.compact()
            grown, gen = st.stats()["map_size"], st.generation
            stop.touch()
            out, err = reader.communicate(timeout=120)
        finally:
            reader.kill()
    assert reader.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["problems"] == [] and result["scans"] >= 1
    assert result["gen"] == gen
    assert grown > 1 << 20  # the reader also lived through map growth


# ---- fork, full disk, stale readers -----------------------------------------------------------


def test_store_survives_fork(store: store_mod.Store) -> None:
    store.put_batch(["a", "b"], make_vectors(2), labels=["x", "y"])
    pid = os.fork()
    if pid == 0:  # child: the inherited store reopens instead of using the parent's env
        code = 1
        try:
            ok = store.to_numpy().keys == ["a", "b"] and store.labels_of([1]) == ["y"]
            code = 0 if ok else 3
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    store.put_batch(["c"], make_vectors(1))
    assert store.to_numpy().keys == ["a", "b", "c"]


FILLING_WRITER = """
import resource
st = store.create(sys.argv[1], make_spec(dim=256), block_rows=16)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # the disk is full at 1 MiB
b = 0
try:
    while True:
        st.put_batch(batch_keys(b), batch_vectors(b, 256))
        b += 1
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e), "last": b - 1}))
"""


def test_full_disk_gives_storage_full_and_keeps_last_batch(bank: Path) -> None:
    child = start(FILLING_WRITER, str(bank))
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    result = json.loads(out)
    assert result["error"] == "StorageFull", result
    assert "last committed batch is intact" in result["message"]
    with store_mod.open(bank, readonly=True) as st:
        counts = batches_in(st.to_numpy())
    assert counts == {b: batch_size(b) for b in range(result["last"] + 1)}


HOLD_READ = """
st = store.open(sys.argv[1], readonly=True)
with st._sh().read() as (txn, h):
    print("ready", flush=True)
    time.sleep(120)
"""

CHECK_OPEN = """
import logging
logging.basicConfig(level=logging.INFO)
with store.open(sys.argv[1]) as st:
    st.put_batch(["b"], np.zeros((1, 8), np.float32))
    print(st.count)
"""


def test_stale_readers_are_cleared_at_open(bank: Path) -> None:
    """A reader killed mid-transaction leaves a slot that would pin old pages forever."""
    with store_mod.create(bank, make_spec()) as st:  # keeps the env open, so no lock reset
        st.put_batch(["a"], make_vectors(1))
        child = start(HOLD_READ, str(bank))
        wait_line(child, "ready")
        child.send_signal(signal.SIGKILL)
        child.communicate()
        keeper = store_mod.open(bank, readonly=True)  # shares the env: it stays open
        st.close()  # let the checker take the writer lock
        checker = start(CHECK_OPEN, str(bank))
        out, err = checker.communicate(timeout=60)
        keeper.close()
    assert checker.returncode == 0, err
    assert out.strip() == "2" and "cleared 1 stale" in err


def test_threads_read_while_the_writer_commits_grows_and_compacts(bank: Path) -> None:
    """Same process: the map is resized and compaction swaps environments under readers."""
    import threading

    dim = 64
    st = store_mod.create(bank, make_spec(dim=dim), block_rows=8, map_size=1 << 20)
    st.put_batch(["seed"], np.full((1, dim), -1, np.float32))
    stop = threading.Event()
    problems: list[str] = []
    scans = [0, 0]

    def reader(n: int) -> None:
        with store_mod.open(bank, readonly=True) as ro:
            while not stop.is_set():
                try:
                    parts = list(ro.iter_batches(batch_size=16)) if n else [ro.to_numpy()]
                    counts: dict[int, int] = {}
                    for v in np.concatenate([p.vectors for p in parts]):
                        counts[int(v[0])] = counts.get(int(v[0]), 0) + 1
                    counts.pop(-1, None)
                    problems.extend(f"batch {b}: {c}" for b, c in counts.items() if c != 5)
                    scans[n] += 1
                except Exception as e:  # noqa: BLE001 - reported below
                    problems.append(repr(e))

    threads = [threading.Thread(target=reader, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    try:
        for b in range(60):
            st.put_batch([f"{b}-{i}" for i in range(5)], np.full((5, dim), b, np.float32))
            if b % 7 == 6:
                st.delete([f"{b - 3}-{i}" for i in range(5)])
            if b % 20 == 19:
                st.compact()
    finally:
        stop.set()
        for t in threads:
            t.join()
        st.close()
    assert problems == [] and min(scans) >= 1
