"""User metadata of items: checking a map, changing it in place, reading it without vectors.

Metadata lives in each block's `meta` record (a JSON list, one map per row) beside the
source fields the store writes itself (`added`, and `uri`, `sha256`, `size` for images);
changing it rewrites only those small records, never a vector block.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from featurebank.core.errors import InvalidInput, shown
from featurebank.store.codec import DELETED, decode_json_list, encode_json_list
from featurebank.store.env import EnvHandle
from featurebank.store.rows import Part, Snapshot, assemble_keys, assemble_meta, locate

Txn = Any  # lmdb.Transaction

SOURCE_FIELDS = ("added", "uri", "sha256", "size")  # written by the store, not by users
MAX_FIELDS = 64
MAX_NAME_BYTES = 64
MAX_STRING_BYTES = 1024


def check_user_meta(key: str, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """A user map of string, number and boolean values (None removes a field in updates)."""
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise InvalidInput(f"metadata for key {shown(key)} must be a map, got {type(meta).__name__}")
    if len(meta) > MAX_FIELDS:
        raise InvalidInput(f"metadata for key {shown(key)} has {len(meta)} fields; at most {MAX_FIELDS}")
    out: dict[str, Any] = {}
    for name, value in meta.items():
        where = f"metadata field {shown(name)} of key {shown(key)}"
        if not isinstance(name, str) or not name or len(name.encode()) > MAX_NAME_BYTES:
            raise InvalidInput(f"{where}: names are 1..{MAX_NAME_BYTES} bytes of text")
        if name in SOURCE_FIELDS:
            raise InvalidInput(f"{where}: {shown(name)} is kept by the store itself")
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)  # a Struct carries every number as a double
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput(f"{where} is not a finite number")
        if isinstance(value, str) and len(value.encode()) > MAX_STRING_BYTES:
            raise InvalidInput(f"{where} is over {MAX_STRING_BYTES} bytes")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise InvalidInput(f"{where} must be a string, number or boolean, got {type(value).__name__}")
        out[name] = value
    return out


def user_fields(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The user's part of a stored map (what SetMetadata changes)."""
    return {k: v for k, v in meta.items() if k not in SOURCE_FIELDS}


def set_in_txn(
    txn: Txn, h: EnvHandle, ids: np.ndarray, updates: list[dict[str, Any]], merge: bool
) -> int:
    """Rewrite the meta records of the blocks holding `ids`; returns how many maps changed."""
    loc = locate(txn, h, ids)
    changed = 0
    for b, (bkey, _bids, _codes, _states) in enumerate(loc.blocks):
        metas = decode_json_list(txn.get(bkey, db=h.dbs["meta"]))
        before = list(metas)
        for i in np.flatnonzero(loc.block == b).tolist():
            row = int(loc.row[i])
            kept = metas[row] if merge else {k: v for k, v in metas[row].items() if k in SOURCE_FIELDS}
            new = {**kept, **updates[i]}
            metas[row] = {k: v for k, v in new.items() if v is not None}
        changed += sum(a != c for a, c in zip(before, metas, strict=True))
        if metas != before:
            txn.put(bkey, encode_json_list(metas), db=h.dbs["meta"])
    return changed


def columns(txn: Txn, h: EnvHandle) -> tuple[Snapshot, np.ndarray, list[str], list[dict[str, Any]]]:
    """Every live item's snapshot position, key and metadata (no vectors read)."""
    snap = Snapshot(txn, h)
    sel = np.flatnonzero(snap.states != DELETED)
    parts: list[Part] = []
    blocks = snap.block[sel]
    if len(sel):
        cuts = np.flatnonzero(np.diff(blocks)) + 1
        starts = np.concatenate([[0], cuts]).tolist()
        ends = np.concatenate([cuts, [len(sel)]]).tolist()
        for s, e in zip(starts, ends, strict=True):
            bkey = snap.block_keys[blocks[s]]
            rows = snap.row[sel[s:e]]
            whole = e - s == int(snap.sizes[blocks[s]])
            parts.append(
                Part(bytes(txn.get(bkey, db=h.dbs["keys"])), bytes(txn.get(bkey, db=h.dbs["meta"])),
                     rows, np.arange(s, e), whole)
            )
    n = len(sel)
    return snap, sel, assemble_keys(n, parts), assemble_meta(n, parts)
