"""`featurebank store info|export|import` and `featurebank labels import`.

Only numpy and the store are imported (never TensorFlow), so these start fast.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from featurebank.cli import Commands

_IMPORT_BATCH = 8192


def register(commands: Commands) -> None:
    p = commands.subcommand("store", "info", "show a bank's spec, counts, errors and size", _info)
    _bank_arg(p)
    p.add_argument("--json", action="store_true", help="print the full statistics as JSON")

    p = commands.subcommand("store", "export", "write all vectors, keys and labels", _export)
    _bank_arg(p)
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--format", choices=("npy", "parquet"), default="npy")

    p = commands.subcommand("store", "import", "add precomputed embeddings to a bank", _import)
    _bank_arg(p)
    p.add_argument("--vectors", required=True, type=Path, help="(n, dim) .npy array")
    p.add_argument("--keys", required=True, type=Path, help="text file, one key per line")
    p.add_argument("--labels", type=Path, help="CSV key,label[,split]")
    p.add_argument("--model", default="external", help="name of the model that made them")

    p = commands.subcommand(
        "store", "backup", "copy a bank (store snapshot + live index and head) while it serves",
        _backup,
    )  # fmt: skip
    _bank_arg(p)
    p.add_argument("--out", required=True, type=Path, help="new bank directory to create")

    p = commands.subcommand("labels", "import", "set labels (and splits) from a CSV", _labels)
    _bank_arg(p)
    p.add_argument("csv", type=Path, help="CSV rows key,label[,split]; empty label = unlabelled")


def _bank_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bank", required=True, type=Path, help="bank directory")


# ---- info ----------------------------------------------------------------------------------


def _info(args: argparse.Namespace) -> int:
    from featurebank import store as store_mod
    from featurebank.classify.heads import head_status

    with store_mod.open(args.bank, readonly=True) as st:
        stats = st.stats()
        errors = st.errors()
        stats["index"] = _index_status(args.bank)
        stats["head"] = head_status(st)
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
    else:
        behind = stats["generation"] - index["store_generation"]
        lag = f", {behind} store generations behind" if behind > 0 else ""
        yield (
            f"index       generation {index['generation']}: {index['factory']}, "
            f"{index['ntotal']} vectors, recall@{index['k']} {index['recall_at_k']:.3f}{lag}"
        )
    head = stats.get("head")
    if head is None:
        yield "head        none (featurebank head train)"
    else:
        state = "STALE: labels changed since training" if head["stale"] else "current"
        yield f"head        generation {head['generation']}: {head['classes']} classes, {state}"
    yield f"errors      {stats['errors']}"
    for e in errors[:20]:
        yield f"  {e['key']}: {e['reason']}"
    if len(errors) > 20:
        yield f"  ... and {len(errors) - 20} more (--json lists all)"


def _index_status(bank: Path) -> dict[str, Any] | None:
    """The live index's manifest, in brief; None before the first build."""
    from featurebank.core.bank import Bank, current_generation

    indexes = Bank(bank).indexes_dir
    gen = current_generation(indexes)
    if gen is None:
        return None
    manifest = json.loads((indexes / str(gen) / "manifest.json").read_text())
    keys = ("factory", "metric", "ntotal", "k", "recall_at_k", "store_generation")
    return {"generation": gen, **{k: manifest.get(k) for k in keys}}


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# ---- backup --------------------------------------------------------------------------------


def _backup(args: argparse.Namespace) -> int:
    """Store first, then the live generations: indexes and heads never change once published,
    and one covering an older store generation simply catches up with `index update`."""
    import shutil

    from featurebank import store as store_mod
    from featurebank.core.bank import Bank, current_generation, write_atomic

    src, dst = Bank(args.bank), Bank(args.out)
    with store_mod.open(src.root, readonly=True) as st:
        st.backup(dst.root)
        count = st.count
    copied = []
    for name, what in (("indexes", "index"), ("heads", "head")):
        parent = src.root / name
        gen = current_generation(parent)
        if gen is None:
            continue
        shutil.copytree(parent / str(gen), dst.root / name / str(gen))
        write_atomic(dst.root / name / "CURRENT", f"{gen}\n".encode())
        copied.append(f"{what} generation {gen}")
    extra = f" with {' and '.join(copied)}" if copied else ""
    print(f"backed up {count} items of {src.root} to {dst.root}{extra}")
    return 0


# ---- export --------------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> int:
    from featurebank import store as store_mod

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with store_mod.open(args.bank, readonly=True) as st:
        items = st.to_numpy(dtype=st.spec.dtype)
        spec = st.spec.to_dict()
    if args.format == "npy":
        _export_npy(out, items)
    else:
        _export_parquet(out, items)
    (out / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    print(f"exported {len(items)} items to {out} ({args.format})")
    return 0


def _export_npy(out: Path, items: Any) -> None:
    import numpy as np

    np.save(out / "vectors.npy", items.vectors)
    np.save(out / "ids.npy", items.ids)
    (out / "keys.txt").write_text("".join(k + "\n" for k in items.keys), encoding="utf-8")
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["key", "label", "split"])
        for key, label, split in zip(items.keys, items.labels, items.splits, strict=True):
            w.writerow([key, label or "", split])


def _export_parquet(out: Path, items: Any) -> None:
    from featurebank.core.errors import FailedPrecondition

    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise FailedPrecondition("parquet export needs pyarrow: pip install pyarrow") from None
    n, dim = items.vectors.shape
    flat = pa.array(items.vectors.reshape(-1))
    table = pa.table(
        {
            "id": pa.array(items.ids),
            "key": pa.array(items.keys, pa.string()),
            "label": pa.array(items.labels, pa.string()),
            "split": pa.array(items.splits, pa.string()),
            "meta": pa.array([json.dumps(m) for m in items.meta], pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    )
    pq.write_table(table, out / "items.parquet")


# ---- import --------------------------------------------------------------------------------


def _readable(path: Path) -> Path:
    """The path, or a clear error instead of a traceback when it cannot be read."""
    from featurebank.core.errors import NotFound

    if not path.is_file():
        raise NotFound(f"cannot read {path}: no such file")
    return path


def _read_keys(path: Path) -> list[str]:
    text = _readable(path).read_text(encoding="utf-8")
    return [line for line in text.split("\n") if line]


def _read_label_csv(path: Path) -> tuple[dict[str, str | None], dict[str, str]]:
    """key -> label (empty = None) and key -> split, skipping a `key,label` header row."""
    from featurebank.core.errors import InvalidInput

    labels: dict[str, str | None] = {}
    splits: dict[str, str] = {}
    with open(_readable(path), newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if not row or (n == 1 and [c.strip().lower() for c in row[:2]] == ["key", "label"]):
                continue
            if len(row) not in (2, 3):
                raise InvalidInput(f"{path}:{n}: expected key,label[,split], got {row!r}")
            key = row[0]
            if key in labels:
                raise InvalidInput(f"{path}:{n}: key {key!r} appears twice")
            labels[key] = row[1].strip() or None
            if len(row) == 3 and row[2].strip():
                splits[key] = row[2].strip()
    return labels, splits


def _import(args: argparse.Namespace) -> int:
    import numpy as np

    from featurebank import store as store_mod
    from featurebank.core.errors import InvalidInput
    from featurebank.core.spec import Spec

    try:
        vectors = np.load(_readable(args.vectors), mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise InvalidInput(f"{args.vectors} is not a .npy array: {e}") from None
    keys = _read_keys(args.keys)
    if vectors.ndim != 2 or len(vectors) != len(keys):
        raise InvalidInput(
            f"{args.vectors} has shape {vectors.shape} but {args.keys} has {len(keys)} keys"
        )
    dtype = "float16" if vectors.dtype == np.float16 else "float32"
    spec = Spec(
        backbone=args.model,
        weights="external",
        input_size=None,
        resize="none",
        preprocessing="none",
        pooling="none",
        dim=int(vectors.shape[1]),
        dtype=dtype,
    )
    labels, splits = _read_label_csv(args.labels) if args.labels else ({}, {})
    unknown = set(labels) - set(keys)
    if unknown:
        raise InvalidInput(f"{args.labels}: key {sorted(unknown)[0]!r} is not in {args.keys}")
    added = 0
    with store_mod.open_or_create(args.bank, spec) as st:
        todo = set(st.missing(keys))
        for start in range(0, len(keys), _IMPORT_BATCH):
            rows = [
                i for i in range(start, min(len(keys), start + _IMPORT_BATCH)) if keys[i] in todo
            ]
            if not rows:
                continue
            batch = [keys[i] for i in rows]
            st.put_batch(
                batch,
                np.asarray(vectors[rows]),
                labels=[labels.get(k) for k in batch],
                splits=[splits.get(k, "none") for k in batch],
                meta=[{"uri": f"{args.vectors}#{i}"} for i in rows],
            )
            added += len(rows)
        count = st.count
    print(f"imported {added} vectors ({len(keys) - added} already there); bank has {count}")
    return 0


def _labels(args: argparse.Namespace) -> int:
    from featurebank import store as store_mod

    labels, splits = _read_label_csv(args.csv)
    with store_mod.open(args.bank) as st:
        changed = st.relabel(labels, splits)
    print(f"{changed} items changed ({len(labels)} rows read from {args.csv})")
    return 0
