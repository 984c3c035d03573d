"""Many banks in one server against one process per bank, side by side in one run.

N banks of n x 128 vectors (each its own clusters, keys prefixed by the bank's name) are
served three ways, each a real `featurebank serve` subprocess measured from /proc:

- one server of one bank (what a user runs today, per bank), queried so its index is loaded;
- one process per bank (the alternative): K of them started side by side, their RSS summed
  and scaled to N (starting N Python servers is what the many-banks server avoids);
- one server of all N banks (`--banks DIR`): RSS with every bank idle at start, the first
  query on each idle bank (open + search, p50/p99), RSS again once every bank was opened
  and closed by the idle sweep; then throughput of 32 client threads spread over 10 banks
  against the same 32 threads on one bank, every call a fresh query drawn from its bank's
  own clusters; beside it, the same comparison for the indexes alone (in process, no
  gRPC), the ceiling for the served ratio: a batch spread over 10 banks scans 10 indexes
  where one bank's batch scans one.

Checks (exit 1 when one fails): every answer's keys belong to the bank asked (precondition),
RSS with all N banks idle <= 1.2x one served bank (at start and after all were opened and
closed), first query on an idle bank p99 <= 1 s, 10-bank throughput >= 0.8x one bank's
(median of alternated rounds).

    python benchmarks/banks_bench.py [--quick] [--banks N] [--items n] [--seconds S]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM = 128
CLIENTS = 32
SPREAD = 10  # banks the concurrent load is spread over
IDLE_RSS_RATIO = 1.2
FIRST_QUERY_P99_S = 1.0
THROUGHPUT_RATIO = 0.8
ROUNDS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def centers_of(b: int) -> np.ndarray:
    """The cluster centres of bank number b (its vectors and its queries are drawn around them)."""
    return np.random.default_rng(b).normal(size=(10, DIM)).astype(np.float32)


def fresh_queries(bank: str, count: int, seed: int) -> np.ndarray:
    """`count` new query vectors from the bank's own distribution, none of them stored."""
    rng = np.random.default_rng(10_000 + seed)
    centers = centers_of(int(bank.rsplit("-", 1)[1]))
    picks = rng.integers(0, len(centers), size=count)
    return (centers[picks] + 0.3 * rng.normal(size=(count, DIM))).astype(np.float32)


def make_banks(root: Path, count: int, items: int) -> list[str]:
    from featurebank import store as store_mod
    from featurebank.core.spec import Spec
    from featurebank.index.build import build_index

    names = []
    for b in range(count):
        name = f"bank-{b:03d}"
        rng = np.random.default_rng(b)
        centers = centers_of(b)
        labels = rng.integers(0, 10, size=items)
        vectors = centers[labels] + 0.3 * rng.normal(size=(items, DIM)).astype(np.float32)
        keys = [f"{name}/{i}" for i in range(items)]
        with store_mod.create(root / name, Spec.external("external", DIM)) as st:
            st.put_batch(keys, vectors, labels=[f"c{c}" for c in labels], splits=["train"] * items)
        build_index(root / name, k=10)
        names.append(name)
    return names


class Served:
    """One `featurebank serve` subprocess."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "featurebank", "serve", "--port", str(self.port), *args],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        from featurebank.server.client import FeatureBankClient

        with FeatureBankClient(self.target, timeout=30) as c:
            c.wait_until_serving(timeout=300)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def rss(self) -> float:
        return rss_mib(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=120)
        if self.proc.returncode != 0:
            raise RuntimeError(f"server exited with {self.proc.returncode}: {err[-2000:]}")


def query(target: str, bank: str, seed: int, expect: str = "") -> float:
    """One search on `bank` ("": the default bank, `expect`), checking every key is its own;
    the seconds it took."""
    from featurebank.server.client import FeatureBankClient

    vector = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    with FeatureBankClient(target, timeout=30, bank=bank) as c:
        started = time.perf_counter()
        hits = c.search(vector=vector, k=10).neighbors
        took = time.perf_counter() - started
    mixed = [h.key for h in hits if not h.key.startswith(f"{bank or expect}/")]
    if mixed or len(hits) != 10:
        raise SystemExit(f"precondition failed: {bank} answered keys of another bank: {mixed[:3]}")
    return took


def search_limit(root: Path, banks: list[str], rounds: int = 30) -> tuple[float, float]:
    """Searches per second of the indexes alone (in process, one thread, no gRPC): the
    same CLIENTS fresh queries a batch, asked of one bank in one call, or spread over
    `banks` in one call per bank, as the server's shared batch does. It is the part of a
    served search that spreading over banks makes dearer: each call scans its own index."""
    from featurebank.index.searcher import Searcher

    searchers = [Searcher.load(root / b, threads=1) for b in banks]
    try:
        share = [np.array_split(np.arange(CLIENTS), len(banks))[i] for i in range(len(banks))]
        spread_q = [fresh_queries(b, CLIENTS * rounds, seed=99) for b in banks]
        one_q = spread_q[0]
        for s, b in zip(searchers, banks, strict=True):  # warm: hits' keys cached, as when served
            s.search(fresh_queries(b, 2_000, seed=98), 10).keys  # noqa: B018
        rates = []
        for spread in (False, True):
            started = time.perf_counter()
            for r in range(rounds):
                if spread:
                    for s, q, rows in zip(searchers, spread_q, share, strict=True):
                        s.search(q[r * CLIENTS + rows], 10).keys  # noqa: B018 - keys are the answer
                else:
                    searchers[0].search(one_q[r * CLIENTS:(r + 1) * CLIENTS], 10).keys  # noqa: B018
            rates.append(rounds * CLIENTS / (time.perf_counter() - started))
        return rates[0], rates[1]
    finally:
        for s in searchers:
            s.close()


def throughput(target: str, banks: list[str], seconds: float) -> float:
    """Searches per second of CLIENTS threads, thread i asking banks[i % len(banks)] fresh
    queries from that bank's own distribution (the same per thread in every run)."""
    from featurebank.server.client import FeatureBankClient

    stop = threading.Event()
    counts = [0] * CLIENTS
    failures: list[BaseException] = []

    def run(i: int) -> None:
        bank = banks[i % len(banks)]
        queries = fresh_queries(bank, 512, seed=i)  # every call a new query, as in production
        with FeatureBankClient(target, timeout=30, bank=bank) as c:
            c.search(vector=queries[-1], k=10)  # connected and warm before the clock starts
            barrier.wait()
            while not stop.is_set():
                try:
                    hits = c.search(vector=queries[counts[i] % len(queries)], k=10).neighbors
                    if any(not h.key.startswith(f"{bank}/") for h in hits):
                        raise AssertionError(f"{bank} answered another bank's keys")
                    counts[i] += 1
                except BaseException as e:  # noqa: BLE001 - reported below
                    failures.append(e)
                    return

    barrier = threading.Barrier(CLIENTS + 1)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    if failures:
        raise SystemExit(f"precondition failed: a call failed under load: {failures[0]}")
    return sum(counts) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="12 banks of 2,000 (CI)")
    parser.add_argument("--banks", type=int, default=None, help="banks (default 100; quick 12)")
    parser.add_argument("--items", type=int, default=None, help="vectors a bank (10,000; quick 2,000)")
    parser.add_argument("--processes", type=int, default=None,
                        help="one-process-per-bank servers actually started (default 4; quick 2)")
    parser.add_argument("--seconds", type=float, default=None, help="per throughput run (10; quick 2)")
    args = parser.parse_args()
    count = args.banks or (12 if args.quick else 100)
    items = args.items or (2_000 if args.quick else 10_000)
    processes = min(count, args.processes or (2 if args.quick else 4))
    seconds = args.seconds or (2.0 if args.quick else 10.0)
    if count < SPREAD:
        raise SystemExit(f"precondition failed: --banks must be >= {SPREAD} (the load spreads over {SPREAD})")
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="banks-bench-") as tmp:
        root = Path(tmp) / "banks"
        t0 = time.perf_counter()
        names = make_banks(root, count, items)
        print(f"{count} banks of {items:,} x {DIM} vectors built in {time.perf_counter() - t0:.1f} s")

        one = Served("--bank", str(root / names[0]))
        query(one.target, "", 0, expect=names[0])
        one_rss = one.rss
        one.stop()

        per_bank = [Served("--bank", str(root / n)) for n in names[:processes]]
        for s, n in zip(per_bank, names, strict=False):
            query(s.target, "", 1, expect=n)
        per_bank_rss = sum(s.rss for s in per_bank)
        for s in per_bank:
            s.stop()
        scaled = per_bank_rss / processes * count

        many = Served("--banks", str(root), "--idle-close-s", "1")
        idle_at_start = many.rss
        first = sorted(query(many.target, n, i) for i, n in enumerate(names))
        peak_open = many.rss
        from featurebank.server.client import FeatureBankClient

        with FeatureBankClient(many.target, timeout=30) as lister:
            deadline = time.monotonic() + 60
            while any(b.state != "idle" for b in lister.banks()):
                if time.monotonic() > deadline:
                    raise SystemExit("precondition failed: banks did not close within 60 s of idling")
                time.sleep(0.2)
        time.sleep(0.5)
        idle_after = many.rss
        rounds = []  # alternated, so a load change on the machine hits both sides alike
        for _ in range(ROUNDS):
            rounds.append((throughput(many.target, names[:SPREAD], seconds),
                           throughput(many.target, names[:1], seconds)))
        many.stop()
        spread, single = (float(np.median([r[i] for r in rounds])) for i in (0, 1))
        limit_one, limit_spread = search_limit(root, names[:SPREAD])

    p50, p99 = float(np.percentile(first, 50)), float(np.percentile(first, 99))
    print("\nRSS (MiB, from /proc/PID/status VmRSS):")
    print(f"  one server, one bank (queried)            {one_rss:8.0f}")
    print(f"  one process per bank: {processes} measured, x{count / processes:.0f}  {scaled:8.0f}"
          f"   ({per_bank_rss / processes:.0f} a process)")
    print(f"  one server, {count} banks, all idle at start  {idle_at_start:8.0f}"
          f"   {idle_at_start / one_rss:.2f}x one bank, {scaled / idle_at_start:.1f}x less than a process per bank")
    print(f"  one server, {count} banks, all open         {peak_open:8.0f}")
    print(f"  one server, {count} banks, idle again       {idle_after:8.0f}"
          f"   {idle_after / one_rss:.2f}x one bank")
    print(f"first query on an idle bank (open + search): p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms "
          f"(limit {FIRST_QUERY_P99_S * 1000:.0f} ms)")
    print(f"throughput, {CLIENTS} clients, median of {ROUNDS} alternated rounds: {SPREAD} banks "
          f"{spread:.0f}/s vs one bank {single:.0f}/s = {spread / single:.2f}x (limit {THROUGHPUT_RATIO}x)")
    print("  rounds: " + ", ".join(f"{a:.0f}/{b:.0f}" for a, b in rounds))
    print(f"  the indexes alone (one thread, batches of {CLIENTS} fresh queries): {SPREAD} banks "
          f"{limit_spread:.0f}/s vs one bank {limit_one:.0f}/s = {limit_spread / limit_one:.2f}x "
          "(spread over banks, every batch scans 10 indexes instead of one)")
    checks = {
        f"RSS of {count} idle banks at start <= {IDLE_RSS_RATIO}x one bank": idle_at_start <= IDLE_RSS_RATIO * one_rss,
        f"RSS of {count} banks idle again <= {IDLE_RSS_RATIO}x one bank": idle_after <= IDLE_RSS_RATIO * one_rss,
        f"first query p99 <= {FIRST_QUERY_P99_S} s": p99 <= FIRST_QUERY_P99_S,
        f"{SPREAD}-bank throughput >= {THROUGHPUT_RATIO}x one bank": spread >= THROUGHPUT_RATIO * single,
        "one server of all banks uses less memory than a process per bank": idle_after < scaled,
    }
    timed = (f"first query p99 <= {FIRST_QUERY_P99_S} s", f"{SPREAD}-bank throughput >= {THROUGHPUT_RATIO}x one bank")
    for what, ok in checks.items():
        judged = not (args.quick and what in timed)  # timings on a smoke run's size are noise
        print(f"  {'ok  ' if ok else 'FAIL' if judged else 'MISSED (judged by the full run)'} {what}")
        if not ok and judged:
            failed.append(what)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
