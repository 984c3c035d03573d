"""A bank past memory: 4-bit PQ codes re-ranked from the store, against faiss by hand.

Data: full-rank 96-d vectors with a power-law spectrum, 100 Zipf-sized classes stored class
by class, fresh queries near stored items (index_bench's `powerlaw` shape), rounded to
float16 first so that every system holds the very vectors the bank stores. 1,000,000
vectors by default, 50,000 with --quick, 10,000,000 with --large (by hand: about 10 GB of
memory at its peak); 1,000 fresh queries; k=10; 2 threads.

Measured in one run, on the same vectors, the same queries and the same exact L2 ground truth:
1. featurebank: a bank with a float16 store, `build_index` with factory
   `IVF{nlist}[_HNSW32],PQ96x4fs,RStore` (48 bytes of codes a vector) tuned by the build on
   its own held-out sample to recall@10 >= 0.90, searched through `Searcher` in batches of
   1,000. The index holds codes and ids only; the re-ranking reads the stored vectors.
2. faiss by hand, what a user would otherwise run: the same trained codes (featurebank's
   index file, read back) wrapped in `IndexRefineFlat` with the float32 vectors in memory,
   nprobe and k_factor tuned on these very queries to the same recall (its best case).
3. The floor: the same codes searched for featurebank's candidates at its nprobe, with no
   re-ranking and nothing around it: no search through the bank can be faster.
Reported: build time, index and bank bytes per vector, queries/s, recall, and the ratios.

Checks (exit 1 when one fails): every system at >= the target recall on the same truth;
the queries are fresh (none in the bank); featurebank's index holds fewer bytes per vector
than faiss by hand holds in memory.

    python benchmarks/pq_bench.py [--quick | --large] [--n N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._checks import Checks  # noqa: E402
from benchmarks.index_bench import CLASSES, recall  # noqa: E402
from benchmarks.ondisk_bench import folder_bytes  # noqa: E402

K = 10
TARGET = 0.90
DIM = 96
CODES = "PQ96x4fs"
QUERIES = 1000
BATCH = 1000
NPROBES = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
K_FACTORS = (1, 2, 4, 8)


def powerlaw(n: int, n_queries: int, dim: int = DIM, seed: int = 0, chunk: int = 1 << 20
             ) -> tuple[np.ndarray, np.ndarray]:
    """index_bench's power-law shape, drawn in chunks (10M vectors in 4 GB, not 25): bank
    vectors in class order, and fresh queries near stored items; both rounded to float16,
    what the bank stores."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    scale = (1.0 / np.sqrt(np.arange(1, dim + 1))).astype(np.float32)

    def spread(m: int) -> np.ndarray:
        return (rng.standard_normal((m, dim), dtype=np.float32) * scale) @ basis.T.astype(np.float32)

    centres = 2.0 * spread(CLASSES)
    sizes = 1.0 / np.arange(1, CLASSES + 1) ** 1.1
    classes = np.sort(rng.choice(CLASSES, n, p=sizes / sizes.sum()))
    x = np.empty((n, dim), np.float32)
    for i in range(0, n, chunk):
        part = centres[classes[i : i + chunk]] + spread(len(classes[i : i + chunk]))
        x[i : i + chunk] = part.astype(np.float16)
    q = x[rng.integers(0, n, n_queries)] + 0.25 * spread(n_queries)
    return x, q.astype(np.float16).astype(np.float32)


def best_qps(search: Any, q: np.ndarray, rounds: int = 3) -> tuple[float, np.ndarray]:
    """Queries/s (best of `rounds`, batches of BATCH) and the ids found."""
    best, found = float("inf"), np.empty(0)
    for _ in range(rounds):
        t = time.perf_counter()
        found = np.concatenate([search(q[i : i + BATCH]) for i in range(0, len(q), BATCH)])
        best = min(best, time.perf_counter() - t)
    return len(q) / best, found


def coarse_for(n: int) -> str:
    """The lists the auto choice gives n vectors (index/selection.py)."""
    from featurebank.index.families import HNSW_COARSE_MIN_NLIST
    from featurebank.index.selection import nlist_for

    nlist = nlist_for(n)
    return f"IVF{nlist}_HNSW32" if nlist >= HNSW_COARSE_MIN_NLIST else f"IVF{nlist}"


def write_bank(root: Path, x: np.ndarray) -> tuple[float, int]:
    """Seconds to store `x` in a new float16 bank, and the store id of its first vector."""
    from featurebank import store as store_mod
    from featurebank.core.spec import Spec

    spec = Spec(backbone="external", weights="external", input_size=None, resize="none",
                preprocessing="none", pooling="none", dim=x.shape[1], dtype="float16")
    step, t = 200_000, time.perf_counter()
    with store_mod.create(root, spec) as st:
        for i in range(0, len(x), step):
            st.put_batch([f"v{j:09d}" for j in range(i, min(len(x), i + step))], x[i : i + step])
            done = min(len(x), i + step)
            rate = done / (time.perf_counter() - t)
            print(f"  stored {done:,} of {len(x):,} ({rate:,.0f}/s, ETA "
                  f"{(len(x) - done) / rate:.0f} s)", flush=True)
        first = int(st.ids_of(["v000000000"])[0])
    return time.perf_counter() - t, first


def by_hand(index_file: Path, x: np.ndarray, q: np.ndarray, truth: np.ndarray, first: int
            ) -> dict[str, Any]:
    """faiss's own re-ranking on a float32 copy in memory, tuned on these queries (the codes
    hold store ids, `first` upwards: the copy is laid out at those positions)."""
    import faiss

    from featurebank.index import stored_ids

    base = stored_ids.read(index_file)
    ivf = faiss.extract_index_ivf(base)
    exact = faiss.IndexFlatL2(x.shape[1])
    exact.add(np.zeros((first, x.shape[1]), np.float32))  # ids below `first`: never candidates
    exact.add(x[: len(x) - first])  # faiss pairs the two when their counts are equal
    refine = faiss.IndexRefine(base, exact)
    exact.add(x[len(x) - first :])
    truth = truth + first
    for nprobe in NPROBES:
        for kf in K_FACTORS:
            ivf.nprobe, refine.k_factor = nprobe, kf
            r = recall(refine.search(q, K)[1], truth)
            if r >= TARGET:
                rate, found = best_qps(lambda b: refine.search(b, K)[1], q)
                return {"qps": rate, "recall": recall(found, truth), "params": f"nprobe {nprobe}, "
                        f"k_factor {kf}", "bytes": len(faiss.serialize_index(refine)) / len(x)}
    return {"qps": 0.0, "recall": r, "params": "target not reached", "bytes": float("nan")}


def floor(index_file: Path, q: np.ndarray, nprobe: int, candidates: int) -> float:
    """The codes alone, asked for featurebank's candidates at its nprobe."""
    import faiss

    from featurebank.index import stored_ids

    index = stored_ids.read(index_file)
    faiss.extract_index_ivf(index).nprobe = nprobe
    return best_qps(lambda b: index.search(b, candidates)[1], q)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="50,000 vectors, a smoke run")
    size.add_argument("--large", action="store_true", help="10,000,000 vectors (by hand)")
    parser.add_argument("--n", type=int, default=None, help="bank size (default 1,000,000)")
    args = parser.parse_args()
    n = args.n or (50_000 if args.quick else 10_000_000 if args.large else 1_000_000)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import faiss

    from featurebank import store as store_mod
    from featurebank.index.build import build_index
    from featurebank.index.searcher import Searcher

    faiss.omp_set_num_threads(2)
    checks = Checks()
    t = time.perf_counter()
    x, q = powerlaw(n, QUERIES)
    print(f"{n:,} x {DIM} power-law vectors, {QUERIES} fresh queries "
          f"({time.perf_counter() - t:.1f} s); load {os.getloadavg()[0]:.1f}", flush=True)
    t = time.perf_counter()
    dist, truth = faiss.knn(q, x, K)
    print(f"exact neighbours: {time.perf_counter() - t:.1f} s", flush=True)
    checks.check(bool((dist[:, 0] > 0).all()), "fresh queries: none is a stored vector")
    factory = f"{coarse_for(n)},{CODES},RStore"
    tmp = Path(tempfile.mkdtemp(prefix="pq_bench_"))
    try:
        bank = tmp / "bank"
        store_s, first = write_bank(bank, x)
        del x  # the build reads its own copy from the store; by hand reads one back after it
        t = time.perf_counter()
        built = build_index(bank, factory=factory, metric="l2", transform="none",
                            target_recall=TARGET, k=K, threads=2, allow_below_target=True)
        build_s = time.perf_counter() - t
        gen_dir = bank / "indexes" / str(built["generation"])
        index_file = gen_dir / "index.faiss"
        with Searcher.load(bank) as searcher:
            fb_qps, found = best_qps(lambda b: searcher.search(b, K).ids, q)
        fb = {"qps": fb_qps, "recall": recall(found - first, truth), "bytes": folder_bytes(gen_dir) / n,
              "params": ", ".join(f"{k} {v}" for k, v in built["params"].items())}
        bank_bytes = folder_bytes(bank) / n
        with store_mod.open(bank, readonly=True) as st:
            x = st.to_numpy().vectors
        hand = by_hand(index_file, x, q, truth, first)
        del x
        params = built["params"]
        floor_qps = floor(index_file, q, int(params["nprobe"]), K * int(params["k_factor_store"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nstore written in {store_s:.1f} s; featurebank build {build_s:.1f} s "
          f"({factory}; held-out recall {built['recall_at_k']:.4f}, lower bound "
          f"{built['recall_lower_bound']:.4f}); load {os.getloadavg()[0]:.1f}\n")
    print(f"{'system':<36} {'queries/s':>10} {'recall@10':>10} {'index B/vec':>12}  params")
    rows = [("featurebank (codes + store re-rank)", fb), ("faiss by hand (codes + RFlat)", hand)]
    for name, r in rows:
        print(f"{name:<36} {r['qps']:>10,.0f} {r['recall']:>10.4f} {r['bytes']:>12.1f}  {r['params']}")
    print(f"{'the floor: codes alone':<36} {floor_qps:>10,.0f} {'':>10} {'':>12}  same nprobe, "
          f"{K * int(params['k_factor_store'])} candidates")
    print(f"\nthe whole bank: {bank_bytes:.1f} bytes a vector (float16 store {DIM * 2} B of vector, "
          f"keys, labels, change log, index)")
    fair = all(checks.check(r["recall"] >= TARGET, f"{name}: recall@10 {r['recall']:.4f} >= {TARGET}")
               for name, r in rows)
    checks.check(fb["bytes"] < hand["bytes"] or not fair,
                 f"featurebank's index {fb['bytes']:.1f} B/vector < faiss by hand's {hand['bytes']:.1f}")
    if fair:
        print(f"\nfeaturebank / faiss by hand: {fb['qps'] / hand['qps']:.2f}x queries/s, "
              f"{fb['bytes'] / hand['bytes']:.2f}x the memory a vector")
        print(f"featurebank / the floor: {fb['qps'] / floor_qps:.2f}x queries/s")
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main())
