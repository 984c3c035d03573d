"""Read replicas: what they buy in throughput on this machine, and how fresh they are.

(1) Classify by vector, CLIENTS concurrent callers, one run, side by side:
    - the in-process Classifier on all queries in one batch (the limit of the search itself);
    - one server (what a user has without replicas);
    - two read replicas behind MultiTargetClient's round-robin (the primary idle);
    with the CPU each process used per 1,000 calls, so the ratio can be read against the
    cores: on a 2-core machine two replica processes and the client share the same two
    cores, so more than ~2x over one server is impossible and less is expected.
(2) Freshness: time from an acknowledged commit on the primary (Upsert of a new item,
    SetLabels of an existing one) to the first answer from a replica that shows it,
    p50/p99 over TRIALS commits, next to the replica's follow interval.

The bank is shaped like users' data: clustered classes of very different sizes (Zipf),
stored class by class, noisy vectors and a few wrong labels.

    python benchmarks/replica_bench.py [--quick] [--items 20000 --dim 128 --calls 3000 --trials 40]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from serve_bench import Served, fmt, load  # noqa: E402

from featurebank import store as store_mod  # noqa: E402
from featurebank.core.spec import Spec  # noqa: E402
from featurebank.server.client import FeatureBankClient  # noqa: E402
from featurebank.server.targets import MultiTargetClient  # noqa: E402

Reader = Callable[[np.ndarray], object]


def user_shaped_bank(root: Path, n: int, dim: int, classes: int, seed: int = 0) -> np.ndarray:
    """A bank of Zipf-sized noisy clusters stored class by class, 3 % wrong labels; returns
    queries drawn like the items (so popular classes are asked about more)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)).astype(np.float32)
    sizes = 1.0 / np.arange(1, classes + 1)
    per_class = np.maximum(1, (sizes / sizes.sum() * n).astype(int))
    labels_idx = np.repeat(np.arange(classes), per_class)[:n]
    spread = rng.uniform(0.5, 1.2, classes)[labels_idx, None]
    vectors = centers[labels_idx] + spread * rng.normal(size=(len(labels_idx), dim))
    noisy = rng.random(len(labels_idx)) < 0.03
    shown = np.where(noisy, rng.integers(0, classes, len(labels_idx)), labels_idx)
    spec = Spec(backbone="external", weights="external", input_size=None, resize="none",
                dim=dim, dtype="float32")
    with store_mod.create(root, spec) as st:
        st.put_batch([f"item/{i}" for i in range(len(labels_idx))], vectors.astype(np.float32),
                     labels=[f"class{c}" for c in shown],
                     splits=["val" if i % 10 == 0 else "train" for i in range(len(labels_idx))])
    from featurebank.index.build import build_index

    build_index(root)
    pick = rng.choice(labels_idx, 4096)
    return (centers[pick] + rng.normal(size=(4096, dim))).astype(np.float32)


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used (from /proc, Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hammer(call: Reader, queries: np.ndarray, calls: int, clients: int) -> dict[str, float]:
    """`calls` reads spread over `clients` threads; throughput and latency percentiles."""
    return load(lambda i: call(queries[i % len(queries)]), calls, clients)


@dataclass
class Run:
    stats: dict[str, float]  # qps, p50, p99, n
    server_cpu: list[float]  # CPU seconds per 1,000 calls, per server process
    client_cpu: float
    cores: float  # cores this run's processes kept busy


def measured(
    call: Reader, queries: np.ndarray, calls: int, clients: int, servers: Sequence[Served],
) -> Run:
    """One timed run, with the CPU each process used per 1,000 calls."""
    before = [cpu_seconds(s.proc.pid) for s in servers]
    client_before = time.process_time()
    stats = hammer(call, queries, calls, clients)
    per_k = 1000 / stats["n"]
    server_cpu = [(cpu_seconds(s.proc.pid) - b) * per_k for s, b in zip(servers, before, strict=True)]
    client_cpu = (time.process_time() - client_before) * per_k
    wall = stats["n"] / stats["qps"]
    return Run(stats, server_cpu, client_cpu, (sum(server_cpu) + client_cpu) / per_k / wall)


def show(name: str, r: Run) -> None:
    print(f"  {name:<38}: {fmt(r.stats)}")
    print(f"  {'':<38}  CPU s per 1k calls: server "
          f"{' + '.join(f'{c:.2f}' for c in r.server_cpu)}, client {r.client_cpu:.2f}; "
          f"cores used by this run {r.cores:.2f} of {os.cpu_count()}")


def bench_throughput(bank: Path, queries: np.ndarray, calls: int, clients: int,
                     follow_s: float, rounds: int) -> None:
    print(f"\n(1) Classify by vector, {calls} calls, {clients} concurrent callers, best of "
          f"{rounds} alternating rounds")
    from featurebank.classify.classifier import Classifier

    with Classifier(bank) as clf:
        clf.classify(queries[:8])
        batch = queries[: min(calls, len(queries))]
        limit = 0.0
        for _ in range(rounds):
            t0 = time.perf_counter()
            clf.classify(batch)
            limit = max(limit, len(batch) / (time.perf_counter() - t0))
    print(f"  {'in-process Classifier, one batch (limit)':<38}: {limit:9.1f} q/s")

    replica_args = ("--replica", "--follow-interval", str(follow_s))
    with Served(bank) as primary, \
            Served(bank, *replica_args, "--primary", primary.target) as r1, \
            Served(bank, *replica_args, "--primary", primary.target) as r2, \
            FeatureBankClient(primary.target, timeout=600) as c, \
            MultiTargetClient([r1.target, r2.target], timeout=600) as mc:
        setups: list[tuple[str, Reader, list[Served]]] = [
            ("one server", lambda q: c.classify(vector=q), [primary]),
            ("two replicas, client round-robin", lambda q: mc.classify(vector=q), [r1, r2]),
        ]
        best: dict[str, Run] = {}
        for _name, call, _servers in setups:
            for q in queries[:64]:  # warm channels and the servers' first batches
                call(q)
        for _ in range(rounds):
            for name, call, servers in setups:
                r = measured(call, queries, calls, clients, servers)
                if name not in best or r.stats["qps"] > best[name].stats["qps"]:
                    best[name] = r
    for name, _, _ in setups:
        show(name, best[name])
    one, two = best["one server"].stats, best["two replicas, client round-robin"].stats
    print(f"  two replicas / one server: {two['qps'] / one['qps']:.2f}x   "
          f"one server / limit: {one['qps'] / limit:.2f}x   "
          f"two replicas / limit: {two['qps'] / limit:.2f}x")


def percentiles(xs: Sequence[float]) -> str:
    ms = np.asarray(xs) * 1000
    return (f"p50 {np.percentile(ms, 50):7.1f} ms   p99 {np.percentile(ms, 99):7.1f} ms   "
            f"max {ms.max():7.1f} ms")


def visible_after(
    replica: FeatureBankClient, v: np.ndarray, field: str, expected: str, timeout: float = 60.0,
) -> float:
    """Seconds until the replica's nearest item to `v` has `field` == `expected`."""
    start = time.perf_counter()
    while getattr(replica.search(vector=v, k=1).neighbors[0], field) != expected:
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"a commit was not visible on the replica after {timeout}s")
        time.sleep(0.002)
    return time.perf_counter() - start


def bench_freshness(bank: Path, dim: int, trials: int, follow_s: float) -> None:
    print(f"\n(2) Freshness: commit on the primary -> visible on a replica, {trials} commits each, "
          f"follow interval {follow_s * 1000:.0f} ms")
    rng = np.random.default_rng(1)
    upserts: list[float] = []
    relabels: list[float] = []
    with Served(bank) as primary, \
            Served(bank, "--replica", "--follow-interval", str(follow_s)) as replica, \
            FeatureBankClient(primary.target, timeout=600) as p, \
            FeatureBankClient(replica.target, timeout=600) as r:
        for i in range(trials):
            v = (10 + rng.normal(size=dim)).astype(np.float32)  # far from every item
            key = f"fresh/{i}"
            p.upsert([{"key": key, "vector": v, "label": "fresh"}])
            upserts.append(visible_after(r, v, "key", key))
            label = f"relabel{i}"
            p.set_labels({key: label})
            relabels.append(visible_after(r, v, "label", label))
            time.sleep(rng.uniform(0, follow_s))  # commits land anywhere in the poll cycle
    print(f"  Upsert of a new item    : {percentiles(upserts)}")
    print(f"  SetLabels of an item    : {percentiles(relabels)}")
    print(f"  p99 / follow interval   : Upsert {np.percentile(upserts, 99) / follow_s:.2f}x, "
          f"SetLabels {np.percentile(relabels, 99) / follow_s:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=20_000, help="bank size")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--calls", type=int, default=3_000, help="Classify calls per setup")
    parser.add_argument("--clients", type=int, default=16, help="concurrent callers")
    parser.add_argument("--trials", type=int, default=40, help="commits timed for freshness")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating throughput rounds; the best of each is shown")
    parser.add_argument("--follow-interval", type=float, default=0.2,
                        help="the replicas' --follow-interval, seconds")
    parser.add_argument("--quick", action="store_true",
                        help="2,000 items, 300 calls, 4 clients, 5 trials, 1 round: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.items, args.calls, args.clients, args.trials, args.rounds = 2_000, 300, 4, 5, 1
    print(f"replica_bench: bank {args.items} x {args.dim} ({args.classes} Zipf-sized classes), "
          f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="replica-bench-") as d:
        bank = Path(d) / "bank"
        queries = user_shaped_bank(bank, args.items, args.dim, args.classes)
        bench_throughput(bank, queries, args.calls, args.clients, args.follow_interval,
                         args.rounds)
        bench_freshness(bank, args.dim, args.trials, args.follow_interval)
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(other work on the machine takes cores from this run)")


if __name__ == "__main__":
    main()
