"""Committing finished shards from a staging folder into a bank's store, idempotently.

Why it cannot commit twice: every shard is filtered against the keys already stored
before it is written (one store transaction per shard), and a `.committed` marker is
written after the transaction only to skip the shard quickly next time. A driver
killed between the two leaves a shard whose rows are all stored: the rerun finds no
missing key in it and adds nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from featurebank import store as store_mod
from featurebank.core.bank import write_atomic
from featurebank.core.errors import DamagedFile, InvalidInput, NotFound
from featurebank.core.integrity import shard_problems
from featurebank.core.spec import Spec
from featurebank.embedder import shards
from featurebank.store import Store

log = logging.getLogger(__name__)


def staged_spec(staging: str | Path) -> Spec:
    """The spec of the finished shards in `staging` (refused when they mix two)."""
    return _finished(Path(staging))[1]


def _finished(staging: Path) -> tuple[list[dict[str, Any]], Spec]:
    markers = shards.done_markers(staging)
    damaged = shard_problems(staging)
    if not markers and damaged:
        raise DamagedFile(f"no intact finished shard in {staging}: {'; '.join(damaged.values())}")
    if not markers:
        raise NotFound(f"no finished shards in {staging} (run `featurebank embed --engine ray`)")
    spec = Spec.from_dict(markers[0]["spec"])
    for m in markers[1:]:
        other = Spec.from_dict(m["spec"])
        if other.to_dict() != spec.to_dict():
            raise InvalidInput(
                f"staging folder {staging} mixes shards of two specs: shard {m['shard']} is "
                f"[{other.describe()}], shard {markers[0]['shard']} is [{spec.describe()}]"
            )
    return markers, spec


def commit_shards(
    bank: str | Path | Store, staging: str | Path, progress: bool = False
) -> dict[str, Any]:
    """Move every finished, uncommitted shard into the store, in shard order; a summary back.

    `bank`: a path (its store is opened, or created for the shards' spec) or the caller's
    open store (the Ray job's, which stays open). A damaged shard is not committed: the
    intact ones are, then DamagedFile names every damaged one.
    """
    t0 = time.perf_counter()
    staging = Path(staging)
    markers, spec = _finished(staging)
    damaged = [line for sid, line in shard_problems(staging).items()
               if not shards.is_committed(staging, sid)]  # fmt: skip
    root = bank.bank.root if isinstance(bank, Store) else bank
    summary: dict[str, Any] = {"staging": str(staging), "bank": str(root), "shards": len(markers),
               "committed_shards": 0, "already_committed": 0, "added": 0,
               "already_stored": 0, "failed": 0}  # fmt: skip
    bar = _bar(len(markers), progress)
    with contextlib.ExitStack() as stack:
        if isinstance(bank, Store):
            st = bank
            st.spec.check_same(spec)
        else:
            st = stack.enter_context(store_mod.open_or_create(bank, spec))
        st.acquire_writer()
        for m in markers:
            if shards.is_committed(staging, m["shard"]):
                summary["already_committed"] += 1
            else:
                try:
                    added, stored, failed = _commit_one(st, staging, m)
                except DamagedFile as e:  # same size, other content: found by its checksum
                    damaged.append(str(e))
                    continue
                summary["added"] += added
                summary["already_stored"] += stored
                summary["failed"] += failed
                summary["committed_shards"] += 1
                marker = {"shard": m["shard"], "added": added, "committed_at": time.time()}
                write_atomic(
                    shards.shard_path(staging, m["shard"], shards.COMMITTED),
                    json.dumps(marker).encode(),
                )
            if bar is not None:
                bar.update(1)
        summary["count"] = st.count
    if bar is not None:
        bar.close()
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("commit summary: %s", summary)
    if damaged:
        raise DamagedFile(
            f"{len(damaged)} damaged shards not committed ({'; '.join(damaged)}); "
            f"{summary['committed_shards']} others were (the bank now holds {summary['count']} "
            "items): `featurebank store repair` sets the damaged ones aside and the embed job "
            "then redoes them"
        )
    return summary


def _commit_one(st: Store, staging: Path, marker: dict[str, Any]) -> tuple[int, int, int]:
    """Add one shard's missing keys in one transaction; (added, already stored, failed)."""
    table = shards.read_shard(staging, marker)
    keys = table.column("key").to_pylist()
    missing = set(st.missing(keys))
    errors = table.column("error").to_pylist()
    good = [i for i, k in enumerate(keys) if k in missing and errors[i] is None]
    bad = [i for i, k in enumerate(keys) if k in missing and errors[i] is not None]
    if good:
        vec_col = table.column("vector").combine_chunks()
        dim = vec_col.type.list_size
        # .values keeps the (zero) slots of failed rows, so positions line up with keys
        values = vec_col.values[vec_col.offset * dim : (vec_col.offset + len(vec_col)) * dim]
        flat = values.to_numpy(zero_copy_only=False)
        vectors = flat.reshape(-1, dim)[np.asarray(good)]
        labels = table.column("label").to_pylist()
        splits = table.column("split").to_pylist()
        metas = table.column("metadata").to_pylist()
        thumbs = table.column("thumbnail").to_pylist()
        st.put_batch(
            [keys[i] for i in good],
            vectors,
            labels=[labels[i] for i in good],
            splits=[splits[i] for i in good],
            meta=[json.loads(metas[i]) if metas[i] else None for i in good],
            thumbnails=[thumbs[i] for i in good] if any(thumbs) else None,
        )
    for i in bad:
        st.record_error(keys[i], errors[i])
    return len(good), len(keys) - len(good) - len(bad), len(bad)


def _bar(total: int, progress: bool) -> Any:
    if not progress:
        return None
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc="committing", unit="shard", file=sys.stderr)
