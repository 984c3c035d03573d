"""Shards of a distributed embedding job: planning, embedding one shard, the staging files.

Why shards in a staging folder: on a cluster many workers embed at once, but a store has
one writer. Each worker writes its shard as a Parquet file of its own; the driver commits
finished shards into the store in shard order (`commit.commit_shards`). A shard is the
unit of retry: a worker killed mid-shard leaves no finished file and its shard is redone,
and a rerun skips every shard already finished.

Shard ids are derived from their contents (the spec the job was asked for, and each
record's key, label, split and location), so an edited manifest or another model gives
new ids and old files are never mistaken for the new work.

Staging folder layout (a folder may hold the shards of several runs):

    shard-<id>.parquet    key, vector (fixed-size list of the store's dtype; null when the
                          input failed), label, split, metadata (JSON), error, thumbnail
                          (JPEG bytes, null unless the job keeps thumbnails)
    shard-<id>.done       JSON marker, written after the Parquet file is renamed into place:
                          rows, bytes, sha256 of the file, first key, the spec it was made with
    shard-<id>.committed  written once the shard's rows are in the store
    .shard-<id>.*.tmp     a Parquet file being written (renamed when complete)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurebank.core.bank import write_atomic
from featurebank.core.errors import DamagedFile, FailedPrecondition, InvalidInput
from featurebank.core.integrity import SHARD_FILE, SHARD_MARKER, marked_file_problems, sha256_of
from featurebank.core.spec import Spec
from featurebank.embedder import images, sources
from featurebank.embedder.stages import (
    NONFINITE_REASON,
    Loader,
    Model,
    Timings,
    decoded_batches,
    finite_rows,
)

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 1000
SHARD_ID_CHARS = 16
PARQUET, DONE, COMMITTED = SHARD_FILE, SHARD_MARKER, ".committed"


@dataclass(frozen=True)
class Shard:
    """Records cut from the sorted source, with the id their contents give them."""

    id: str
    records: tuple[sources.Record, ...]

    @property
    def first_key(self) -> str:
        return self.records[0].key


def shard_id(spec: Spec, records: Sequence[sources.Record], thumbnails: bool = False) -> str:
    """Hex digest of the spec, the job's outputs and the records: same inputs, same id; any
    edit (or thumbnails asked for now and not before), a new one."""
    h = hashlib.sha256(json.dumps([spec.to_dict(), thumbnails], sort_keys=True).encode())
    for r in records:
        h.update(json.dumps([r.key, r.label, r.split, r.path, r.row, *([r.meta] if r.meta else [])],
                            sort_keys=True).encode())
    return h.hexdigest()[:SHARD_ID_CHARS]


def plan_shards(
    records: Sequence[sources.Record], spec: Spec, shard_size: int, thumbnails: bool = False
) -> list[Shard]:
    """Sort the records by key and cut them into shards of `shard_size` (the last may be short)."""
    if shard_size < 1:
        raise InvalidInput(f"shard size must be at least 1, got {shard_size}")
    ordered = sorted(records, key=lambda r: r.key)
    cuts = [tuple(ordered[s : s + shard_size]) for s in range(0, len(ordered), shard_size)]
    return [Shard(shard_id(spec, part, thumbnails), part) for part in cuts]


def records_to_rows(records: Sequence[sources.Record]) -> str:
    """Records as JSON text (how a shard travels to a worker)."""
    return json.dumps([asdict(r) for r in records])


def records_from_rows(text: str) -> list[sources.Record]:
    return [sources.Record(**r) for r in json.loads(text)]


# ---------------------------------------------------------------- embedding one shard


@dataclass
class ShardRows:
    """One shard's output, one row per record, in record order."""

    keys: list[str]
    vectors: np.ndarray  # (n, dim) in the store's dtype; rows of failed inputs are zero
    labels: list[str | None]
    splits: list[str]
    metas: list[dict[str, Any] | None]
    errors: list[str | None]
    thumbnails: list[bytes | None] | None = None
    timings: Timings = field(default_factory=Timings)

    @property
    def failed(self) -> int:
        return sum(e is not None for e in self.errors)


def embed_shard(
    source: sources.Source,
    records: Sequence[sources.Record],
    model: Model,
    batch_size: int = 64,
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
    decode_threads: int = 2,
    thumbnails: bool = False,
) -> ShardRows:
    """Decode -> forward over one shard's records (the local job's mapper and model)."""
    todo = list(records)
    timings = Timings()
    loader = Loader(
        source, todo, model.input_size, model.spec.resize, max_pixels, timings, thumbnails
    )
    dtype = model.spec.dtype
    vectors: np.ndarray | None = None
    errors: list[str | None] = [None] * len(todo)
    t = time.perf_counter()
    for pixels, positions in decoded_batches(loader, batch_size, decode_threads):
        t1 = time.perf_counter()
        timings.waiting += t1 - t
        out = model.forward(pixels)
        t = time.perf_counter()
        timings.inferring += t - t1
        if vectors is None:
            vectors = np.zeros((len(todo), out.shape[1]), dtype)
        finite = finite_rows(out, dtype)
        with np.errstate(over="ignore"):
            vectors[positions] = np.where(finite[:, None], out, 0).astype(dtype)
        for p in positions[~finite]:
            errors[int(p)] = NONFINITE_REASON.format(dtype=dtype)
    for p, reason in loader.failures.items():
        errors[p] = reason
    if vectors is None:  # nothing decodable: the width is the model's
        vectors = np.zeros((len(todo), int(model.spec.dim)), dtype)
    return ShardRows(
        keys=[r.key for r in todo],
        vectors=vectors,
        labels=[r.label for r in todo],
        splits=[r.split for r in todo],
        metas=[loader.meta.get(i) for i in range(len(todo))],
        errors=errors,
        thumbnails=None
        if loader.thumbs is None
        else [None if errors[i] else loader.thumbs.get(i) for i in range(len(todo))],
        timings=timings,
    )


# ---------------------------------------------------------------- the staging files


def shard_path(staging: Path, sid: str, kind: str) -> Path:
    return Path(staging) / f"shard-{sid}{kind}"


def read_marker(staging: Path, sid: str) -> dict[str, Any] | None:
    """The shard's done marker if it is finished (marker and file of the recorded size);
    None when it is not, or when either is damaged (said in the log: it is done again)."""
    done, data = shard_path(staging, sid, DONE), shard_path(staging, sid, PARQUET)
    if not done.exists():
        return None
    found = marked_file_problems(done, data)
    if found:
        log.warning("%s: the shard counts as not finished", found[0])
        return None
    marker: dict[str, Any] = json.loads(done.read_text())
    return marker


def is_committed(staging: Path, sid: str) -> bool:
    return shard_path(staging, sid, COMMITTED).exists()


def _arrow_schema(dtype: str, dim: int) -> Any:
    import pyarrow as pa

    value = pa.float16() if np.dtype(dtype) == np.float16 else pa.float32()
    return pa.schema(
        [
            ("key", pa.string()),
            ("vector", pa.list_(value, dim)),
            ("label", pa.string()),
            ("split", pa.string()),
            ("metadata", pa.string()),
            ("error", pa.string()),
            ("thumbnail", pa.binary()),
        ]
    )


def write_shard(staging: Path, shard: Shard, rows: ShardRows, spec: Spec) -> dict[str, Any]:
    """Write the shard's Parquet file under a temporary name, rename it, then its marker."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    n, dim = rows.vectors.shape
    schema = _arrow_schema(spec.dtype, dim)
    failed = np.array([e is not None for e in rows.errors], dtype=bool)
    flat = pa.array(
        np.ascontiguousarray(rows.vectors).reshape(-1), type=schema.field("vector").type.value_type
    )
    vector = pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(failed))
    table = pa.table(
        [
            pa.array(rows.keys, pa.string()),
            vector,
            pa.array(rows.labels, pa.string()),
            pa.array(rows.splits, pa.string()),
            pa.array([None if m is None else json.dumps(m) for m in rows.metas], pa.string()),
            pa.array(rows.errors, pa.string()),
            pa.array(rows.thumbnails or [None] * n, pa.binary()),
        ],
        schema=schema,
    )
    final = shard_path(staging, shard.id, PARQUET)
    tmp = staging / f".shard-{shard.id}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    marker = {
        "shard": shard.id,
        "rows": n,
        "failed": int(failed.sum()),
        "bytes": final.stat().st_size,
        "sha256": sha256_of(final),
        "first_key": shard.first_key,
        "spec": spec.to_dict(),
        "written_at": time.time(),
    }
    write_atomic(shard_path(staging, shard.id, DONE), json.dumps(marker, indent=1).encode())
    return marker


def done_markers(staging: Path) -> list[dict[str, Any]]:
    """Markers of the finished shards in a staging folder, in shard order (by first key)."""
    staging = Path(staging)
    if not staging.is_dir():
        raise FailedPrecondition(f"staging folder {staging} does not exist")
    found = []
    for path in staging.glob(f"shard-*{DONE}"):
        sid = path.name[len("shard-") : -len(DONE)]
        marker = read_marker(staging, sid)
        if marker is not None:
            found.append(marker)
    return sorted(found, key=lambda m: (m["first_key"], m["shard"]))


def read_shard(staging: Path, marker: dict[str, Any]) -> Any:
    """The shard's table, after checking its checksum and row count against the marker."""
    import pyarrow.parquet as pq

    path = shard_path(staging, marker["shard"], PARQUET)
    redo = "`featurebank store repair` sets it aside, and the embed job then redoes the shard"
    if sha256_of(path) != marker["sha256"]:
        raise DamagedFile(f"shard file {path} is damaged (its content no longer matches "
                          f"its done marker's checksum): {redo}")  # fmt: skip
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's errors are both
        raise DamagedFile(f"shard file {path} is damaged ({e}): {redo}") from None
    if table.num_rows != marker["rows"]:
        raise DamagedFile(
            f"shard file {path} has {table.num_rows} rows, its done marker says {marker['rows']}"
        )
    return table
