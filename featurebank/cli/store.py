"""`featurebank store info|export|import|backup|commit|relink` and `featurebank labels import`.

Only numpy and the store are imported (never TensorFlow), so these start fast.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from featurebank.cli import Commands
from featurebank.cli.args import show_progress
from featurebank.cli.index import recall_text


def register(commands: Commands) -> None:
    p = commands.subcommand("store", "info", "show a bank's spec, counts, errors and size", _info)
    _bank_arg(p)
    p.add_argument("--json", action="store_true", help="print the full statistics as JSON")

    p = commands.subcommand(
        "store", "export", "write all vectors, keys, labels and metadata", _export
    )
    _bank_arg(p)
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--format", choices=("npy", "parquet"), default="npy")

    p = commands.subcommand("store", "import", "add precomputed embeddings to a bank", _import)
    _bank_arg(p)
    p.add_argument("--vectors", required=True, type=Path, help="(n, dim) .npy array")
    p.add_argument("--keys", required=True, type=Path, help="text file, one key per line")
    p.add_argument("--labels", type=Path, help="CSV key,label[,split]")
    p.add_argument("--model", default="external", help="name of the model that made them")
    p.add_argument("--metadata", type=Path,
                   help='user metadata, one JSON object a line: {"key": ..., "metadata": {...}} '
                   "(what store export writes to metadata.jsonl)")

    p = commands.subcommand(
        "store", "backup", "copy a bank (store snapshot + live index and head) while it serves",
        _backup,
    )  # fmt: skip
    _bank_arg(p)
    p.add_argument("--out", required=True, type=Path, help="new bank directory to create")

    p = commands.subcommand(
        "store", "commit", "commit finished shards of `embed --engine ray` into a bank", _commit
    )
    _bank_arg(p)
    p.add_argument(
        "--from",
        dest="staging",
        required=True,
        type=Path,
        help="staging folder of the shards (BANK/staging unless --staging was given)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = commands.subcommand(
        "store", "relink", "give a bank its model file again (one with the recorded sha256)",
        _relink,
    )  # fmt: skip
    _bank_arg(p)
    p.add_argument("--model", required=True, type=Path, help="the .keras model or weights file")

    p = commands.subcommand("labels", "import", "set labels (and splits) from a CSV", _labels)
    _bank_arg(p)
    p.add_argument("csv", type=Path, help="CSV rows key,label[,split]; empty label = unlabelled")


def _relink(args: argparse.Namespace) -> int:
    from featurebank import store as store_mod
    from featurebank.core import bank_models
    from featurebank.core.errors import InvalidInput, NotFound

    with store_mod.open(args.bank, readonly=True) as st:
        spec, bank = st.spec, st.bank
    if not spec.weights.startswith(bank_models.HASHED):
        raise InvalidInput(f"bank {args.bank} records no model file (weights {spec.weights})")
    if not args.model.is_file():
        raise NotFound(f"--model {args.model} is not a file")
    had = bank_models.copy_of(bank, spec)
    kept = bank_models.keep(bank, spec, args.model)
    if had is not None:
        print(f"bank {args.bank} already keeps its model: {had}")
    else:
        print(f"relinked: bank {args.bank} keeps {args.model} as {kept}")
    return 0


def _bank_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bank", required=True, type=Path, help="bank directory")


# ---- commit --------------------------------------------------------------------------------


def _commit(args: argparse.Namespace) -> int:
    from featurebank.embedder.commit import commit_shards

    s = commit_shards(args.bank, args.staging, progress=show_progress(not args.json))
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(
        f"committed {s['committed_shards']} shards of {s['shards']} "
        f"({s['already_committed']} committed before): +{s['added']} items, "
        f"{s['failed']} failures recorded, {s['already_stored']} rows already stored; "
        f"bank {s['bank']} now holds {s['count']} items"
    )
    return 0


# ---- info ----------------------------------------------------------------------------------


def _info(args: argparse.Namespace) -> int:
    from featurebank.server.summary import bank_status

    stats, errors = bank_status(args.bank)
    if args.json:
        print(json.dumps({**stats, "error_list": errors}, indent=2))
        return 0
    for line in _info_lines(stats, errors):
        print(line)
    return 0


def _info_lines(stats: dict[str, Any], errors: list[dict[str, Any]]) -> Iterator[str]:
    from featurebank.core.spec import Spec

    yield f"bank        {stats['bank']}"
    yield f"spec        {Spec.from_dict(stats['spec']).describe()}"
    yield f"generation  {stats['generation']} (labels changed at {stats['labels_generation']})"
    yield f"items       {stats['count']} ({stats['labelled']} labelled, {stats['unlabelled']} not)"
    yield "splits      " + ", ".join(f"{k}={v}" for k, v in stats["splits"].items())
    size, raw = stats["size_bytes"], stats["vector_bytes"]
    ratio = f", {size / raw:.2f}x the raw vectors" if raw else ""
    yield f"size        {_mib(size)} on disk{ratio}"
    if stats["deleted_pending_compact"]:
        yield f"deleted     {stats['deleted_pending_compact']} rows await compaction"
    yield f"labels      {len(stats['labels'])}"
    for label, n in stats["labels"].items():
        yield f"  {label:<30} {n}"
    index = stats.get("index")
    if index is None:
        yield "index       none (featurebank index build)"
    elif "damaged" in index:
        yield f"index       DAMAGED: {index['damaged']} (featurebank store repair)"
    else:
        behind = stats["generation"] - index["store_generation"]
        lag = f", {behind} store generations behind" if behind > 0 else ""
        met = "met" if index.get("target_reached") else "NOT met"
        yield (
            f"index       generation {index['generation']}: {index['factory']}, "
            f"{index['ntotal']} vectors, metric {index['metric']}, transform "
            f"{(index.get('transform') or {}).get('spec', 'n/a')}, "
            f"recall@{index['k']} {recall_text(index, 3)} "
            f"(target {index['target_recall']}: {met}){lag}"
        )
    head = stats.get("head")
    if head is None:
        yield "head        none (featurebank head train)"
    elif "damaged" in head:
        yield f"head        DAMAGED: {head['damaged']} (featurebank store repair)"
    else:
        state = "STALE: labels changed since training" if head["stale"] else "current"
        yield f"head        generation {head['generation']}: {head['classes']} classes, {state}"
        acts = head.get("hybrid_acts_as", "hybrid")
        mix = f"a={head['hybrid_a']} (kNN weight)" if acts == "hybrid" else f"acts as {acts}"
        yield f"hybrid      {mix}, chosen by cross-validation"
    yield f"errors      {stats['errors']}"
    for e in errors[:20]:
        yield f"  {e['key']}: {e['reason']}"
    if len(errors) > 20:
        yield f"  ... and {len(errors) - 20} more (--json lists all)"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# ---- backup, export, import -------------------------------------------------------------


def _backup(args: argparse.Namespace) -> int:
    from featurebank.store.transfer import backup

    done = backup(args.bank, args.out)
    copied = [f"{what} generation {gen}" for what, gen in done["generations"].items()]
    copied += [f"{name}/" for name in done["folders"]]
    extra = f" with {', '.join(copied)}" if copied else ""
    print(f"backed up {done['items']} items of {done['bank']} to {done['out']}{extra}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from featurebank.store.transfer import export

    count = export(args.bank, args.out, args.format)
    print(f"exported {count} items to {args.out} ({args.format})")
    return 0


def _import(args: argparse.Namespace) -> int:
    from featurebank.store.transfer import import_vectors

    done = import_vectors(args.bank, args.vectors, args.keys, args.labels, args.model,
                          args.metadata)
    print(f"imported {done['added']} vectors ({done['skipped']} already there); "
          f"bank has {done['count']}")
    return 0


def _labels(args: argparse.Namespace) -> int:
    from featurebank.store.transfer import import_labels

    done = import_labels(args.bank, args.csv)
    print(f"{done['changed']} items changed ({done['rows']} rows read from {args.csv})")
    return 0
