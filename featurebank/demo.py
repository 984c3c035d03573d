"""`make demo`: featurebank's main job end to end, offline, with the commands the README shows.

Why a script of CLI calls rather than library calls: the demo is the quickstart. Each step is
the `featurebank` command a user would type, printed before it runs, so what the demo shows is
exactly what the README documents and what a user can repeat by hand.

The task is few-shot transfer: the shipped MNIST backbone (embedder/models/digits_cnn.keras)
embeds scikit-learn's 8x8 digits, which come from another source and resolution, and only 5
images per class are labelled. Steps:

1. write the digits as PNG files in class folders; hold out a test split (labelled in the bank
   as split `test`, used by `featurebank eval`), and keep 20 more images aside for step 5;
2. `featurebank embed` into a fresh bank with the shipped backbone;
3. `featurebank labels import`: 5 labelled images per class, the rest unlabelled;
4. `featurebank index build`, `featurebank head train`, `featurebank eval` (writes a report);
5. `featurebank serve` in the background, `featurebank classify` held-out images over gRPC,
   `featurebank upsert` 20 more labelled images, `featurebank rebuild`, classify again; SIGTERM.

Everything lands in WORKDIR/demo-bank and WORKDIR/demo-data (both removed first), with
demo-bank/demo-summary.json holding the accuracies and gRPC predictions (the test reads it).
Exits non-zero when any step fails.

Run: `python -m featurebank.demo [--workdir DIR]` (default $FEATUREBANK_DEMO_DIR or the
current directory).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurebank.embedder.devices import NOISE, write_stderr

BANK_DIR = "demo-bank"
DATA_DIR = "demo-data"
SUMMARY_FILE = "demo-summary.json"
LABELS_PER_CLASS = 5
TEST_FRACTION = 0.3
UPSERT_PER_CLASS = 2
SHOW_ROWS = 10
SEED = 0
STEP_TIMEOUT_S = 600.0
SERVE_START_TIMEOUT_S = 180.0
SERVE_STOP_TIMEOUT_S = 60.0
DIGIT_BOX = 20  # MNIST puts a digit's 20x20 box in the middle of a 28x28 frame
FRAME = 28


class DemoFailed(Exception):
    """A step exited non-zero or did not produce what the next step needs."""


@dataclass
class Digits:
    """Where the demo's images went, and what the held-out ones really are."""

    images_dir: Path  # embedded into the bank: train/<digit>/*.png and test/<digit>/*.png
    new_dir: Path  # upserted over gRPC in step 5: <digit>/*.png
    labels_csv: Path
    test_paths: list[Path]  # the held-out images under images_dir/test
    test_labels: list[str]
    labelled: int
    unlabelled: int
    raw_pixel_1nn: float  # the no-transfer baseline with the same labelled images
    counts: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------- step 1: the images


def to_mnist_frame(image_8x8: np.ndarray) -> np.ndarray:
    """An 8x8 scikit-learn digit (0-16) as a 28x28 uint8 image laid out like MNIST.

    Why not leave the 8x8 file to the embedder's resize: upscaled to fill the whole 28x28
    frame, the strokes sit where MNIST has its black border, and the source backbone never saw
    that. Scaled to the central 20x20 box with a 4-pixel border, the digits look like the
    backbone's training data (few-shot 1-NN on the features: about 0.92 versus 0.95).
    """
    from PIL import Image

    gray = np.clip(np.rint(image_8x8 * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    box = Image.fromarray(gray).resize((DIGIT_BOX, DIGIT_BOX), Image.Resampling.BILINEAR)
    frame = np.zeros((FRAME, FRAME), dtype=np.uint8)
    o = (FRAME - DIGIT_BOX) // 2
    frame[o : o + DIGIT_BOX, o : o + DIGIT_BOX] = np.asarray(box)
    return frame


def write_digits(data_dir: Path, labels_per_class: int, seed: int = SEED) -> Digits:
    """Write load_digits as PNGs in class folders, the labels CSV, and the raw-pixel baseline."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neighbors import KNeighborsClassifier

    digits = load_digits()
    images, target = digits.images, digits.target.astype(int)
    order = np.arange(len(target))
    pool, test = train_test_split(
        order, test_size=TEST_FRACTION, stratify=target, random_state=seed
    )
    rng = np.random.default_rng(seed)
    labelled: list[int] = []
    new: list[int] = []
    for c in range(10):
        members = rng.permutation(pool[target[pool] == c])
        labelled.extend(members[:labels_per_class].tolist())
        new.extend(members[labels_per_class : labels_per_class + UPSERT_PER_CLASS].tolist())
    new_set = set(new)
    bank_pool = [i for i in pool.tolist() if i not in new_set]

    images_dir, new_dir = data_dir / "images", data_dir / "new"

    def write(i: int, folder: Path) -> Path:
        path = folder / str(target[i]) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_mnist_frame(images[i])).save(path)
        return path

    for i in bank_pool:
        write(i, images_dir / "train")
    test_paths = [write(i, images_dir / "test") for i in test.tolist()]
    for i in new:
        write(i, new_dir)

    # keys are paths relative to the embedded folder, as `featurebank embed` names them
    labels_csv = data_dir / "labels.csv"
    with open(labels_csv, "w", newline="") as f:
        w = csv.writer(f)
        for i in sorted(labelled):
            w.writerow([f"train/{target[i]}/{i:04d}.png", str(target[i]), "train"])
        for i in sorted(test.tolist()):
            w.writerow([f"test/{target[i]}/{i:04d}.png", str(target[i]), "test"])

    flat = images.reshape(len(images), -1)
    knn = KNeighborsClassifier(n_neighbors=1).fit(flat[labelled], target[labelled])
    raw_acc = float(knn.score(flat[test], target[test]))
    return Digits(
        images_dir=images_dir,
        new_dir=new_dir,
        labels_csv=labels_csv,
        test_paths=test_paths,
        test_labels=[str(target[i]) for i in test.tolist()],
        labelled=len(labelled),
        unlabelled=len(bank_pool) - len(labelled),
        raw_pixel_1nn=raw_acc,
        counts={"bank_train": len(bank_pool), "test": len(test), "new": len(new)},
    )


# ---------------------------------------------------------------------- running commands


def featurebank_command() -> list[str]:
    """The installed console script beside this interpreter, else `python -m featurebank`."""
    script = Path(sys.executable).parent / "featurebank"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "featurebank"]


def _read_all(src: Any, into: list[bytes]) -> None:
    into.append(src.read())


def _copy_filtered(src: Any) -> None:
    """Copy a child's stderr to ours as it comes (progress bars included), minus NOISE lines."""
    pending = b""
    while chunk := os.read(src.fileno(), 65536):
        pending += chunk
        parts = re.split(rb"(?<=[\r\n])", pending)
        pending = parts.pop()  # incomplete tail (may be b"")
        out = b"".join(p for p in parts if not NOISE.match(p))
        if out:
            write_stderr(out)
    if pending and not NOISE.match(pending):
        write_stderr(pending)


class Runner:
    """Prints each `featurebank ...` command as a user would type it, then runs it in workdir."""

    def __init__(self, workdir: Path, verbose: bool = False) -> None:
        self.workdir = workdir
        self.verbose = verbose
        self.base = featurebank_command()
        self.env = dict(os.environ)
        self.env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's own logging quiet
        self.env.setdefault("PYTHONUNBUFFERED", "1")

    def show(self, args: Sequence[str], display: str | None = None) -> None:
        print(f"\n$ {display or shlex.join(['featurebank', *args])}", flush=True)

    def run(self, args: Sequence[str], display: str | None = None, capture: bool = False) -> str:
        """Run `featurebank ARGS`; stdout is returned when captured, else it goes to ours."""
        self.show(args, display)
        proc = subprocess.Popen(
            [*self.base, *args],
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.PIPE if capture else None,
            stderr=None if self.verbose else subprocess.PIPE,
        )
        captured: list[bytes] = []
        readers = []
        if proc.stdout is not None:
            readers.append(threading.Thread(target=_read_all, args=(proc.stdout, captured)))
        if proc.stderr is not None:
            readers.append(threading.Thread(target=_copy_filtered, args=(proc.stderr,)))
        for t in readers:
            t.daemon = True
            t.start()
        try:
            proc.wait(timeout=STEP_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            proc.kill()
            proc.wait()
            raise DemoFailed(f"`featurebank {args[0]}` did not finish in {e.timeout:.0f}s") from e
        finally:
            for t in readers:
                t.join(timeout=10)
        text = b"".join(captured).decode(errors="replace")
        if proc.returncode != 0:
            print(text, end="")
            raise DemoFailed(f"`featurebank {args[0]}` exited with status {proc.returncode}")
        return text

    def start(self, args: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
        """Start a long-running command in the background, its output going to `log_path`."""
        self.show(args, shlex.join(["featurebank", *args]) + " &")
        with open(log_path, "wb") as log:
            return subprocess.Popen(
                [*self.base, *args],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )


def rel(path: Path, workdir: Path) -> str:
    """`path` as the user would type it from the workdir."""
    try:
        return str(path.resolve().relative_to(workdir.resolve()))
    except ValueError:
        return str(path.resolve())


def free_port() -> int:
    """A free loopback port (the tiny race before the server binds it is acceptable here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(address: str, server: subprocess.Popen[bytes], log_path: Path) -> float:
    """Poll grpc.health.v1 until SERVING; fail fast if the server process dies first."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    start = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if server.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise DemoFailed(f"the server exited with status {server.returncode}:\n{tail}")
            if time.monotonic() - start > SERVE_START_TIMEOUT_S:
                raise DemoFailed(f"the server was not SERVING after {SERVE_START_TIMEOUT_S:.0f}s")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - start
            except grpc.RpcError:
                pass
            time.sleep(0.5)


def stop_server(server: subprocess.Popen[bytes]) -> int:
    """SIGTERM and wait: the server drains in-flight calls and closes the store."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=SERVE_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            raise DemoFailed(
                f"the server ignored SIGTERM for {SERVE_STOP_TIMEOUT_S:.0f}s"
            ) from None
    return int(server.returncode)


# ---------------------------------------------------------------------- reading results


def parse_classify(output: str) -> list[dict[str, Any]]:
    """`featurebank classify --json` prints one JSON object per image."""
    rows = []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("{"):
            r = json.loads(line)
            labels = r.get("labels") or []
            rows.append(
                {
                    "image": r["image"],
                    "predicted": labels[0]["label"] if labels else None,
                    "probability": float(labels[0].get("probability", 0.0)) if labels else 0.0,
                    "labels": [x["label"] for x in labels],
                    "probabilities": [float(x.get("probability", 0.0)) for x in labels],
                    "index_generation": int(r.get("index_generation", 0)),
                    "head_generation": int(r.get("head_generation", 0)),
                }
            )
    return rows


def accuracy(rows: list[dict[str, Any]], truth: dict[str, str]) -> float:
    return float(np.mean([r["predicted"] == truth[r["image"]] for r in rows])) if rows else 0.0


def show_predictions(rows: list[dict[str, Any]], truth: dict[str, str], n: int) -> None:
    """A few rows of predicted versus true, one per class where possible, then the tally."""
    picked: list[dict[str, Any]] = []
    seen: set[str] = set()
    for r in rows:
        if truth[r["image"]] not in seen:
            picked.append(r)
            seen.add(truth[r["image"]])
        if len(picked) == n:
            break
    print(f"  {'image':<34} {'true':>5} {'predicted':>10} {'prob':>6}")
    for r in picked:
        mark = "" if r["predicted"] == truth[r["image"]] else "   <- wrong"
        print(
            f"  {r['image']:<34} {truth[r['image']]:>5} {r['predicted']!s:>10} "
            f"{r['probability']:>6.3f}{mark}"
        )
    wrong = sum(r["predicted"] != truth[r["image"]] for r in rows)
    print(f"  accuracy over gRPC: {accuracy(rows, truth):.4f} ({len(rows) - wrong}/{len(rows)})")


def newest_report(bank: Path) -> Path | None:
    reports = sorted((bank / "reports").glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)
    return reports[-1] if reports else None


def eval_accuracies(metrics_path: Path) -> dict[str, float]:
    data = json.loads(metrics_path.read_text())
    modes = data.get("modes", {})
    return {m: float(v["accuracy"]) for m, v in modes.items() if "accuracy" in v}


# ---------------------------------------------------------------------- the demo


def run_demo(
    workdir: Path, labels_per_class: int = LABELS_PER_CLASS, verbose: bool = False
) -> dict[str, Any]:
    """All five steps; returns the summary also written to demo-bank/demo-summary.json."""
    from featurebank.embedder.source_model import FEATURE_LAYER, MODEL_PATH

    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    bank, data = workdir / BANK_DIR, workdir / DATA_DIR
    for d in (bank, data):
        shutil.rmtree(d, ignore_errors=True)
    fb = Runner(workdir, verbose)
    bank_arg = rel(bank, workdir)
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.monotonic() - t0, 2)

    print(f"== 1. scikit-learn digits -> PNG files in {rel(data, workdir)}/")
    t0 = time.monotonic()
    digits = write_digits(data, labels_per_class)
    lap("write_images", t0)
    print(
        f"wrote {digits.counts['bank_train']} pool + {digits.counts['test']} held-out images "
        f"(28x28, MNIST layout) to {rel(digits.images_dir, workdir)}/{{train,test}}/<digit>/, "
        f"{digits.counts['new']} more to {rel(digits.new_dir, workdir)}/ for later"
    )
    print(
        f"labels: {digits.labelled} pool images ({labels_per_class} per class) + the held-out "
        f"test split in {rel(digits.labels_csv, workdir)}; {digits.unlabelled} stay unlabelled"
    )
    print(f"baseline: 1-NN on raw pixels with the same labels: {digits.raw_pixel_1nn:.4f}")

    print("\n== 2. embed every image with the shipped backbone (a CNN trained on MNIST)")
    t0 = time.monotonic()
    fb.run(
        [
            "embed", rel(digits.images_dir, workdir), "--bank", bank_arg,
            "--backbone", rel(MODEL_PATH, workdir), "--layer", FEATURE_LAYER, "--labels", "none",
        ]
    )  # fmt: skip
    lap("embed", t0)

    print(f"\n== 3. few-shot labels: {labels_per_class} per class")
    t0 = time.monotonic()
    fb.run(["labels", "import", "--bank", bank_arg, rel(digits.labels_csv, workdir)])
    lap("labels_import", t0)

    print("\n== 4. index, head, and evaluation on the held-out split")
    t0 = time.monotonic()
    fb.run(["index", "build", "--bank", bank_arg])
    lap("index_build", t0)
    t0 = time.monotonic()
    fb.run(["head", "train", "--bank", bank_arg])
    lap("head_train", t0)
    t0 = time.monotonic()
    fb.run(["eval", "--bank", bank_arg, "--split", "test"])
    lap("eval", t0)
    metrics_path = newest_report(bank)
    if metrics_path is None:
        raise DemoFailed(f"`featurebank eval` wrote no report under {bank}/reports")
    acc = eval_accuracies(metrics_path)
    for needed in ("knn", "head", "hybrid"):
        if needed not in acc:
            raise DemoFailed(f"{metrics_path} has no accuracy for mode {needed!r}")
    report_html = metrics_path.parent / "index.html"
    print(
        f"\nheld-out accuracy with {labels_per_class} labels per class: "
        + ", ".join(f"{m} {acc[m]:.4f}" for m in ("knn", "head", "hybrid", "stacked") if m in acc)
        + f"; raw-pixel 1-NN {digits.raw_pixel_1nn:.4f}"
    )
    print(f"report: {rel(report_html, workdir)}")

    print("\n== 5. serve over gRPC, classify, add 20 labels, rebuild, classify again")
    port = free_port()
    address = f"127.0.0.1:{port}"
    log_path = bank / "serve.log"
    t0 = time.monotonic()
    server = fb.start(["serve", "--bank", bank_arg, "--port", str(port)], log_path)
    grpc_summary: dict[str, Any] = {}
    try:
        waited = wait_serving(address, server, log_path)
        lap("serve_start", t0)
        print(f"server on {address} is SERVING (health checked after {waited:.1f}s)")
        test_args = [rel(p, workdir) for p in digits.test_paths]
        truth = dict(zip(test_args, digits.test_labels, strict=True))
        glob_display = rel(digits.images_dir / "test", workdir) + "/*/*.png"
        classify = ["classify", *test_args, "--server", address, "--json"]
        shown = f"featurebank classify {glob_display} --server {address} --json"

        t0 = time.monotonic()
        before = parse_classify(fb.run(classify, display=shown, capture=True))
        lap("classify_before", t0)
        show_predictions(before, truth, SHOW_ROWS)

        t0 = time.monotonic()
        new_arg = rel(digits.new_dir, workdir)
        fb.run(["upsert", new_arg, "--folder-labels", "--split", "train", "--server", address])
        fb.run(["rebuild", "--retrain-head", "--server", address])
        lap("upsert_rebuild", t0)

        t0 = time.monotonic()
        after = parse_classify(fb.run(classify, display=shown, capture=True))
        lap("classify_after", t0)
        show_predictions(after, truth, SHOW_ROWS)
        if len(before) != len(test_args) or len(after) != len(test_args):
            raise DemoFailed(
                f"classify answered {len(before)} and {len(after)} of {len(test_args)} images"
            )
        a0, a1 = accuracy(before, truth), accuracy(after, truth)
        print(
            f"\n{UPSERT_PER_CLASS * 10} more labels: accuracy over gRPC on "
            f"{len(test_args)} held-out images {a0:.4f} -> {a1:.4f} ({a1 - a0:+.4f})"
        )
        grpc_summary = {
            "address": address,
            "accuracy_before": a0,
            "accuracy_after": a1,
            "before": before,
            "after": after,
            "truth": truth,
        }
    finally:
        t0 = time.monotonic()
        print(f"\n$ kill -TERM {server.pid}   # stop the server", flush=True)
        status = stop_server(server)
        lap("serve_stop", t0)
    if status != 0:
        raise DemoFailed(f"the server exited with status {status} after SIGTERM (see {log_path})")
    print("server stopped cleanly")

    summary = {
        "labels_per_class": labels_per_class,
        "images": digits.counts,
        "labelled": digits.labelled,
        "unlabelled": digits.unlabelled,
        "raw_pixel_1nn": digits.raw_pixel_1nn,
        "eval": acc,
        "report": str(report_html),
        "grpc": grpc_summary,
        "timings_s": timings,
        "seconds": round(time.monotonic() - started, 1),
    }
    (bank / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    print(
        f"\ndone in {summary['seconds']:.0f}s: bank in {bank_arg}/, images in "
        f"{rel(data, workdir)}/, summary in {bank_arg}/{SUMMARY_FILE}"
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m featurebank.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("FEATUREBANK_DEMO_DIR", ".")),
        help="where demo-bank/ and demo-data/ go (default $FEATUREBANK_DEMO_DIR or .)",
    )
    parser.add_argument("--labels-per-class", type=int, default=LABELS_PER_CLASS)
    parser.add_argument(
        "--verbose", action="store_true", help="show the commands' stderr unfiltered"
    )
    args = parser.parse_args(argv)
    try:
        run_demo(args.workdir.resolve(), args.labels_per_class, args.verbose)
    except DemoFailed as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
