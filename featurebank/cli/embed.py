"""`featurebank embed SOURCE --bank PATH --backbone NAME ...`: the batch embedding job.

TensorFlow is imported inside the handler only, so other commands start fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from featurebank.cli import Commands
from featurebank.cli.args import show_progress
from featurebank.core.errors import InvalidInput
from featurebank.core.params import EmbedParams
from featurebank.core.vocabulary import (
    DEVICES,
    LABEL_SOURCES,
    POOLINGS,
    PRECISIONS,
    PREPROCESSINGS,
    RESIZE_MODES,
    STORE_DTYPES,
)

KEEP = "default: the bank's last embed job's, else {}"


def embed_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The EmbedParams fields the command line named (None: keep the bank's last job's)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EmbedParams)}


def add_embed_params(p: argparse.ArgumentParser) -> None:
    """The EmbedParams options; each left out keeps what the bank's last embed job used."""
    d = EmbedParams()
    p.add_argument(
        "--backbone",
        required=True,
        help="keras.applications family (e.g. MobileNetV2, ResNet50, EfficientNetB0) "
        "or the path of your own .keras model",
    )
    p.add_argument(
        "--weights",
        help="imagenet (from the Keras cache), none (seeded random init), or a weights file; "
        + KEEP.format(d.weights),
    )
    p.add_argument(
        "--layer",
        help="feature layer of a .keras backbone (default: its output, or the input of its "
        "classifier when it ends in a softmax/sigmoid Dense)",
    )
    p.add_argument("--image-size", type=int, help="input size in pixels (default: the family's)")
    p.add_argument("--resize", choices=RESIZE_MODES, help=KEEP.format(d.resize))
    p.add_argument(
        "--pooling",
        choices=POOLINGS,
        help="global pooling (flatten: .keras backbones with spatial outputs only); "
        + KEEP.format(d.pooling),
    )
    p.add_argument(
        "--preprocess",
        dest="preprocessing",
        choices=PREPROCESSINGS,
        help="override the input scaling (default: the family's; raw0-255 for .keras models)",
    )
    p.add_argument("--dtype", choices=STORE_DTYPES, help=KEEP.format(d.dtype))
    p.add_argument(
        "--labels",
        choices=LABEL_SOURCES,
        help="where labels come from (folders: class subfolders, or a manifest's/array "
        "file's own labels); " + KEEP.format(d.labels),
    )
    p.add_argument(
        "--max-pixels", type=int, help="larger images fail; " + KEEP.format(f"{d.max_pixels:_}")
    )
    p.add_argument(
        "--follow-links",
        action=argparse.BooleanOptionalAction,
        help="walk directory symlinks of a folder source (a link back to a folder already "
        "walked is still left out); by default they are left out and listed",
    )
    p.add_argument(
        "--thumbnails",
        action=argparse.BooleanOptionalAction,
        help="keep a small JPEG of each image in the bank (shown by `featurebank ui`; the "
        "quality pass also compares near neighbours by them, to find trimmed or resized copies)",
    )


def register(commands: Commands) -> None:
    p = commands.command(
        "embed",
        "embed a folder, manifest or array file of images into a bank (resumable); options "
        "left out keep what the bank's last embed job used",
        _embed,
    )
    p.add_argument(
        "source",
        help="folder (class subfolders = labels; top folders train/ val/ test/ = splits), "
        "CSV/TSV manifest path[,label][,split][,key], .npy/.npz (N,H,W,C) array, or "
        "file.h5:dataset",
    )
    p.add_argument("--bank", required=True, help="bank directory (created if missing)")
    p.add_argument(
        "--meta",
        action="append",
        metavar="KEY=VALUE",
        help="user metadata on every item added (repeatable; numbers and true/false are typed, "
        'a quoted "4" stays text); a manifest\'s meta.KEY columns or JSON metadata column win',
    )
    add_embed_params(p)
    p.add_argument(
        "--batch-size",
        type=int,
        help="images per batch (default: 64 on the CPU; on GPUs the largest that fits, found "
        "once by halving from 512 per GPU and remembered in BANK/jobs/embed.json)",
    )
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="auto: every local GPU if any, else the CPU; gpu: fail if there is none",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="compute precision (auto: mixed on GPUs, float32 on the CPU); the stored "
        "dtype is --dtype either way",
    )
    p.add_argument(
        "--fail-on-error", action="store_true", help="exit 1 if any input could not be embedded"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("distributed (--engine ray; needs the ray extra)")
    g.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process; ray: shards on a Ray cluster, then a commit",
    )
    g.add_argument("--address", help="Ray cluster address (default: start a local one)")
    g.add_argument("--workers", default="1", help="model actors: N or MIN,MAX (autoscaling)")
    g.add_argument("--cpus-per-worker", type=float, default=1.0)
    g.add_argument("--gpus-per-worker", type=float, default=0.0)
    g.add_argument("--staging", help="folder for finished shards (default: BANK/staging)")
    g.add_argument("--shard-size", type=int, default=1000, help="images per shard")


def check_before_tensorflow(args: argparse.Namespace) -> None:
    """What can be checked in milliseconds is, before TensorFlow takes seconds to start: the
    source and the backbone exist."""
    from featurebank.core.errors import NotFound
    from featurebank.embedder import backbones, sources

    args.meta = sources.parse_meta_args(args.meta)
    sources.check_exists(args.source)
    if backbones.is_model_file(args.backbone):
        if not Path(args.backbone).expanduser().is_file():
            raise NotFound(f"backbone model file {args.backbone} does not exist")
        return
    backbones.family(args.backbone)  # NotFound lists the known families


def _layer_used(used: str | None, asked: str | None) -> str:
    """Which layer of the user's model gives the features, and why that one."""
    if asked is not None:
        return f"features from layer {used}"
    if used is not None:
        return (f"features from layer {used}, the input of the model's classifier (a last "
                "softmax/sigmoid Dense is left out; --layer to choose another)")  # fmt: skip
    return "features from the model's output (--layer to choose another)"


def _embed(args: argparse.Namespace) -> int:
    from featurebank.embedder import backbones

    check_before_tensorflow(args)
    if args.engine == "ray":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        return _embed_ray(args)
    from featurebank.embedder.devices import load_tensorflow

    load_tensorflow(verbose=args.verbose > 0)
    from featurebank.embedder.pipeline import embed

    def started(report: dict[str, Any]) -> None:
        print(f"featurebank embed: running on {report['device']}", file=sys.stderr, flush=True)
        if backbones.is_model_file(args.backbone):
            print(f"featurebank embed: {_layer_used(report.get('layer'), args.layer)}",
                  file=sys.stderr, flush=True)  # fmt: skip
        elif args.weights == "none":
            print(
                "featurebank embed: warning: --weights none: the backbone is randomly "
                "initialised (seeded), so its vectors say little about the images; use imagenet "
                "weights (from the Keras cache), a weights file, or your own trained .keras model",
                file=sys.stderr,
                flush=True,
            )
        if not any("GPU" in d for d in report["devices"]):
            print(
                "featurebank embed: warning: no GPU used, embedding on the CPU "
                "(fine for small collections, slow for large ones)",
                file=sys.stderr,
                flush=True,
            )

    summary = embed(
        args.source,
        args.bank,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        progress=show_progress(not args.no_progress),
        on_start=started,
        meta=args.meta,
        **embed_overrides(args),
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for line in summary_lines(summary):
            print(line)
    return 1 if args.fail_on_error and summary["failed"] else 0


def _embed_ray(args: argparse.Namespace) -> int:
    from featurebank.embedder.batch_size import CPU_BATCH

    if args.device != "auto" or args.precision != "auto":
        raise InvalidInput(
            "--device and --precision apply to --engine local; Ray workers take GPUs with "
            "--gpus-per-worker and run each on its own device"
        )
    from featurebank.embedder.ray_cluster import parse_workers
    from featurebank.embedder.ray_job import run

    summary = run(
        args.source,
        args.bank,
        batch_size=args.batch_size or CPU_BATCH,
        staging=args.staging,
        shard_size=args.shard_size,
        address=args.address,
        workers=parse_workers(args.workers),
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        progress=show_progress(not args.no_progress),
        verbose=args.verbose > 0,
        meta=args.meta,
        **embed_overrides(args),
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        sh = summary["shards"]
        print(
            f"featurebank embed: {summary['device']}; shards: {sh['total']} in all, "
            f"{sh['stored']} already stored, {sh['done_before']} finished before, "
            f"{sh['run']} run now"
        )
        for line in summary_lines(summary):
            print(line)
    return 1 if args.fail_on_error and summary["failed"] else 0


def summary_lines(s: dict[str, Any]) -> list[str]:
    """The summary as a few readable lines."""
    lines = [
        f"embedded {s['embedded']}, skipped {s['skipped']} (already in the bank), "
        f"failed {s['failed']} of {s['total']} inputs"
        + (f"; ignored {s['ignored']} non-image files" if s.get("ignored") else ""),
        f"{s['images_per_s']} images/s; {s['seconds_total']} s in all "
        f"(reading {s['seconds_reading']} s, inferring {s['seconds_inferring']} s, "
        f"writing {s['seconds_writing']} s)",
        f"bank {s['bank']}: {s.get('spec', '')}",
    ]
    for folder in s.get("skipped_folders", [])[:10]:
        lines.append(f"  left out: {folder}")
    if len(s.get("skipped_folders", [])) > 10:
        lines.append(f"  ... {len(s['skipped_folders']) - 10} more folders left out")
    work = s.get("work_by_device", {})
    if len(work) > 1:
        lines.append(
            "per device: "
            + ", ".join(f"{d} {w['images']} images in {w['batches']} batches" for d, w in work.items())
        )
    for e in s.get("errors", [])[:10]:
        lines.append(f"  failed: {e['key']}: {e['reason']}")
    if s["failed"] > 10:
        lines.append(f"  ... {s['failed'] - 10} more (featurebank store info --bank {s['bank']})")
    return lines
