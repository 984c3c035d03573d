"""Rows and blocks inside one transaction: counters, the change log, locating ids, snapshots.

Helpers of `featurebank.store.store`, kept apart so the Store class reads as its operations.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from featurebank.core.errors import FailedPrecondition, InvalidInput
from featurebank.store.codec import (
    DELETED,
    NO_LABEL,
    ROW_DTYPE,
    check_split,
    decode_json_list,
    decode_keys,
    decode_rows,
    pack_id,
)
from featurebank.store.env import EnvHandle

Txn = Any  # lmdb.Transaction


def get_int(txn: Txn, h: EnvHandle, name: str) -> int:
    v = txn.get(name.encode(), db=h.dbs["info"])
    return int.from_bytes(bytes(v), "big") if v is not None else 0


def put_int(txn: Txn, h: EnvHandle, name: str, value: int) -> None:
    txn.put(name.encode(), int(value).to_bytes(8, "big"), db=h.dbs["info"])


def commit_generation(txn: Txn, h: EnvHandle, labels_changed: bool) -> int:
    gen = get_int(txn, h, "generation") + 1
    put_int(txn, h, "generation", gen)
    if labels_changed:
        put_int(txn, h, "labels_generation", gen)
    return gen


LOG_START = "log_start"  # info counter: the log holds every change after this generation
# What a change log entry (generation + kind -> ids) says happened to its ids.
LOG_ADDED, LOG_RELABELLED, LOG_DELETED, LOG_META = b"a", b"r", b"d", b"m"
# An entry naming records of the `errors` table (inputs that failed to embed, by key record,
# not ids) a commit put or removed: read by replicas only, so they copy the table too.
LOG_ERRORS = b"e"


class LogTrimmed(FailedPrecondition):
    """The change log no longer reaches back to the generation asked for."""


def check_reaches(txn: Txn, h: EnvHandle, generation: int, where: object) -> None:
    """LogTrimmed unless the log holds every change after `generation`."""
    start = get_int(txn, h, LOG_START)
    if generation < start:
        raise LogTrimmed(
            f"the change log of {where} starts after generation {start}; generation "
            f"{generation} is older (trimmed): copy the store again"
        )


def log_ids(txn: Txn, h: EnvHandle, gen: int, kind: bytes, ids: np.ndarray) -> None:
    if len(ids):
        txn.put(pack_id(gen) + kind, np.asarray(ids, dtype="<u8").tobytes(), db=h.dbs["log"])


def log_errors(txn: Txn, h: EnvHandle, gen: int, records: Sequence[bytes]) -> None:
    """Log the `errors` records commit `gen` put or removed (each length-prefixed: a hashed
    key record may hold any byte)."""
    if records:
        value = b"".join(len(r).to_bytes(2, "big") + r for r in records)
        txn.put(pack_id(gen) + LOG_ERRORS, value, db=h.dbs["log"])


def logged_errors(value: bytes | memoryview) -> list[bytes]:
    """The `errors` records a LOG_ERRORS entry names."""
    buf, out, i = bytes(value), [], 0
    while i < len(buf):
        n = int.from_bytes(buf[i : i + 2], "big")
        out.append(buf[i + 2 : i + 2 + n])
        i += 2 + n
    return out


def as_ids(ids: Any) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size and arr.dtype.kind not in "iu":
        raise InvalidInput(f"ids must be integers, got dtype {arr.dtype}")
    if arr.size and arr.dtype.kind == "i" and (arr < 0).any():
        arr = arr.astype(np.int64)
        return np.where(arr < 0, np.iinfo(np.uint64).max, arr).astype(np.uint64)
    return arr.astype(np.uint64)


class Located:
    """Where each asked-for id lives: block number and row (-1 when absent or deleted)."""

    def __init__(self, n: int) -> None:
        self.blocks: list[tuple[bytes, np.ndarray, np.ndarray, np.ndarray]] = []
        self.block = np.full(n, -1, dtype=np.int64)
        self.row = np.full(n, -1, dtype=np.int64)


def _runs(txn: Txn, h: EnvHandle, s: np.ndarray) -> Iterator[tuple[bytes, Any, int, int]]:
    """Each block holding some of the sorted ids `s`: (its key, its rows record as a view of
    the map, i, j) with s[i:j] in its id range; one cursor seek per block."""
    cur = txn.cursor(db=h.dbs["rows"])
    i, n = 0, len(s)
    while i < n:
        target = pack_id(int(s[i]))
        if cur.set_range(target):
            if bytes(cur.key()) != target and not cur.prev():
                i += 1
                continue
        elif not cur.last():
            break
        value = cur.value()
        tail = np.frombuffer(value, ROW_DTYPE, count=1, offset=len(value) - ROW_DTYPE.itemsize)
        j = int(np.searchsorted(s, tail["id"][0], side="right"))
        if j <= i:
            i += 1  # the id falls in a gap between blocks (deleted and compacted away)
            continue
        yield bytes(cur.key()), value, i, j
        i = j


def _rows_of(bids: np.ndarray, states: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row of each wanted id in its block, whether it is there and live); a block without
    gaps (never compacted) is indexed by offset."""
    if int(bids[-1]) - int(bids[0]) == len(bids) - 1:
        rows = (wanted - bids[0]).astype(np.int64)
        return rows, states[rows] != DELETED
    rows = np.minimum(np.searchsorted(bids, wanted), len(bids) - 1)
    return rows, (bids[rows] == wanted) & (states[rows] != DELETED)


def locate(txn: Txn, h: EnvHandle, ids: np.ndarray) -> Located:
    """Find the rows of `ids` by walking the blocks in id order (one cursor seek per block)."""
    out = Located(len(ids))
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    for key, value, i, j in _runs(txn, h, s):
        # Copies: the map is only valid inside the transaction, and a delete marks states.
        bids, codes, states = (a.copy() for a in decode_rows(value))
        rows, ok = _rows_of(bids, states, s[i:j])
        out.blocks.append((key, bids, codes, states))
        hit = order[i:j][ok]
        out.block[hit] = len(out.blocks) - 1
        out.row[hit] = rows[ok]
    return out


def gather_vectors(
    txn: Txn, h: EnvHandle, ids: np.ndarray, dim: int, dtype: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(found mask, vectors of the found ids, in the order given, in the store's dtype).

    For many ids at once (a search's candidates touch most blocks of a bank): the rows and
    vectors records are read in place in the map (views, valid inside the transaction);
    only the asked-for rows are copied.
    """
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    found = np.zeros(len(s), dtype=bool)
    out = np.empty((len(s), dim), dtype=dtype)
    for key, value, i, j in _runs(txn, h, s):
        bids, _, states = decode_rows(value)
        rows, ok = _rows_of(bids, states, s[i:j])
        block = np.frombuffer(txn.get(key, db=h.dbs["vectors"]), dtype=dtype)
        at = order[i:j][ok]
        out[at] = block.reshape(-1, dim)[rows[ok]]
        found[at] = True
    return found, out[found]


class Snapshot:
    """Every block's rows at one instant: the plan for scans and the source of label tables."""

    def __init__(self, txn: Txn, h: EnvHandle) -> None:
        keys: list[bytes] = []
        raws = []
        for k, v in txn.cursor(db=h.dbs["rows"]):
            keys.append(bytes(k))
            raws.append(v)
        rows = np.frombuffer(b"".join(raws), dtype=ROW_DTYPE)  # copies out of the map
        self.block_keys = keys
        self.sizes = np.array([len(v) for v in raws], dtype=np.int64) // ROW_DTYPE.itemsize
        self.ids = np.ascontiguousarray(rows["id"])
        self.codes = np.ascontiguousarray(rows["code"])
        self.states = np.ascontiguousarray(rows["state"])
        self.block = np.repeat(np.arange(len(keys)), self.sizes)
        starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]) if len(keys) else self.sizes
        self.row = np.arange(len(self.ids)) - np.repeat(starts, self.sizes)

    def select(self, split: str | None, labelled_only: bool) -> np.ndarray:
        """Positions (into this snapshot) of the live rows that pass the filters."""
        mask = self.states != DELETED
        if split is not None:
            mask &= self.states == check_split("<filter>", split)
        if labelled_only:
            mask &= self.codes != NO_LABEL
        return np.flatnonzero(mask)


class Part(NamedTuple):
    """Raw keys and metadata of one block, and which of its rows go where."""

    keys: bytes
    meta: bytes
    rows: np.ndarray
    positions: np.ndarray
    whole: bool  # the whole block, in order, at consecutive positions


def assemble_keys(n: int, parts: list[Part]) -> list[str]:
    if all(p.whole for p in parts) and in_order(parts):
        return decode_keys(b"\0".join(p.keys for p in parts)) if parts else []
    out: list[str] = [""] * n
    for p in parts:
        block = decode_keys(p.keys)
        for r, pos in zip(p.rows.tolist(), p.positions.tolist(), strict=True):
            out[pos] = block[r]
    return out


def assemble_meta(n: int, parts: list[Part]) -> list[dict[str, Any]]:
    if all(p.whole for p in parts) and in_order(parts):
        joined = b",".join(p.meta[1:-1] for p in parts)
        return decode_json_list(b"[" + joined + b"]") if parts else []
    out: list[dict[str, Any]] = [{}] * n
    for p in parts:
        block = decode_json_list(p.meta)
        for r, pos in zip(p.rows.tolist(), p.positions.tolist(), strict=True):
            out[pos] = block[r]
    return out


def in_order(parts: list[Part]) -> bool:
    starts_at_zero = not parts or int(parts[0].positions[0]) == 0
    return starts_at_zero and all(
        int(a.positions[-1]) + 1 == int(b.positions[0]) for a, b in itertools.pairwise(parts)
    )


def labels_of_codes(codes: np.ndarray, vocab: dict[int, str]) -> list[str | None]:
    """Codes to labels by one fancy index into an object array (fast for full scans)."""
    if not len(codes):
        return []
    used = np.unique(codes)
    table = np.empty(int(used[-1]) + 2, dtype=object)  # slot 0 is -1: unlabelled
    for c in used.tolist():
        table[c + 1] = None if c == NO_LABEL else vocab[c]
    out: list[str | None] = table[codes.astype(np.int64) + 1].tolist()
    return out
