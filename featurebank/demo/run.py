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
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featurebank.demo.digits import UPSERT_PER_CLASS, write_digits
from featurebank.demo.processes import (
    DemoFailed,
    Runner,
    free_port,
    rel,
    stop_server,
    wait_serving,
)

BANK_DIR = "demo-bank"
DATA_DIR = "demo-data"
SUMMARY_FILE = "demo-summary.json"
LABELS_PER_CLASS = 5
SHOW_ROWS = 10


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
    # (`featurebank eval` has printed where the report is)

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
