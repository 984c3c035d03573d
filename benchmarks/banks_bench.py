"""Many banks in one server against one process per bank, side by side in one run.

N banks of n x 128 vectors (each its own clusters, keys prefixed by the bank's name) are
served three ways, each a real `featurebank serve` subprocess measured from /proc:

- one server of one bank (what a user runs today, per bank), queried so its index is loaded;
- one process per bank (the alternative): K of them started side by side, their RSS summed
  and scaled to N (starting N Python servers is what the many-banks server avoids);
- one server of all N banks (`--banks DIR`): RSS with every bank idle at start, the first
  query on each idle bank (open + search, p50/p99), RSS again once every bank was opened
  and closed by the idle sweep. Then, on a fresh server of the same banks (its banks stay
  open, as a busy server's do, after an unmeasured warm-up round of each side),
  throughput of 32 client threads spread over 10 banks against the same 32 threads on
  one bank, every call a fresh query drawn from its bank's own clusters. Beside it, from
  the server's metrics, the per-bank groups its shared batches formed on each side, and
  the server's search path alone (in process, one thread, no gRPC) asked in groups of
  those sizes: the part of a served search that spreading makes dearer (a bank's group is
  what its index scan and key lookups amortise over), so the served ratio lies between
  that ratio and 1 unless the rest of the server also slows down.

Preconditions (exit 1 when one fails): every bank of the comparison holds the same data
(n x 128; the one bank is one of the ten), every query is fresh (no stored vector equals
it), every answer's keys belong to the bank asked, every round asks the same queries and
gets the same answers, the queries the ten-bank side asks bank 0 get the same answers as
on the one-bank side, and every recorded answer is the exact one (a full flat scan in
process). Targets: RSS with all N banks idle <= 1.2x one served bank (at start and after
all were opened and closed), first query on an idle bank p99 <= 1 s, 10-bank throughput
>= 0.8x one bank's (the median of the ratios of alternated round pairs, so a load change on
a shared machine hits both sides of a ratio alike; --quick prints MISSED instead of FAIL
for the timed targets, its sizes are too small to judge them).

    python benchmarks/banks_bench.py [--quick] [--banks N] [--items n] [--seconds S]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
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
ROUNDS = 5  # alternated round pairs of the full run (quick: 2)
ANSWERS = 4  # answers each client thread records per round (its first queries)


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
        self.port, self.metrics_port = free_port(), free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "featurebank", "serve", "--port", str(self.port),
             "--metrics-port", str(self.metrics_port), *args],
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

    def batched(self) -> dict[str, tuple[float, float]]:
        """kind -> (items, batches) so far, from the server's featurebank_batch_size."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        found = re.findall(r'^featurebank_batch_size_(sum|count)\{kind="(\w+)"\} (\S+)$', text, re.M)
        out: dict[str, list[float]] = {}
        for part, kind, value in found:
            out.setdefault(kind, [0.0, 0.0])[part == "count"] = float(value)
        return {kind: (v[0], v[1]) for kind, v in out.items()}

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


def thread_queries(bank: str, i: int) -> np.ndarray:
    """What client thread i asks `bank`: the same stream in every round and on both sides."""
    return fresh_queries(bank, 512, seed=i)


def group_sizes(mean: float, total: int) -> list[int]:
    """Whole group sizes averaging `mean`, `total` queries in all."""
    edges = np.unique(np.round(np.arange(0, total / mean + 1) * mean).astype(int).clip(0, total))
    return [int(g) for g in np.diff(np.append(edges, total)) if g > 0]


def search_limit(root: Path, banks: list[str], groups: dict[str, float],
                 queries: int = 3_000) -> dict[str, float]:
    """Searches per second of the server's search path alone (in process, one thread, no
    gRPC: reads.search_jobs, keys included) asked in groups of the mean sizes the server
    formed: `groups["one"]` on banks[0] alone, `groups["spread"]` round-robin over `banks`."""
    from featurebank.index.cluster_scan import PLAN_AFTER
    from featurebank.index.searcher import Searcher
    from featurebank.server.reads import SearchJob, search_jobs

    searchers = [Searcher.load(root / b, threads=1) for b in banks]
    try:
        for s, b in zip(searchers, banks, strict=True):  # warm, as the served banks were
            s.search(fresh_queries(b, 2 * PLAN_AFTER, seed=98), 10).keys  # noqa: B018
            s._planner.wait()
        rates = {}
        for side, spread in (("one", 1), ("spread", len(banks))):
            asked = [fresh_queries(b, queries, seed=97) for b in banks[:spread]]
            sizes, done = group_sizes(groups[side], queries), [0] * spread
            started = time.perf_counter()
            for call, g in enumerate(sizes):
                at = call % spread
                rows = asked[at][done[at]:done[at] + g]
                done[at] += g
                search_jobs(searchers[at], searchers[at].store,
                            [SearchJob(v, 10, (), None, False) for v in rows])
            rates[side] = sum(done) / (time.perf_counter() - started)
        return rates
    finally:
        for s in searchers:
            s.close()


Answer = tuple[tuple[str, ...], tuple[float, ...]]


def throughput(target: str, banks: list[str], seconds: float) -> tuple[float, dict[int, list[Answer]]]:
    """Searches per second of CLIENTS threads, thread i asking banks[i % len(banks)] fresh
    queries from that bank's own distribution (the same per thread in every run), and
    each thread's first ANSWERS answers (keys, scores)."""
    from featurebank.server.client import FeatureBankClient

    stop = threading.Event()
    counts = [0] * CLIENTS
    answers: dict[int, list[Answer]] = {i: [] for i in range(CLIENTS)}
    failures: list[BaseException] = []

    def run(i: int) -> None:
        bank = banks[i % len(banks)]
        queries = thread_queries(bank, i)  # every call a new query, as in production
        with FeatureBankClient(target, timeout=30, bank=bank) as c:
            c.search(vector=queries[-1], k=10)  # connected and warm before the clock starts
            barrier.wait()
            while not stop.is_set():
                try:
                    hits = c.search(vector=queries[counts[i] % len(queries)], k=10).neighbors
                    if any(not h.key.startswith(f"{bank}/") for h in hits):
                        raise AssertionError(f"{bank} answered another bank's keys")
                    if counts[i] < ANSWERS:
                        answers[i].append((tuple(h.key for h in hits), tuple(h.score for h in hits)))
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
    return sum(counts) / (time.perf_counter() - started), answers


def exact_answers(root: Path, bank: str, threads: list[int]) -> tuple[dict[int, list[tuple[str, ...]]], float]:
    """Keys of the exact top 10 (a full flat scan in process) of each thread's first ANSWERS
    queries to `bank`, and the smallest distance of any of those queries to a stored
    vector (0 would mean a query is not fresh)."""
    import faiss

    from featurebank import store as store_mod
    from featurebank.index.searcher import Searcher

    with store_mod.open(root / bank, readonly=True) as st, Searcher.load(st, threads=1) as s:
        items = st.to_numpy()
        flat = faiss.IndexFlatL2(DIM)
        flat.add(s.transform(items.vectors))
        keys = np.asarray(items.keys)
        out, nearest = {}, np.inf
        for i in threads:
            dist, rows = flat.search(s.transform(thread_queries(bank, i)[:ANSWERS]), 10)
            out[i] = [tuple(row) for row in keys[rows].tolist()]
            nearest = min(nearest, float(dist[:, 0].min()))
    return out, nearest


def answer_problems(root: Path, spread: list[str], answers: dict[str, list[dict[int, list[Answer]]]]
                    ) -> tuple[list[str], float]:
    """What is wrong with the recorded answers (each thread's first ANSWERS, every round
    of both sides): they must be the same every round, the same for bank 0 on both sides
    and exact; and the nearest stored vector to any query (0: a query is not fresh)."""
    problems = [f"a client thread made fewer than {ANSWERS} calls in a round"
                for runs in answers.values() for got in runs if min(map(len, got.values())) < ANSWERS]
    problems += [f"{side} round {r + 1} answered thread {i} otherwise than round 1"
                 for side, runs in answers.items() for r, got in enumerate(runs)
                 for i in got if got[i] != runs[0][i]]
    problems += [f"thread {i} got other answers from bank 0 when the load was spread"
                 for i in range(0, CLIENTS, SPREAD) if answers["spread"][0][i] != answers["one"][0][i]]
    nearest = np.inf
    for b, bank in enumerate(spread):
        asking = [i for i in range(CLIENTS) if i % SPREAD == b]
        exact, closest = exact_answers(root, bank, asking)
        nearest = min(nearest, closest)
        problems += [f"{bank} answered thread {i}'s query {q} inexactly"
                     for i in asking for q, (keys, _) in enumerate(answers["spread"][0][i]) if keys != exact[i][q]]
    if nearest <= 1e-6:
        problems.append("a query equals a stored vector (queries must be fresh)")
    return problems, nearest


def same_data(root: Path, banks: list[str], items: int) -> bool:
    """Every bank of the comparison holds `items` vectors of DIM."""
    from featurebank import store as store_mod

    for b in banks:
        with store_mod.open(root / b, readonly=True) as st:
            if st.count != items or int(st.spec.dim) != DIM:
                return False
    return True


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
    rounds_n = 2 if args.quick else ROUNDS
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
        many.stop()

        sides = {"spread": names[:SPREAD], "one": names[:1]}
        if not same_data(root, sides["spread"], items):
            raise SystemExit(f"precondition failed: the {SPREAD} banks do not all hold {items} x {DIM}")
        busy = Served("--banks", str(root))
        rounds: dict[str, list[tuple[float, float, float]]] = {side: [] for side in sides}
        answers: dict[str, list[dict[int, list[Answer]]]] = {side: [] for side in sides}
        for banks in sides.values():  # unmeasured: every bank open, planned, its caches warm
            throughput(busy.target, banks, seconds)
        for _ in range(rounds_n):  # alternated, so a load change on the machine hits both sides alike
            for side, banks in sides.items():
                before = busy.batched()
                rate, got = throughput(busy.target, banks, seconds)
                after = busy.batched()
                (items_b, batches), (items_g, groups) = (
                    np.subtract(after[kind], before.get(kind, (0.0, 0.0))) for kind in ("search", "search_bank"))
                rounds[side].append((rate, items_b / batches, items_g / groups))
                answers[side].append(got)
        busy.stop()
        spread, single = (float(np.median([r[0] for r in rounds[side]])) for side in ("spread", "one"))
        ratio = float(np.median([a[0] / b[0] for a, b in zip(rounds["spread"], rounds["one"], strict=True)]))
        group = {side: float(np.median([r[2] for r in rounds[side]])) for side in sides}
        batch = {side: float(np.median([r[1] for r in rounds[side]])) for side in sides}
        limit = search_limit(root, sides["spread"], group)

        problems, nearest = answer_problems(root, sides["spread"], answers)
        if problems:
            raise SystemExit("precondition failed: " + "; ".join(problems[:3]))

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
    print(f"throughput, {CLIENTS} clients, {rounds_n} alternated rounds: {SPREAD} banks {spread:.0f}/s vs "
          f"one bank {single:.0f}/s (medians); median of the rounds' ratios {ratio:.2f}x (target {THROUGHPUT_RATIO}x)")
    print("  rounds (10 banks/one bank): " + ", ".join(
        f"{a[0]:.0f}/{b[0]:.0f}" for a, b in zip(rounds["spread"], rounds["one"], strict=True)))
    print(f"  the server's search batches (median of rounds): one bank {batch['one']:.1f} queries a batch, "
          f"{group['one']:.2f} a bank's group; {SPREAD} banks {batch['spread']:.1f} a batch, "
          f"{group['spread']:.2f} a bank's group")
    print(f"  the search path alone in those groups (in process, one thread, no gRPC): {SPREAD} banks "
          f"{limit['spread']:.0f}/s vs one bank {limit['one']:.0f}/s = {limit['spread'] / limit['one']:.2f}x")
    print(f"  answers: exact (a full flat scan of each bank), the same every round and for bank 0 on both "
          f"sides; nearest stored vector to any query at squared distance {nearest:.3f} (fresh)")
    checks = {
        f"RSS of {count} idle banks at start <= {IDLE_RSS_RATIO}x one bank": idle_at_start <= IDLE_RSS_RATIO * one_rss,
        f"RSS of {count} banks idle again <= {IDLE_RSS_RATIO}x one bank": idle_after <= IDLE_RSS_RATIO * one_rss,
        f"first query p99 <= {FIRST_QUERY_P99_S} s": p99 <= FIRST_QUERY_P99_S,
        f"{SPREAD}-bank throughput >= {THROUGHPUT_RATIO}x one bank ({ratio:.2f}x)": ratio >= THROUGHPUT_RATIO,
        "one server of all banks uses less memory than a process per bank": idle_after < scaled,
    }
    timed = {what for what in checks if what.startswith(("first query", f"{SPREAD}-bank throughput"))}
    for what, ok in checks.items():
        judged = not (args.quick and what in timed)  # timings on a smoke run's size are noise
        print(f"  {'PASS' if ok else 'FAIL' if judged else 'MISSED (judged by the full run)'} {what}")
        if not ok and judged:
            failed.append(what)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
