"""Moving a bank's contents in and out: backup, export, import of vectors and label files.

These are what `featurebank store backup|export|import` and `labels import` run;
the CLI only parses arguments and prints the returned summaries.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from featurebank.core.bank import Bank, current_generation, write_atomic
from featurebank.core.errors import FailedPrecondition, InvalidInput, NotFound
from featurebank.core.spec import Spec
from featurebank.store.items import Items
from featurebank.store.metadata import check_user_meta, user_fields
from featurebank.store.store import BankLike, borrowed, open_or_create
from featurebank.store.store import open as open_store

IMPORT_BATCH = 8192
FOLDERS_COPIED = ("models", "reports")
"""Bank folders a backup copies whole: the model file by content hash, evaluation reports."""


def backup(bank: BankLike, out: str | Path) -> dict[str, Any]:
    """Copy a bank, even while it serves: a consistent store snapshot, then the live index and
    head generations (they never change once published; one that covers an older store
    generation catches up with `index update`)."""
    dst = Bank(out)
    with borrowed(bank) as st:
        st.backup(dst.root)
        count, src = int(st.count), st.bank
    copied: dict[str, int] = {}
    for name, parent in (("index", src.indexes_dir), ("head", src.heads_dir)):
        gen = current_generation(parent)
        if gen is None:
            continue
        target = dst.root / parent.name
        shutil.copytree(parent / str(gen), target / str(gen))
        write_atomic(target / "CURRENT", f"{gen}\n".encode())
        copied[name] = gen
    folders = []
    for name in FOLDERS_COPIED:  # what the bank needs to embed, and what it has reported
        if (src.root / name).is_dir():
            shutil.copytree(src.root / name, dst.root / name, dirs_exist_ok=True)
            folders.append(name)
    return {"bank": str(src.root), "out": str(dst.root), "items": count, "generations": copied,
            "folders": folders}  # fmt: skip


def export(bank: BankLike, out: str | Path, fmt: str = "npy") -> int:
    """Write every item (vectors, ids, keys, labels, splits, metadata) and the spec; returns
    the count."""
    if fmt not in ("npy", "parquet"):
        raise InvalidInput(f"export format must be npy or parquet, got {fmt!r}")
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    with borrowed(bank) as st:
        items = st.to_numpy(dtype=st.spec.dtype)
        spec = st.spec.to_dict()
    (_export_npy if fmt == "npy" else _export_parquet)(target, items)
    (target / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    return len(items)


def _export_npy(out: Path, items: Items) -> None:
    np.save(out / "vectors.npy", items.vectors)
    np.save(out / "ids.npy", items.ids)
    (out / "keys.txt").write_text("".join(k + "\n" for k in items.keys), encoding="utf-8")
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["key", "label", "split"])
        for key, label, split in zip(items.keys, items.labels, items.splits, strict=True):
            w.writerow([key, label or "", split])
    with open(out / METADATA_FILE, "w", encoding="utf-8") as f:
        for key, meta in zip(items.keys, items.meta, strict=True):
            if user_fields(meta):
                f.write(json.dumps({"key": key, "metadata": user_fields(meta)}) + "\n")


METADATA_FILE = "metadata.jsonl"
"""One JSON object a line, {"key": ..., "metadata": {...}}, for items with user metadata."""


def read_metadata(path: str | Path) -> dict[str, dict[str, Any]]:
    """key -> user metadata from a metadata.jsonl file (what `store export` writes)."""
    out: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("key"), str):
            raise InvalidInput(f'{path}:{n}: expected {{"key": ..., "metadata": {{...}}}}')
        try:
            out[row["key"]] = check_user_meta(row["key"], row.get("metadata"))
        except InvalidInput as e:
            raise InvalidInput(f"{path}:{n}: {e}") from None
    return out


def _export_parquet(out: Path, items: Items) -> None:
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


def readable(path: str | Path) -> Path:
    """The path, or a clear error instead of a traceback when it cannot be read."""
    p = Path(path)
    if not p.is_file():
        raise NotFound(f"cannot read {p}: no such file")
    return p


KEY_NAMES = {"key", "path", "file", "filename", "image", "uri", "id"}
LABEL_NAMES = {"label", "class", "category"}
"""Header names of a labels file's first two columns (`key,label`, `path,class`, ...)."""


def read_text(path: str | Path) -> str:
    """A user's text file as UTF-8, a byte-order mark (Excel's "CSV UTF-8") left out; another
    encoding is refused naming the line."""
    data = readable(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InvalidInput(
            f"{path} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save it as "
            "UTF-8 (in Excel: CSV UTF-8)"
        ) from None


def read_keys(path: str | Path) -> list[str]:
    """One key per line (LF or CRLF); blank lines are skipped."""
    return [line for line in read_text(path).replace("\r\n", "\n").split("\n") if line]


def is_header(row: list[str]) -> bool:
    """Whether a first row names columns (`key,label[,split]`, `path,class`) rather than data."""
    cells = [c.strip().lower() for c in row]
    return len(cells) >= 2 and cells[0] in KEY_NAMES and cells[1] in LABEL_NAMES


def read_label_csv(path: str | Path) -> tuple[dict[str, str | None], dict[str, str]]:
    """key -> label (empty = None) and key -> split, skipping a header row."""
    labels: dict[str, str | None] = {}
    splits: dict[str, str] = {}
    text = read_text(path)
    for n, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
        if not row or (n == 1 and is_header(row)):
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


def import_vectors(
    bank: str | Path,
    vectors: str | Path,
    keys: str | Path,
    labels: str | Path | None = None,
    model: str = "external",
    metadata: str | Path | None = None,
) -> dict[str, int]:
    """Add embeddings made elsewhere ((n, dim) .npy + a key file) to a bank, created if needed,
    with labels (a key,label[,split] CSV) and user metadata (a metadata.jsonl) if given.

    Keys already in the bank are skipped, so a rerun adds only what is missing.
    """
    try:
        array = np.load(readable(vectors), mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise InvalidInput(f"{vectors} is not a .npy array: {e}") from None
    key_list = read_keys(keys)
    if array.ndim != 2 or len(array) != len(key_list):
        raise InvalidInput(f"{vectors} has shape {array.shape} but {keys} has {len(key_list)} keys")
    dtype = "float16" if array.dtype == np.float16 else "float32"
    spec = Spec.external(model, dim=int(array.shape[1]), dtype=dtype)
    label_of, split_of = read_label_csv(labels) if labels else ({}, {})
    meta_of = read_metadata(metadata) if metadata else {}
    for named, given in ((labels, label_of), (metadata, meta_of)):
        unknown = set(given) - set(key_list)
        if unknown:
            raise InvalidInput(f"{named}: key {sorted(unknown)[0]!r} is not in {keys}")
    added = 0
    with open_or_create(bank, spec) as st:
        todo = set(st.missing(key_list))
        for start in range(0, len(key_list), IMPORT_BATCH):
            rows = [i for i in range(start, min(len(key_list), start + IMPORT_BATCH))
                    if key_list[i] in todo]
            if not rows:
                continue
            batch = [key_list[i] for i in rows]
            st.put_batch(
                batch,
                np.asarray(array[rows]),
                labels=[label_of.get(k) for k in batch],
                splits=[split_of.get(k, "none") for k in batch],
                meta=[{**meta_of.get(key_list[i], {}), "uri": f"{vectors}#{i}"} for i in rows],
            )
            added += len(rows)
        count = int(st.count)
    return {"added": added, "skipped": len(key_list) - added, "count": count}


def import_labels(bank: str | Path, path: str | Path) -> dict[str, int]:
    """Set labels (and splits) from a key,label[,split] CSV; returns rows read and items changed."""
    labels, splits = read_label_csv(path)
    with open_store(bank) as st:
        changed = st.relabel(labels, splits)
    return {"rows": len(labels), "changed": int(changed)}
