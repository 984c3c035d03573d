"""The Ray engine against the local one on this machine, and how its actor pool scales.

Data shaped like users' data: digit images (scikit-learn's digits, as the demo writes
them, in MNIST-like 28x28 frames) jittered so no two files are the same, written as PNG
files in class folders (class-ordered), with imbalanced classes (class c has about
(c + 1) / 5.5 of the mean count) and 1% of the files corrupt (noisy inputs the job must
record as failures). Model: the shipped digits CNN (embedder/models/digits_cnn.keras).

Measured in one run:
  (a) the local job (`featurebank embed`, engine local) end to end;
  (b) the Ray job on a local Ray cluster of this machine's CPUs (started once, before), one
      model actor: end to end (actor start-up and the commit included), and the pool's own
      rate (first shard started to last shard finished); overhead ratio = Ray images/s /
      local images/s (target >= 0.8);
  (c) the limits: decoding alone and the compiled forward pass alone over decoded pixels;
  (d) engine scaling with a stand-in model that sleeps a fixed time per batch (so the
      figures measure Ray, not this machine's cores): 1 -> 2 -> 4 actors, against the
      ideal actors * batch / delay;
  (e) the index: a sharded build on Ray against the single-process build of the same
      factory and training sample (equal bytes checked), on clustered vectors.

Run: python benchmarks/scale_bench.py [--quick] [--n N] [--vectors N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODEL = ROOT / "embedder" / "models" / "digits_cnn.keras"

from benchmarks._checks import Checks  # noqa: E402


def make_images(root: Path, n: int, seed: int = 0) -> int:
    """n jittered digit PNGs in class folders, imbalanced, 1% corrupt; returns corrupt count."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from featurebank.demo import to_mnist_frame

    digits = load_digits()
    rng = np.random.default_rng(seed)
    weights = np.arange(1, 11) / np.arange(1, 11).sum()
    classes = np.sort(rng.choice(10, n, p=weights))  # class-ordered
    bad = 0
    for i, c in enumerate(classes):
        pool = np.flatnonzero(digits.target == c)
        frame = to_mnist_frame(digits.images[rng.choice(pool)]).astype(np.int16)
        frame = np.roll(frame, tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
        frame = np.clip(frame + rng.integers(-12, 13, frame.shape), 0, 255).astype(np.uint8)
        path = root / str(c) / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if rng.random() < 0.01:
            path.write_bytes(b"\x89PNG truncated")
            bad += 1
        else:
            Image.fromarray(frame).save(path)
    return bad


def limits(images: Path, batch: int = 64) -> dict[str, float]:
    """Decoding alone and the compiled forward pass alone (the job cannot beat either)."""
    from featurebank.embedder import sources
    from featurebank.embedder.embedding import Embedder
    from featurebank.embedder.stages import Loader, Timings, decoded_batches

    src = sources.open_source(images)
    emb = Embedder.create(str(MODEL))
    loader = Loader(src, src.records, emb.input_size, emb.spec.resize, 10**8, Timings())
    t = time.perf_counter()
    batches = [p for p, _ in decoded_batches(loader, batch, threads=os.cpu_count() or 2)]
    decode = len(src.records) / (time.perf_counter() - t)
    pixels = np.concatenate(batches)
    emb.forward(pixels[:batch])
    t = time.perf_counter()
    for s in range(0, len(pixels), batch):
        emb.forward(pixels[s : s + batch])
    forward = len(pixels) / (time.perf_counter() - t)
    # on shared cores decoding and the model take turns: the job's limit is the serial sum
    both = 1 / (1 / decode + 1 / forward)
    return {"decode_only_images_per_s": round(decode, 1),
            "forward_only_images_per_s": round(forward, 1),
            "decode_then_forward_images_per_s": round(both, 1)}  # fmt: skip


def embedding(work: Path, n: int) -> dict[str, Any]:
    from featurebank.embedder.embedding import make_spec
    from featurebank.embedder.pipeline import embed
    from featurebank.embedder.ray_job import run

    images = work / "images"
    corrupt = make_images(images, n)
    out: dict[str, Any] = {"images": n, "corrupt": corrupt}
    local = embed(str(images), str(work / "local"), str(MODEL), progress=False)
    out["local_images_per_s"] = round(local["embedded"] / local["seconds_total"], 1)
    out["local_images_per_s_run"] = local["images_per_s"]  # model built, job running
    t = time.perf_counter()
    ray_s = run(str(images), str(work / "ray"), make_spec(str(MODEL)), shard_size=1000,
                workers=(1, 1), cpus_per_worker=1.0, progress=False)  # fmt: skip
    wall = time.perf_counter() - t
    assert ray_s["embedded"] == local["embedded"] and ray_s["failed"] == local["failed"] == corrupt
    out["ray_images_per_s_end_to_end"] = round(ray_s["embedded"] / wall, 1)
    out["ray_pool_images_per_s"] = ray_s["pool_images_per_s"]
    out["overhead_ratio_end_to_end"] = round(out["ray_images_per_s_end_to_end"]
                                             / out["local_images_per_s"], 3)  # fmt: skip
    out["overhead_ratio_pool"] = round(
        ray_s["pool_images_per_s"] / out["local_images_per_s_run"], 3
    )
    out.update(limits(images))
    return out


def scaling(work: Path, delay: float, batch: int, shards_per_actor: int) -> dict[str, Any]:
    from featurebank.embedder.ray_job import run
    from tests.support.ray_models import SleepingModel, stand_in_spec, write_images

    rows = {}
    for actors in (1, 2, 4):
        n = actors * shards_per_actor * batch
        src = write_images(work / f"standin{actors}.npy", n)
        s = run(str(src), str(work / f"standin{actors}"), stand_in_spec(), batch_size=batch,
                shard_size=batch, workers=(actors, actors), cpus_per_worker=0.25,
                progress=False, model=SleepingModel(delay=delay))  # fmt: skip
        ideal = actors * batch / delay
        rows[actors] = {"images_per_s": s["pool_images_per_s"], "ideal": ideal,
                        "of_ideal": round(s["pool_images_per_s"] / ideal, 3)}  # fmt: skip
    for actors in (2, 4):
        rows[actors]["speedup_vs_1"] = round(rows[actors]["images_per_s"]
                                             / rows[1]["images_per_s"], 2)  # fmt: skip
    return rows


def index(work: Path, n: int, dim: int, factory: str, shards: int) -> dict[str, Any]:
    import faiss

    from featurebank import store as store_mod
    from featurebank.core.spec import Spec
    from featurebank.index import build
    from featurebank.index.ray_build import build_index_ray
    from featurebank.index.views import INDEX_FILE

    rng = np.random.default_rng(7)
    centres = rng.standard_normal((200, 24))
    sizes = rng.zipf(1.6, 200).astype(float)  # imbalanced clusters
    cluster = np.sort(rng.choice(200, n, p=sizes / sizes.sum()))  # cluster-ordered
    mapping = rng.standard_normal((24, dim)) / np.sqrt(24)
    x = ((centres[cluster] + rng.standard_normal((n, 24))) @ mapping
         + 0.05 * rng.standard_normal((n, dim))).astype(np.float32)  # fmt: skip
    spec = Spec(backbone="external", weights="external", input_size=None, resize="none",
                preprocessing="none", pooling="none", dim=dim, dtype="float32")  # fmt: skip
    bank = work / "vectors"
    with store_mod.create(bank, spec) as st:
        for s in range(0, n, 50_000):
            st.put_batch([f"v{i}" for i in range(s, min(s + 50_000, n))], x[s : s + 50_000])
    local = build.build_index(bank, factory=factory, metric="l2")
    m = build_index_ray(bank, factory=factory, metric="l2", train_sample=build.TRAIN_MAX,
                        shards=shards)  # fmt: skip

    def read(gen: int) -> bytes:
        index = faiss.read_index(str(bank / "indexes" / str(gen) / INDEX_FILE))
        return bytes(faiss.serialize_index(index).tobytes())

    same = read(local["generation"]) == read(m["generation"])
    single_s = local["build_seconds"]
    return {"vectors": n, "dim": dim, "factory": factory, "shards": m["shards"],
            "single_build_s": single_s, "ray_build_s": m["build_seconds"],
            "ray_adding_s": m["seconds_adding"], "ray_merging_s": m["seconds_merging"],
            "speed_ratio": round(single_s / m["build_seconds"], 3), "identical_bytes": same,
            "recall_at_10": m["recall_at_k"], "nprobe": m["params"].get("nprobe")}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="images to embed")
    parser.add_argument("--vectors", type=int, default=100_000, help="vectors to index")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--factory", default="IVF512,Flat")
    parser.add_argument("--delay", type=float, default=0.2, help="stand-in seconds per batch")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="300 images, 10,000 vectors with IVF64,Flat, 0.05 s stand-in delay")
    args = parser.parse_args()
    if args.quick:
        args.n, args.vectors, args.factory, args.delay = 300, 10_000, "IVF64,Flat", 0.05

    from featurebank.embedder.ray_cluster import session

    cpus = os.cpu_count() or 2
    results: dict[str, Any] = {"cpus": cpus}
    with tempfile.TemporaryDirectory() as tmp, session(num_cpus=cpus):
        work = Path(tmp)
        results["embedding"] = embedding(work, args.n)
        results["scaling"] = scaling(work, args.delay, batch=16, shards_per_actor=6)
        results["index"] = index(work, args.vectors, args.dim, args.factory, shards=cpus)
    checks = Checks()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        report(results)
    ix = results["index"]
    checks.check(ix["identical_bytes"], "the sharded Ray build wrote the same index bytes as the "
                 "single-process build (same factory, same training sample)")
    if not args.quick:
        ratio = results["embedding"]["overhead_ratio_end_to_end"]
        checks.check(ratio >= 0.8, f"Ray job end to end / local {ratio} >= 0.8")
    return checks.exit_code()


def report(results: dict[str, Any]) -> None:
    """The figures in words (--json prints them as they are)."""
    cpus = results["cpus"]
    e, sc, ix = results["embedding"], results["scaling"], results["index"]
    print(f"machine: {cpus} CPUs; {e['images']} digit PNGs ({e['corrupt']} corrupt), "
          "class-ordered, imbalanced")  # fmt: skip
    print(f"limits: decode only {e['decode_only_images_per_s']} img/s, "
          f"forward only {e['forward_only_images_per_s']} img/s, one after the other "
          f"{e['decode_then_forward_images_per_s']} img/s")
    print(f"local job: {e['local_images_per_s']} img/s end to end (model build included), "
          f"{e['local_images_per_s_run']} img/s once running")
    limit = e["decode_then_forward_images_per_s"]
    print(f"Ray job (1 actor): {e['ray_images_per_s_end_to_end']} img/s end to end, actor "
          f"start-up (TensorFlow, model) and commit included (ratio to local "
          f"{e['overhead_ratio_end_to_end']}; target >= 0.8); pool "
          f"{e['ray_pool_images_per_s']} img/s once running (ratio to local running "
          f"{e['overhead_ratio_pool']}; {e['ray_pool_images_per_s'] / limit:.0%} of the limit)")
    for actors, row in sc.items():
        extra = f", {row['speedup_vs_1']}x of 1 actor" if "speedup_vs_1" in row else ""
        print(f"stand-in model, {actors} actor(s): {row['images_per_s']} img/s "
              f"({row['of_ideal']:.0%} of ideal {row['ideal']:.0f}{extra})")
    print(f"index {ix['factory']} over {ix['vectors']} x {ix['dim']}: single {ix['single_build_s']}"
          f" s, Ray {ix['ray_build_s']} s with {ix['shards']} shards (adding "
          f"{ix['ray_adding_s']} s, merging {ix['ray_merging_s']} s); speed ratio "
          f"{ix['speed_ratio']}; identical bytes: {ix['identical_bytes']}; "
          f"recall@10 {ix['recall_at_10']:.4f} at nprobe {ix['nprobe']}")


if __name__ == "__main__":
    sys.exit(main())
