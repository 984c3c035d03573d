"""Bounded soak: many clients against one `featurebank serve` for a fixed time.

N clients (default 64, in several processes so that client-side Python does not limit
the server) call a mix of Classify, Search, ClassifyBatch and Upsert for T seconds
(default 60), with a RebuildIndex in the middle. A few calls are wrong on purpose
(unknown keys, oversized label filters, NaN vectors, unknown operations) so that the
error paths are soaked too; each of those expects one status code.

Prints calls/s, p50/p99 per method, non-OK statuses by code (expected vs unexpected),
the server's RSS after warm-up, in the middle and at the end, and whether every
acknowledged Upsert is in the store at the end. For scale, the same Classify queries
answered in-process (the library called directly, one query at a time, and in one
batch: the limit) give the cost of serving as ratios.

With `--writers N`, N more processes stream Upserts of new items one after another, so the
bank grows through checkpoints (folds of the exact-searched segment into the index) while
it is read; reads/s are printed per sixth of the run.

Targets: 0 unexpected statuses; every acknowledged item present; reads/s in no window
below 0.75x the first (read cost stays flat while the segment fills and folds); the
server's own resident memory (RssAnon: mapped bank files are page cache the kernel can
drop, and a fold reads every stored vector) 10 s after the load ("settled": a checkpoint
folding when it ended has published and let go of its copy) within 1.25x of that after
warm-up, or, when the bank grew by more than 10%, of the larger of that and a fresh
server's on the bank as it ends (started after the soak, warmed with reads for a few
seconds): the soak may keep the data it added, not more.

    python benchmarks/soak.py [--quick] [--clients 64] [--seconds 60] [--procs 4] [--items 20000]
                              [--writers 4 --write-size 4] [--serve=--checkpoint-items=5000]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featurebank import store as store_mod  # noqa: E402
from featurebank.core.spec import Spec  # noqa: E402
from featurebank.server.client import FeatureBankClient, RemoteError, make_input  # noqa: E402

DIM = 64
CLASSES = 40
OK = "OK"


# ------------------------------------------------------------------ data shaped like users'


def user_like_data(n: int, seed: int = 0) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """Clustered classes of Zipf-like sizes, in class order, with sub-clusters, 3% wrong labels.

    Returns keys, vectors, labels and the class centres (queries are drawn near them).
    """
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, CLASSES + 1) ** 0.8
    sizes = np.maximum(3, (weights / weights.sum() * n).astype(int))
    centres = rng.normal(size=(CLASSES, DIM)).astype(np.float32)
    keys, vecs, labels = [], [], []
    for c, size in enumerate(sizes):
        subs = centres[c] + 0.35 * rng.normal(size=(3, DIM))
        pick = rng.integers(0, 3, size)
        x = subs[pick] + 0.25 * rng.normal(size=(size, DIM))
        vecs.append(x.astype(np.float32))
        for i in range(size):
            noisy = rng.random() < 0.03
            labels.append(f"class{rng.integers(CLASSES) if noisy else c:02d}")
            keys.append(f"c{c:02d}/{i:06d}")
    return keys, np.concatenate(vecs), labels, centres


def make_bank(root: Path, n: int) -> tuple[Path, list[str], np.ndarray]:
    from featurebank.index.build import build_index

    spec = Spec(backbone="external", weights="external", input_size=None, resize="none",
                dim=DIM, dtype="float32")  # fmt: skip
    keys, x, labels, centres = user_like_data(n)
    splits = ["val" if i % 10 == 0 else "train" for i in range(len(keys))]
    with store_mod.create(root, spec) as st:
        st.put_batch(keys, x, labels=labels, splits=splits)
    build_index(root, k=10)
    return root, keys, centres


# ------------------------------------------------------------------ the server


SETTLE_S = 10.0  # after the load, before "settled" RSS: longer than a 100k-item fold here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, RssAnon) of /proc/PID/status in MiB: all resident memory, and the process's
    own (the rest is mapped files, which the page cache can drop)."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) / 1024, int(status["RssAnon"].split()[0]) / 1024


class Server:
    """`featurebank serve` in its own process, its stderr kept in a file."""

    def __init__(self, bank: Path, *extra: str) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "featurebank", "-v", "serve", "--bank", str(bank),
               "--port", str(self.port), "--grace", "30", *extra]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log)
        with FeatureBankClient(self.target) as c:
            c.wait_until_serving(timeout=300)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log.seek(0)
        self.folds = [line.strip() for line in self.log
                      if "checkpoint" in line or "index generation" in line or "rebuild" in line]
        self.log.close()
        return code


# ------------------------------------------------------------------ clients


Plan = tuple[str, str, Callable[[], Any], list[str]]


def new_items(keys: list[str], rng: np.random.Generator, centres: np.ndarray
              ) -> list[dict[str, Any]]:
    """Upsert items for `keys`: each of a random class, near its centre, labelled with it."""
    cls = rng.integers(CLASSES, size=len(keys))
    vecs = centres[cls] + 0.3 * rng.normal(size=(len(keys), DIM))
    return [{"key": k, "vector": v, "label": f"class{int(ci):02d}"}
            for k, v, ci in zip(keys, vecs, cls, strict=True)]  # fmt: skip


def plan_call(c: FeatureBankClient, rng: np.random.Generator, centres: np.ndarray,
              keys: list[str], tag: str, n: int) -> Plan:
    """One call of the mix: (method, the status it should get, the call, keys it upserts)."""
    r = rng.random()
    q = centres[rng.integers(CLASSES)] + 0.3 * rng.normal(size=DIM)
    if r < 0.30:
        return "Classify", OK, lambda: c.classify(vector=q, top_n=3), []
    if r < 0.40:
        key = keys[rng.integers(len(keys))]
        return "Classify", OK, lambda: c.classify(key=key, include_neighbors=True), []
    if r < 0.62:
        return "Search", OK, lambda: c.search(vector=q, k=10), []
    if r < 0.70:
        label = f"class{rng.integers(CLASSES):02d}"
        return "Search", OK, lambda: c.search(vector=q, k=5, labels=[label]), []
    if r < 0.85:
        batch = centres[rng.integers(CLASSES, size=8)] + 0.3 * rng.normal(size=(8, DIM))
        inputs = [make_input(vector=v) for v in batch]
        return "ClassifyBatch", OK, lambda: c.classify_batch(inputs), []
    if r < 0.95:
        new = [f"soak/{tag}/{n}/{i}" for i in range(int(rng.integers(1, 9)))]
        items = new_items(new, rng, centres)
        return "Upsert", OK, lambda: c.upsert(items), new
    bad = rng.integers(4)  # wrong on purpose: each has exactly one right answer
    if bad == 0:
        return "Classify(bad key)", "NOT_FOUND", lambda: c.classify(key=f"nope/{tag}/{n}"), []
    if bad == 1:
        labels = [f"l{i}" for i in range(2000)]
        return ("Search(2000 labels)", "INVALID_ARGUMENT",
                lambda: c.search(vector=q, labels=labels), [])
    if bad == 2:
        nan = [{"key": f"nan/{tag}/{n}", "vector": np.full(DIM, np.nan)}]
        return "Upsert(NaN)", "INVALID_ARGUMENT", lambda: c.upsert(nan), []
    return "GetOperation(bad)", "NOT_FOUND", lambda: c.get_operation("0" * 32), []


def client_process(args: tuple[int, int, str, float, list[str]]) -> dict[str, Any]:
    """`threads` clients in one process until `until` (a time.time() value)."""
    proc_no, threads, target, until, keys = args
    _, _, _, centres = user_like_data(1)  # the same centres as the bank (same seed)
    latencies: dict[str, list[float]] = defaultdict(list)
    statuses: Counter[tuple[str, str, str]] = Counter()  # (method, expected, got)
    acked: list[str] = []
    reads_at: list[float] = []  # when each read (Classify, Search, ClassifyBatch) ended
    lock = threading.Lock()

    def worker(t: int) -> None:
        rng = np.random.default_rng(proc_no * 1000 + t)
        tag = f"{proc_no}-{t}"
        with FeatureBankClient(target, timeout=30) as c:
            n = 0
            while time.time() < until:
                n += 1
                method, expected, call, new = plan_call(c, rng, centres, keys, tag, n)
                start = time.perf_counter()
                try:
                    call()
                    got = OK
                except RemoteError as e:
                    got = e.code.name
                dt = time.perf_counter() - start
                with lock:
                    latencies[method.split("(")[0]].append(dt)
                    statuses[(method, expected, got)] += 1
                    if got == OK:
                        acked.extend(new)
                        if not new:
                            reads_at.append(time.time())

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return {"latencies": dict(latencies), "statuses": statuses, "acked": acked,
            "reads_at": reads_at}


def writer_process(args: tuple[int, str, float, int]) -> dict[str, Any]:
    """A streaming writer: Upserts of `size` new items, one after another, until `until`."""
    proc_no, target, until, size = args
    _, _, _, centres = user_like_data(1)
    rng = np.random.default_rng(10_000 + proc_no)
    latencies: list[float] = []
    statuses: Counter[tuple[str, str, str]] = Counter()
    acked: list[str] = []
    with FeatureBankClient(target, timeout=60) as c:
        n = 0
        while time.time() < until:
            n += 1
            keys = [f"stream/{proc_no}/{n}/{i}" for i in range(size)]
            items = new_items(keys, rng, centres)
            start = time.perf_counter()
            try:
                c.upsert(items)
                got = OK
                acked.extend(keys)
            except RemoteError as e:
                got = e.code.name
            latencies.append(time.perf_counter() - start)
            statuses[("Upsert(stream)", OK, got)] += 1
    return {"latencies": {"Upsert(stream)": latencies}, "statuses": statuses, "acked": acked,
            "reads_at": []}


# ------------------------------------------------------------------ the run


def in_process_rates(bank: Path, centres: np.ndarray, seconds: float = 3.0) -> tuple[float, float]:
    """Classify queries/s with the library called directly: one at a time, and one batch."""
    from featurebank.classify.classifier import Classifier

    rng = np.random.default_rng(5)
    q = (centres[rng.integers(CLASSES, size=2000)] + 0.3 * rng.normal(size=(2000, DIM)))
    q = q.astype(np.float32)
    with Classifier(bank) as clf:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            clf.classify(q[n % 2000 : n % 2000 + 1], top_n=3)
            n += 1
        single = n / (time.perf_counter() - start)
        start = time.perf_counter()
        clf.classify(q, top_n=3)
        batched = len(q) / (time.perf_counter() - start)
    return single, batched


def _sample_until(when: float, pid: int, start: float, target: str) -> None:
    """Progress: the server's RSS, its index generation and the items not yet folded into
    it (searched exactly), every 10 s until `when`."""
    while time.time() < when - 0.05:
        time.sleep(min(10.0 - (time.time() - start) % 10.0, when - time.time()))
        if (time.time() - start) % 10.0 < 0.5 or time.time() >= when:
            with FeatureBankClient(target, timeout=30) as c:
                index = c.info().index
            total, anon = memory_mib(pid)
            print(f"  {time.time() - start:5.1f} s  server RSS {total:.0f} MiB (anon {anon:.0f}), index "
                  f"generation {index.generation}, {index.pending_items} items pending",
                  flush=True)  # fmt: skip


def fresh_rss(bank: Path, serve: list[str], centres: np.ndarray, keys: list[str],
              seconds: float = 5.0) -> tuple[float, float]:
    """(VmRSS, RssAnon) MiB of a new server on `bank` after `seconds` of the soak's reads
    (its mix without the Upserts) from 16 threads."""
    server = Server(bank, *serve)
    until = time.time() + seconds

    def reader(t: int) -> None:
        rng = np.random.default_rng(50_000 + t)
        with FeatureBankClient(server.target, timeout=30) as c:
            n = 0
            while time.time() < until:
                n += 1
                method, _, call, _ = plan_call(c, rng, centres, keys, f"fresh-{t}", n)
                if "Upsert" not in method:
                    with contextlib.suppress(RemoteError):  # the wrong-on-purpose calls
                        call()

    pool = [threading.Thread(target=reader, args=(t,)) for t in range(16)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    rss = memory_mib(server.proc.pid)
    server.stop()
    return rss


def _rebuild(target: str) -> dict[str, Any]:
    """A RebuildIndex while the clients keep calling; a second one meanwhile must be refused."""
    out: dict[str, Any] = {}
    with FeatureBankClient(target, timeout=600) as c:
        t = time.perf_counter()
        op = c.rebuild_index()
        try:
            c.rebuild_index()
            out["second"] = OK
        except RemoteError as e:
            out["second"] = e.code.name  # one rebuild at a time: FAILED_PRECONDITION
        done = c.wait_operation(op.id, timeout=600)
        out["seconds"] = time.perf_counter() - t
        out["error"] = done.error.message if done.error.code else ""
        out["generation"] = done.index_generation
    print(f"  rebuild done in {out['seconds']:.1f} s (generation {out['generation']})", flush=True)
    return out


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, p)) if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--procs", type=int, default=4, help="client processes the clients share")
    ap.add_argument("--items", type=int, default=20_000, help="items in the bank at the start")
    ap.add_argument("--writers", type=int, default=0,
                    help="streaming writers beside the clients, each upserting --write-size "
                         "new items a call, one call after another")  # fmt: skip
    ap.add_argument("--write-size", type=int, default=32)
    ap.add_argument("--serve", action="append", default=[], metavar="ARG",
                    help="one more option for featurebank serve, repeatable; write it with = "
                         "(--serve=--checkpoint-items=5000)")  # fmt: skip
    ap.add_argument("--no-rebuild", dest="rebuild", action="store_false",
                    help="leave out the RebuildIndex in the middle (to tell its memory apart)")
    ap.add_argument("--quick", action="store_true",
                    help="8 clients in 2 processes for 10 s on 2,000 items: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.seconds, args.procs, args.items = 8, 10.0, 2, 2_000
    procs = max(1, min(args.procs, args.clients))

    with tempfile.TemporaryDirectory() as tmp:
        print(f"building a bank of {args.items} items ({CLASSES} classes, dim {DIM}) ...",
              flush=True)  # fmt: skip
        bank, keys, centres = make_bank(Path(tmp) / "bank", args.items)
        single, batched = in_process_rates(bank, centres)
        server = Server(bank, *args.serve)
        pid = server.proc.pid
        with FeatureBankClient(server.target) as c:
            index_before = c.info().index
        print(f"server pid {pid} on {server.target}; {args.clients} clients in {procs} "
              f"processes for {args.seconds:.0f} s", flush=True)  # fmt: skip
        start = time.time()
        until = start + args.seconds
        per = [args.clients // procs + (1 if i < args.clients % procs else 0) for i in range(procs)]
        ctx = mp.get_context("spawn")
        rss: dict[str, tuple[float, float]] = {"idle": memory_mib(pid)}
        rebuild: dict[str, Any] = {}
        with ctx.Pool(procs + args.writers) as pool:
            pending = pool.map_async(client_process,
                                     [(i, per[i], server.target, until, keys[::4]) for i in range(procs)])
            writing = pool.map_async(writer_process, [(i, server.target, until, args.write_size)
                                                      for i in range(args.writers)])
            marks = [("after warm-up", min(10.0, args.seconds * 0.15)),
                     ("middle", args.seconds / 2)]  # fmt: skip
            for name, at in marks:
                _sample_until(start + at, pid, start, server.target)
                rss[name] = memory_mib(pid)
                print(f"  {time.time() - start:5.1f} s  server RSS {rss[name][0]:.0f} MiB "
                      f"(anon {rss[name][1]:.0f}) ({name})", flush=True)  # fmt: skip
            if args.rebuild:
                rebuild = _rebuild(server.target)
            _sample_until(until, pid, start, server.target)
            results = pending.get(timeout=args.seconds + 600) + writing.get(timeout=600)
        elapsed = time.time() - start
        rss["end"] = memory_mib(pid)
        time.sleep(min(SETTLE_S, args.seconds / 4))  # a checkpoint that was folding when the load ended has published
        rss["settled"] = memory_mib(pid)
        with FeatureBankClient(server.target, timeout=60) as c:
            info = c.info()
            count_served, index_after = info.count, info.index
        code = server.stop()
        rss["fresh server"] = fresh_rss(bank, args.serve, centres, keys[::4], min(5.0, args.seconds / 4))

        latencies: dict[str, list[float]] = defaultdict(list)
        statuses: Counter[tuple[str, str, str]] = Counter()
        acked: list[str] = []
        reads_at: list[float] = []
        for r in results:
            for m, v in r["latencies"].items():
                latencies[m].extend(v)
            statuses.update(r["statuses"])
            acked.extend(r["acked"])
            reads_at.extend(r["reads_at"])
        with store_mod.open(bank, readonly=True) as st:
            missing = st.missing(acked)
            count_stored = st.count

    total = sum(len(v) for v in latencies.values())
    print(f"\n{total} calls in {elapsed:.1f} s: {total / elapsed:.0f} calls/s")
    print(f"{'method':<16}{'calls':>9}{'calls/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for m in sorted(latencies):
        v = latencies[m]
        print(f"{m:<16}{len(v):>9}{len(v) / elapsed:>10.1f}{pct(v, 50):>10.2f}{pct(v, 99):>10.2f}")
    window = max(1.0, args.seconds / 6)
    counts = np.bincount(((np.asarray(reads_at) - start) // window).astype(int).clip(0),
                         minlength=int(np.ceil(args.seconds / window)))[: int(args.seconds // window)]
    rates = counts / window
    print(f"\nreads/s in windows of {window:.0f} s: " + ", ".join(f"{r:.0f}" for r in rates)
          + (f"; last / first = {rates[-1] / rates[0]:.2f}x, lowest / first = "
             f"{rates.min() / rates[0]:.2f}x" if len(rates) > 1 and rates[0] else ""))
    classify_rate = len(latencies.get("Classify", [])) / elapsed
    print(f"\nin-process Classify (library, no server): {single:.0f}/s one at a time, "
          f"{batched:.0f}/s in one batch (the limit)")
    print(f"served Classify share: {classify_rate:.0f}/s = {classify_rate / single:.2f}x one-at-a-time"
          f", {classify_rate / batched:.3f}x the batch limit (while sharing 2 cores with the mix)")

    print("\nnon-OK statuses:")
    expected_bad = unexpected = 0
    for (method, want, got), n in sorted(statuses.items()):
        if got == OK and want == OK:
            continue
        ok = got == want
        expected_bad += n if ok else 0
        unexpected += 0 if ok else n
        print(f"  {method:<24}{got:<22}{n:>7}  {'expected' if ok else 'UNEXPECTED (wanted ' + want + ')'}")
    print(f"  expected: {expected_bad}, unexpected: {unexpected}")
    if rebuild:
        print(f"\nrebuild in the middle: {rebuild['seconds']:.1f} s, generation "
              f"{rebuild['generation']}, error {rebuild['error'] or 'none'}; a second rebuild "
              f"meanwhile got {rebuild['second']}")
    anon = {k: v[1] for k, v in rss.items()}
    warm, settled, fresh = anon["after warm-up"], anon["settled"], anon["fresh server"]
    grew = count_stored > 1.1 * len(keys)
    reference = max(fresh, warm) if grew else warm
    print(f"\nindex at the start: {index_before.factory} over {index_before.ntotal}; at the end: "
          f"{index_after.factory} over {index_after.ntotal}")
    print("\nserver RSS MiB (all / anonymous): "
          + ", ".join(f"{k} {v[0]:.0f} / {v[1]:.0f}" for k, v in rss.items())
          + f"\nanonymous: settled / after warm-up = {settled / warm:.2f}x, settled / fresh "
          f"server on the final bank = {settled / fresh:.2f}x (target: settled / "
          f"{'the larger' if grew else 'after warm-up'} <= 1.25x)")
    expected_count = len(keys) + len(set(acked))
    print(f"\nacknowledged Upsert items: {len(acked)}; missing from the store at the end: "
          f"{len(missing)}; store count {count_stored} (server said {count_served}; "
          f"{len(keys)} at the start + {len(set(acked))} acknowledged = {expected_count})")
    print(f"server exit code after SIGTERM: {code}")
    print("\ncheckpoints and index generations in the server's log:")
    for line in server.folds:
        print(f"  {line[:200]}")
    flat = len(rates) < 2 or rates.min() >= 0.75 * rates[0]
    if not flat:
        print(f"FAIL  reads/s fell to {rates.min() / rates[0]:.2f}x the first window (target >= 0.75x)")
    good = (unexpected == 0 and not missing and settled <= 1.25 * reference and code == 0
            and flat
            and not rebuild.get("error") and count_stored == expected_count
            and rebuild.get("second", "FAILED_PRECONDITION") == "FAILED_PRECONDITION")
    print("\nRESULT:", "PASS" if good else "FAIL")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
