"""Store benchmark: ingest, full scan and file size against what a user would otherwise use.

- ingest: `Store.put_batch` vs raw LMDB with one appended record per vector
  (same batch size, one transaction per batch, same durability);
- scan: `Store.to_numpy` (stored dtype) vs `np.load` of the same array from a .npy file;
- size: the store's file vs the raw vector bytes (and vs the one-record-per-vector file).

Targets: ingest >= 0.8x raw LMDB, scan >= 0.5x np.load, size <= 1.15x raw.
Run: python benchmarks/store_bench.py [--quick] [--n N] [--batch B] [--dir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._checks import Checks  # noqa: E402
from featurebank import store as store_mod  # noqa: E402
from featurebank.core.spec import Spec  # noqa: E402

DIM = 1280


def make_data(n: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    vectors = np.empty((n, DIM), np.float16)
    for s in range(0, n, 10000):
        vectors[s : s + 10000] = rng.standard_normal((min(10000, n - s), DIM), np.float32)
    return vectors, [f"images/{i // 1000:04d}/{i:08d}.jpg" for i in range(n)]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def interleaved(rounds: int, *fns: Callable[[], Any]) -> list[tuple[float, float, Any]]:
    """(best, median, last result) of each fn, run in turn so all see the same machine load."""
    times: list[list[float]] = [[] for _ in fns]
    results: list[Any] = [None] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t, results[i] = timed(fn)
            times[i].append(t)
    return [(min(t), float(np.median(t)), r) for t, r in zip(times, results, strict=True)]


def ingest_both(
    work: Path, vectors: np.ndarray, keys: list[str], batch: int
) -> tuple[float, float]:
    """Seconds spent by raw LMDB and by the store, batch by batch in turn (same conditions).

    Raw LMDB is what one would write by hand: one record per vector, appended, a
    transaction per batch, same durability (sync on commit) as the store.
    """
    env = lmdb.open(str(work / "raw"), map_size=1 << 40)
    spec = Spec("external", "external", None, "none", "none", "none", DIM, "float16")
    st = store_mod.create(work / "bank", spec, map_size=1 << 30)
    t_raw = t_store = 0.0
    try:
        for s in range(0, len(vectors), batch):
            e = min(len(vectors), s + batch)
            t = time.perf_counter()
            with env.begin(write=True) as txn:
                for i in range(s, e):
                    txn.put(i.to_bytes(8, "big"), vectors[i].tobytes(), append=True)
            t_raw += time.perf_counter() - t
            t = time.perf_counter()
            st.put_batch(keys[s:e], vectors[s:e])
            t_store += time.perf_counter() - t
    finally:
        env.close()
        st.close()
    return t_raw, t_store


def raw_lmdb_scan(path: Path, n: int) -> np.ndarray:
    out = np.empty((n, DIM), np.float16)
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin(buffers=True) as txn:
            for i, (_, v) in enumerate(txn.cursor()):
                out[i] = np.frombuffer(v, np.float16)
    finally:
        env.close()
    return out


def _with_columns(items: Any) -> Any:
    """Touch the lazily built columns, as a caller needing keys and labels would."""
    return items.keys, items.labels, items.splits


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.mdb"))


def verdict(ratio: float, target: float, higher_is_better: bool = True) -> str:
    ok = ratio >= target if higher_is_better else ratio <= target
    return "meets target" if ok else "MISSES target"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="20,000 vectors instead of 200,000")
    p.add_argument("--n", type=int, help="number of vectors")
    p.add_argument("--batch", type=int, default=1024, help="vectors per transaction")
    p.add_argument("--dir", type=Path, help="where to write (default: a temporary directory)")
    args = p.parse_args(argv)
    n = args.n or (20_000 if args.quick else 200_000)
    work = Path(tempfile.mkdtemp(prefix="store-bench-", dir=args.dir))
    try:
        return run(work, n, args.batch, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, n: int, batch: int, quick: bool = False) -> int:
    vectors, keys = make_data(n)
    raw_bytes = vectors.nbytes
    mib = raw_bytes / (1 << 20)
    print(f"store benchmark: {n:,} x {DIM} float16 ({mib:.0f} MiB), batches of {batch}, in {work}")

    t_raw, t_store = ingest_both(work, vectors, keys, batch)
    np.save(work / "vectors.npy", vectors)

    st = store_mod.open(work / "bank", readonly=True)
    try:
        (t_npy, med_npy, from_npy), (t_scan, med_scan, items), (t_rawscan, _, _) = interleaved(
            5,
            lambda: np.load(work / "vectors.npy"),
            lambda: st.to_numpy(dtype=np.float16),
            lambda: raw_lmdb_scan(work / "raw", n),
        )
        (t_npy32, _, _), (t_scan32, _, items32) = interleaved(
            2, lambda: np.load(work / "vectors.npy").astype(np.float32), lambda: st.to_numpy()
        )
        t_cols, _ = timed(lambda: _with_columns(st.to_numpy(dtype=np.float16)))
        store_size = st.stats()["size_bytes"]
        rng = np.random.default_rng(1)
        probes = [rng.integers(0, n, 10) for _ in range(200)]
        t_labels, _ = timed(lambda: [st.labels_of(p) for p in probes])
        t_get, _ = timed(lambda: [st.get(p[:1]) for p in probes])
    finally:
        st.close()
    assert np.array_equal(items.vectors, from_npy) and items.keys == keys
    assert items32.vectors.dtype == np.float32 and len(items32) == n
    raw_size = size_of(work / "raw")

    ingest_ratio = (n / t_store) / (n / t_raw)
    scan_ratio = t_npy / t_scan
    size_ratio = store_size / raw_bytes
    rows = [
        ("ingest", "Store.put_batch", f"{n / t_store:,.0f} vec/s ({mib / t_store:.0f} MiB/s)",
         "raw LMDB, 1 record/vector", f"{n / t_raw:,.0f} vec/s"),
        ("scan", "Store.to_numpy(float16)", f"{t_scan:.3f} s ({mib / t_scan:.0f} MiB/s)",
         "np.load(.npy)", f"{t_npy:.3f} s"),
        ("scan f32", "Store.to_numpy()", f"{t_scan32:.3f} s",
         "np.load(.npy).astype(f32)", f"{t_npy32:.3f} s"),
        ("scan raw", "", "", "raw LMDB cursor scan", f"{t_rawscan:.3f} s"),
        ("size", "store file", f"{store_size / (1 << 20):.1f} MiB",
         "raw vector bytes", f"{mib:.1f} MiB"),
        ("size raw", "", "", "raw LMDB file (1 record/vector)",
         f"{raw_size / (1 << 20):.1f} MiB"),
    ]  # fmt: skip
    for what, ours, ours_v, theirs, theirs_v in rows:
        print(f"  {what:<9} {ours:<24} {ours_v:<28} {theirs:<32} {theirs_v}")
    print("ratios:")
    print(
        f"  ingest  {ingest_ratio:5.2f}x raw LMDB append rate   (target >= 0.80x: "
        f"{verdict(ingest_ratio, 0.8)})"
    )
    print(
        f"  scan    {scan_ratio:5.2f}x np.load speed            (target >= 0.50x: "
        f"{verdict(scan_ratio, 0.5)}; best of 5, median runs {med_npy / med_scan:.2f}x)"
    )
    print(
        f"  size    {size_ratio:5.3f}x raw vector bytes        (target <= 1.15x: "
        f"{verdict(size_ratio, 1.15, higher_is_better=False)}); "
        f"one record per vector: {raw_size / raw_bytes:.3f}x"
    )
    print(
        f"  scan f32 {t_npy32 / t_scan32:4.2f}x np.load+astype; raw LMDB cursor scan "
        f"{t_npy / t_rawscan:.2f}x np.load"
    )
    print(
        f"  to_numpy(float16) with keys, labels and splits read: {t_cols:.3f} s "
        f"({t_npy / t_cols:.2f}x np.load)"
    )
    print(
        f"lookups: labels_of(10 random ids) {t_labels / len(probes) * 1e6:.0f} us, "
        f"get(1 id) {t_get / len(probes) * 1e6:.0f} us"
    )
    checks = Checks()  # bytes on disk do not depend on the machine's load: always checked
    checks.check(size_ratio <= 1.15, f"store size {size_ratio:.3f}x raw vector bytes <= 1.15x")
    if quick:
        print("(--quick: speed targets not checked)")
    else:
        checks.check(ingest_ratio >= 0.8, f"ingest {ingest_ratio:.2f}x raw LMDB >= 0.80x")
        checks.check(scan_ratio >= 0.5, f"scan {scan_ratio:.2f}x np.load >= 0.50x")
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main())
