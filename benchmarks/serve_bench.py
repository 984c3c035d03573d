"""Serving benchmark: what the gRPC server costs, and what dynamic batching buys.

(1) Classify by vector, 32 concurrent clients against `featurebank serve`:
    queries/s, p50/p99 latency, compared with the in-process Classifier on the
    same queries one call at a time (what a user would otherwise do) and in one
    batch (the limit), and with the framework's floor: a bare grpc.aio server in its
    own process answering the same method with a response of the same size (no
    work), under the same clients. The server's CPU per call (from /proc) against the
    floor's is the cost featurebank adds to gRPC itself (target <= 1.5x). Beside it, the
    work a call cannot skip: the in-process Classifier's CPU per query on one search
    thread, in batches of the size the server formed (from its metrics page), so the
    server's cost splits into gRPC, the search, and what serving adds beyond both.
(2) Classify by image (MobileNetV2 at 224, random weights, CPU), 32 concurrent
    clients, dynamic batching on (max batch 32) versus off (max batch 1):
    throughput ratio, target >= 2.5x.

    python benchmarks/serve_bench.py [--quick] [--only vectors --items 1000000]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._bare_grpc import serve_forever, wait_for_port  # noqa: E402
from benchmarks._checks import Checks  # noqa: E402
from featurebank import store as store_mod  # noqa: E402
from featurebank.core.spec import Spec  # noqa: E402
from featurebank.server.client import FeatureBankClient  # noqa: E402

CLIENTS = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """`featurebank serve` in a subprocess (so clients and server do not share a GIL)."""

    def __init__(self, bank: Path, *extra: str) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "featurebank", "serve", "--bank", str(bank),
               "--port", str(self.port), *extra]
        # a pipe nobody reads could fill up and block the server; closed in close()
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 600
        with FeatureBankClient(self.target) as c:
            while True:
                try:
                    c.wait_until_serving(timeout=2)
                    return
                except Exception:
                    if self.proc.poll() is None and time.monotonic() < deadline:
                        continue
                    self.log.seek(0)
                    print(self.log.read()[-4000:], file=sys.stderr)
                    self.close()
                    raise

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(call: Callable[[int], object], n: int, clients: int) -> dict[str, float]:
    """Calls 0..n-1 spread over `clients` threads; qps and latency percentiles."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(n))
    errors: list[BaseException] = []

    def worker() -> None:
        mine: list[float] = []
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            t0 = time.perf_counter()
            try:
                call(i)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} calls failed, first: {errors[0]}")
    return summary(latencies, wall)


def hammer(target: str, n: int, call: Callable[[FeatureBankClient, int], object]) -> dict[str, float]:
    """`n` calls spread over CLIENTS threads sharing one channel; qps and latency percentiles."""
    with FeatureBankClient(target, timeout=600) as client:
        call(client, 0)  # warm up the channel and the server's first batch
        return load(lambda i: call(client, i), n, CLIENTS)


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hammer_cpu(
    server: Served | BareServer, n: int, call: Callable[[FeatureBankClient, int], object]
) -> tuple[dict[str, float], float]:
    """`hammer`, and the server's CPU seconds per call over it."""
    with FeatureBankClient(server.target, timeout=600) as client:
        call(client, 0)
        before = cpu_seconds(server.proc.pid)
        stats = load(lambda i: call(client, i), n, CLIENTS)
        return stats, (cpu_seconds(server.proc.pid) - before) / n


def batch_counts(port: int) -> tuple[float, float]:
    """(items, batches) the server's classify batcher has run, from its metrics page."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = {}
    for line in text.splitlines():
        for what in ("sum", "count"):
            if line.startswith(f'featurebank_batch_size_{what}{{kind="classify"}}'):
                found[what] = float(line.split()[-1])
    return found.get("sum", 0.0), found.get("count", 0.0)


def work_per_query(bank: Path, queries: np.ndarray, batch: int) -> float:
    """CPU seconds a query's classification costs in process, in batches of `batch`, on a
    thread of its own (one OpenMP thread, as on the server's search threads)."""
    from featurebank.classify.classifier import Classifier

    out: list[float] = []

    def run() -> None:
        with Classifier(bank) as clf:
            clf.classify(queries[:batch])
            start = time.thread_time()
            for i in range(0, len(queries), batch):
                clf.classify(queries[i : i + batch])
            out.append((time.thread_time() - start) / len(queries))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return out[0]


def serve_bare(port: int, answer: bytes) -> int:
    """A grpc.aio server whose Classify parses the request and returns fixed bytes: what
    any Python gRPC service pays before doing anything (the floor of section 1)."""
    import grpc

    from featurebank.v1 import featurebank_pb2 as pb

    async def classify(request: pb.ClassifyRequest, context: object) -> bytes:
        return answer

    handler = grpc.method_handlers_generic_handler("featurebank.v1.FeatureBank", {
        "Classify": grpc.unary_unary_rpc_method_handler(
            classify, request_deserializer=pb.ClassifyRequest.FromString,
            response_serializer=lambda b: b),
        "Check": grpc.unary_unary_rpc_method_handler(
            classify, request_deserializer=lambda b: b, response_serializer=lambda b: b),
    })  # fmt: skip
    return serve_forever(handler, port)


class BareServer:
    """`serve_bare` in its own process, like `Served`."""

    def __init__(self, answer: bytes) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.answer = tempfile.NamedTemporaryFile(suffix=".bin")  # noqa: SIM115 - closed below
        self.answer.write(answer)
        self.answer.flush()
        cmd = [sys.executable, __file__, "--bare-server", str(self.port), self.answer.name]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
        try:
            wait_for_port(self.port, self.proc, "the bare gRPC server")
        except SystemExit:
            self.close()
            raise

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.answer.close()

    def __enter__(self) -> BareServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def summary(latencies: Sequence[float], wall: float) -> dict[str, float]:
    lat = np.sort(np.asarray(latencies)) * 1000
    return {"qps": len(lat) / wall, "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)), "n": float(len(lat))}


def fmt(s: dict[str, float]) -> str:
    return f"{s['qps']:9.1f} q/s   p50 {s['p50']:8.2f} ms   p99 {s['p99']:8.2f} ms"


def vector_bank(root: Path, n: int, dim: int, classes: int) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(classes, dim)).astype(np.float32)
    labels_idx = rng.integers(0, classes, n)
    vectors = centers[labels_idx] + 0.8 * rng.normal(size=(n, dim)).astype(np.float32)
    spec = Spec(backbone="external", weights="external", input_size=None, resize="none",
                dim=dim, dtype="float32")
    with store_mod.create(root, spec) as st:
        st.put_batch([f"v{i}" for i in range(n)], vectors,
                     labels=[f"class{c}" for c in labels_idx],
                     splits=["val" if i % 10 == 0 else "train" for i in range(n)])
    from featurebank.index.build import build_index

    build_index(root)
    queries = centers[rng.integers(0, classes, 4096)] + 0.8 * rng.normal(size=(4096, dim))
    return root, queries.astype(np.float32)


def bench_vectors(tmp: Path, quick: bool, checks: Checks, items: int | None = None) -> None:
    n, dim, calls = (5_000, 64, 1_000) if quick else (50_000, 128, 5_000)
    n = items or n
    bank, queries = vector_bank(tmp / "vectors", n, dim, 20)
    print(f"\n(1) Classify by vector: bank {n} x {dim}, {calls} calls, {CLIENTS} clients")

    from featurebank.classify.classifier import Classifier

    clf = Classifier(bank)
    qs = [queries[i % len(queries)] for i in range(calls)]
    clf.classify(qs[0][None])
    lat: list[float] = []
    start = time.perf_counter()
    for q in qs:
        t0 = time.perf_counter()
        clf.classify(q[None])
        lat.append(time.perf_counter() - t0)
    inproc = summary(lat, time.perf_counter() - start)
    t0 = time.perf_counter()
    clf.classify(np.stack(qs))
    batch_qps = calls / (time.perf_counter() - t0)
    del clf

    def call(c: FeatureBankClient, i: int) -> object:
        return c.classify(vector=qs[i % calls])

    metrics_port = free_port()
    with Served(bank, "--metrics-port", str(metrics_port)) as s:
        before = batch_counts(metrics_port)
        served, served_cpu = hammer_cpu(s, calls, call)
        after = batch_counts(metrics_port)
        example = FeatureBankClient(s.target).classify(vector=qs[0]).SerializeToString()
    with BareServer(example) as bare:
        floor, floor_cpu = hammer_cpu(bare, calls, call)
    batch = max(1, round((after[0] - before[0]) / max(after[1] - before[1], 1)))
    work_cpu = work_per_query(bank, np.stack(qs), batch)
    print(f"  in-process Classifier, one call at a time : {fmt(inproc)}")
    print(f"  in-process Classifier, one batch (limit)  : {batch_qps:9.1f} q/s")
    print(f"  gRPC server, {CLIENTS} concurrent clients      : {fmt(served)}   "
          f"{1e6 * served_cpu:7.0f} us CPU/call")
    print(f"  bare grpc.aio, same calls and sizes       : {fmt(floor)}   "
          f"{1e6 * floor_cpu:7.0f} us CPU/call ({len(example)}-byte answers)")
    print(f"  server / in-process one-at-a-time: {served['qps'] / inproc['qps']:.2f}x   "
          f"server / batch limit: {served['qps'] / batch_qps:.2f}x")
    print(f"  the work itself (Classifier on one search thread, batches of {batch} as the "
          f"server formed them): {1e6 * work_cpu:.0f} us CPU/query")
    print(f"  server CPU per call / (bare floor + the work): "
          f"{served_cpu / (floor_cpu + work_cpu):.2f}x: what serving adds beyond gRPC and "
          f"the search ({1e6 * (served_cpu - floor_cpu - work_cpu):.0f} us a call)")
    ratio = served_cpu / floor_cpu
    text = f"server CPU per call {ratio:.2f}x the bare gRPC floor's (target <= 1.5x)"
    if quick:
        print(f"{'met' if ratio <= 1.5 else 'MISSED'}  {text} (--quick: judged at full size)")
    else:
        checks.check(ratio <= 1.5, text)


def jpegs(count: int, size: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((size, size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def forward_ceiling(embedder: object, reps: int) -> float:
    """Per-image time of the bare model, one image vs a batch of 32: what batching can buy."""
    forward = embedder.forward  # type: ignore[attr-defined]
    one = np.random.default_rng(0).integers(0, 255, (1, 224, 224, 3), dtype=np.uint8)
    many = np.repeat(one, 32, axis=0)
    forward(one)
    forward(many)
    t0 = time.perf_counter()
    for _ in range(32 * reps):
        forward(one)
    single = (time.perf_counter() - t0) / (32 * reps)
    t0 = time.perf_counter()
    for _ in range(reps):
        forward(many)
    batched = (time.perf_counter() - t0) / (32 * reps)
    print(f"  bare model in-process: 1 image {1000 * single:.1f} ms/image, batch of 32 "
          f"{1000 * batched:.1f} ms/image -> ceiling {single / batched:.2f}x")
    return single / batched


def image_bank(root: Path, n: int, quick: bool) -> Path:
    from featurebank.embedder.embedding import Embedder

    embedder = Embedder.create("MobileNetV2", weights="none", image_size=224, dtype="float32")
    forward_ceiling(embedder, 1 if quick else 3)
    images = jpegs(n, 240, seed=1)
    vectors = np.asarray(embedder.embed_images(images), dtype=np.float32)
    with store_mod.create(root, embedder.spec) as st:
        st.put_batch([f"img{i}" for i in range(n)], vectors,
                     labels=[f"class{i % 4}" for i in range(n)],
                     splits=["train"] * n)
    from featurebank.index.build import build_index

    build_index(root)
    return root


def bench_images(tmp: Path, quick: bool, checks: Checks) -> None:
    n_bank, calls = (64, 96) if quick else (256, 640)
    print(f"\n(2) Classify by image: MobileNetV2 224 (weights none, CPU), {calls} calls, "
          f"{CLIENTS} clients")
    bank = image_bank(tmp / "images", n_bank, quick)
    images = jpegs(64, 256, seed=2)
    results = {}
    for name, extra in (("batching off (max batch 1) ", ["--max-batch-size", "1"]),
                        ("batching on  (max batch 32)", ["--max-batch-size", "32",
                                                         "--batch-timeout-ms", "5"])):
        with Served(bank, *extra) as s:
            results[name] = hammer(s.target, calls,
                                   lambda c, i: c.classify(image=images[i % len(images)]))
        print(f"  {name}: {fmt(results[name])}")
    off, on = results.values()
    ratio = on["qps"] / off["qps"]
    print(f"  dynamic batching throughput ratio: {ratio:.2f}x (target >= 2.5x)")
    if quick:
        print("  (--quick: the target is not checked on 96 calls)")
    else:
        checks.check(ratio >= 2.5, f"dynamic batching throughput {ratio:.2f}x >= 2.5x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", choices=["vectors", "images"], default=None)
    parser.add_argument("--items", type=int, default=None,
                        help="vectors in the Classify-by-vector bank (default 50,000; 1,000,000 "
                             "for serving at scale, by hand)")
    parser.add_argument("--bare-server", nargs=2, metavar=("PORT", "ANSWER_FILE"),
                        help=argparse.SUPPRESS)  # the floor's own process (BareServer)
    args = parser.parse_args()
    if args.bare_server:
        return serve_bare(int(args.bare_server[0]), Path(args.bare_server[1]).read_bytes())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(f"serve_bench ({'quick' if args.quick else 'full'}), {os.cpu_count()} CPUs, "
          f"python {sys.version.split()[0]}")
    checks = Checks()
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as d:
        tmp = Path(d)
        if args.only in (None, "vectors"):
            bench_vectors(tmp, args.quick, checks, args.items)
        if args.only in (None, "images"):
            bench_images(tmp, args.quick, checks)
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main())
