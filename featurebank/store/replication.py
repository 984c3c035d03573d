"""What a replica on another machine needs from a store: a consistent copy, and the records
every commit after a generation changed, read back from the change log.

Why records and not replayed calls: the replica must hold the primary's store exactly
(the same ids, blocks, generations and change log), so its searcher catches up from its own
log as a same-host replica's does. A delta after generation `g` is read in one read
transaction at the primary's generation `H`: for each id the log names in (g, H], the
records that kind of change touches (an added id: its block in every block database, its
key, its thumbnail; a relabelled one: its rows block; a deleted one: its rows block, its
key and thumbnail; one whose metadata changed: its meta block), the label vocabulary the
touched rows use, every `info` counter (generation, count, next id, ...) and the log
entries themselves, each as the primary holds it at `H`. Applied in one write
transaction, they turn the replica's store at `g` into the primary's at `H`.

The log is kept from `log_start` on (`trim_log` drops what no reader needs any more);
`changes_since` and `delta_after` refuse a generation before it rather than answer with
changes missing. Compaction rewrites blocks: the environment's name (the store's epoch)
changes and a replica bootstraps again. The `errors` table (inputs an embedding job could
not read) is copied too, from the log entries naming its records (LOG_ERRORS): a replica's
store is the primary's, record for record.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

from featurebank.core.errors import FailedPrecondition
from featurebank.store.codec import decode_keys, decode_rows, key_record, pack_id, pack_ids
from featurebank.store.env import DB_NAMES, EnvHandle
from featurebank.store.rows import (
    LOG_ADDED,
    LOG_DELETED,
    LOG_ERRORS,
    LOG_META,
    LOG_RELABELLED,
    LOG_START,
    check_reaches,
    get_int,
    logged_errors,
    put_int,
)
from featurebank.store.store import Store, Txn

BLOCK_DBS = ("vectors", "rows", "keys", "meta")
DBS_OF_KIND = {LOG_ADDED: BLOCK_DBS, LOG_RELABELLED: ("rows",), LOG_DELETED: ("rows",),
               LOG_META: ("meta",)}
"""The block databases each kind of change rewrites."""
KEYED_KINDS = (LOG_ADDED, LOG_DELETED)  # kinds that change key2id and thumbs


@dataclass(frozen=True)
class Record:
    """One record of a delta: `value` None deletes it."""

    db: str
    key: bytes
    value: bytes | None


@dataclass(frozen=True)
class Delta:
    """The records that take a store from `after` to `generation` (epoch: its environment)."""

    after: int
    generation: int
    epoch: str
    records: list[Record]


def epoch(store: Store) -> str:
    """The name of the store's live environment: it changes only when the store is compacted."""
    with store._sh().read() as (_txn, h):
        return h.name


def log_start(store: Store) -> int:
    """The first generation after which the change log is complete."""
    with store._sh().read() as (txn, h):
        return get_int(txn, h, LOG_START)


def copy_to(store: Store, folder: Path) -> tuple[int, str]:
    """A consistent copy of the store's environment into `folder/<env>/` (LMDB's hot copy,
    page by page: as fast as copying the file, while writers go on) plus `folder/CURRENT`;
    returns (generation copied, epoch).

    The copy goes through the page cache, where it is read again at once to be streamed:
    LMDB's own `copy` writes with O_DIRECT, which left every byte to be read back from the
    disk. Not fsynced: a snapshot is trusted only within the boot that wrote it
    (server/replication.py)."""
    with store._sh().read() as (_txn, h):  # the read pins the environment against compaction
        (folder / h.name).mkdir(parents=True)
        fd = os.open(folder / h.name / "data.mdb", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            h.env.copyfd(fd)  # its own read transaction: one consistent snapshot
        finally:
            os.close(fd)
        name = h.name
    (folder / "CURRENT").write_text(f"{name}\n")
    copied = lmdb.open(str(folder / name), readonly=True, lock=False, max_dbs=len(DB_NAMES) + 2)
    try:
        with copied.begin() as txn:
            raw = txn.get(b"generation", db=copied.open_db(b"info", txn=txn, create=False))
    finally:
        copied.close()
    return (int.from_bytes(raw, "big") if raw else 0), name


def delta_after(store: Store, generation: int) -> Delta:
    """The records that changed after `generation`, as the store holds them now."""
    with store._sh().read() as (txn, h):
        check_reaches(txn, h, generation, store.bank.root)
        now = get_int(txn, h, "generation")
        records = list(_records(txn, h, generation)) if now > generation else []
        return Delta(generation, now, h.name, records)


def _records(txn: Txn, h: EnvHandle, generation: int) -> Iterator[Record]:
    ids: dict[bytes, list[np.ndarray]] = {kind: [] for kind in DBS_OF_KIND}
    errors: set[bytes] = set()  # records of the errors table put or removed
    cur = txn.cursor(db=h.dbs["log"])
    if cur.set_range(pack_id(generation + 1)):
        for k, v in cur:
            key = bytes(k)
            yield Record("log", key, bytes(v))
            if key[8:] == LOG_ERRORS:
                errors.update(logged_errors(v))
            else:
                ids.setdefault(key[8:], []).append(np.frombuffer(v, dtype="<u8"))
    for rec in sorted(errors):
        yield Record("errors", rec, _get(txn, h, "errors", rec))
    by_kind = {k: np.unique(np.concatenate(v)) if v else np.zeros(0, np.uint64)
               for k, v in ids.items() if k in DBS_OF_KIND}
    dbs_of_block: dict[bytes, set[str]] = {}
    keyed: dict[bytes, list[int]] = {}  # block -> ids whose key and thumbnail to send
    codes: set[int] = set()
    for kind, kind_ids in by_kind.items():
        for block, block_ids in _blocks_of(txn, h, kind_ids):
            dbs_of_block.setdefault(block, set()).update(DBS_OF_KIND[kind])
            if kind in KEYED_KINDS:
                keyed.setdefault(block, []).extend(block_ids)
    for block, dbs in sorted(dbs_of_block.items()):
        for db in sorted(dbs):
            yield Record(db, block, _get(txn, h, db, block))
        bids, bcodes, _ = decode_rows(txn.get(block, db=h.dbs["rows"]))
        codes.update(int(c) for c in np.unique(bcodes) if c >= 0)
        if block in keyed:
            yield from _keyed(txn, h, block, bids, keyed[block])
    for code in sorted(codes):
        label = txn.get(b"c" + code.to_bytes(4, "big"), db=h.dbs["vocab"])
        if label is not None:
            yield Record("vocab", b"c" + code.to_bytes(4, "big"), bytes(label))
            yield Record("vocab", b"l" + bytes(label), code.to_bytes(4, "big"))
    for k, v in txn.cursor(db=h.dbs["info"]):
        if bytes(k) != LOG_START.encode():  # a replica keeps its own log, untrimmed
            yield Record("info", bytes(k), bytes(v))


def _get(txn: Txn, h: EnvHandle, db: str, key: bytes) -> bytes | None:
    v = txn.get(key, db=h.dbs[db])
    return None if v is None else bytes(v)


def _blocks_of(txn: Txn, h: EnvHandle, ids: np.ndarray) -> Iterator[tuple[bytes, list[int]]]:
    """(block key, the ids in it) for the blocks holding `ids` (sorted)."""
    cur = txn.cursor(db=h.dbs["rows"])
    i = 0
    while i < len(ids):
        target = pack_id(int(ids[i]))
        if not cur.set_range(target):
            found = cur.last()  # past the last block's first id: the last block
        else:
            found = bytes(cur.key()) == target or cur.prev()
        if not found:
            i += 1
            continue
        bids = decode_rows(cur.value())[0]
        j = int(np.searchsorted(ids, bids[-1], side="right"))
        if j <= i:
            i += 1  # not in any block (cannot happen before a compaction)
            continue
        yield bytes(cur.key()), [int(x) for x in ids[i:j]]
        i = j


def _keyed(
    txn: Txn, h: EnvHandle, block: bytes, bids: np.ndarray, ids: list[int]
) -> Iterator[Record]:
    """Each id's key2id record and thumbnail, as they are now (absent: deleted)."""
    keys = decode_keys(txn.get(block, db=h.dbs["keys"]))
    rows = np.searchsorted(bids, np.asarray(ids, dtype=np.uint64))
    for row, packed in zip(rows.tolist(), pack_ids(np.asarray(ids, np.uint64)), strict=True):
        rec = key_record(keys[row].encode())
        yield Record("key2id", rec, _get(txn, h, "key2id", rec))
        yield Record("thumbs", packed, _get(txn, h, "thumbs", packed))


def apply(store: Store, records: list[Record], after: int, generation: int) -> None:
    """Write a delta in one transaction; refuses one that does not start where the store is."""

    def fn(txn: Txn, h: EnvHandle) -> None:
        now = get_int(txn, h, "generation")
        if now != after:
            raise FailedPrecondition(
                f"a delta after generation {after} cannot apply to {store.bank.root} at {now}"
            )
        for r in records:
            if r.value is None:
                txn.delete(r.key, db=h.dbs[r.db])
            else:
                txn.put(r.key, r.value, db=h.dbs[r.db])
        if get_int(txn, h, "generation") != generation:
            raise FailedPrecondition(f"a delta to generation {generation} does not reach it")

    store._write(fn)


def trim_log(store: Store, through: int) -> int:
    """Drop the log's entries up to generation `through`; returns how many were dropped.
    Changes nothing a read sees, so the generation stays."""

    def fn(txn: Txn, h: EnvHandle) -> int:
        if through <= get_int(txn, h, LOG_START):
            return 0
        cur = txn.cursor(db=h.dbs["log"])
        dropped = 0
        if cur.first():
            while bytes(cur.key())[:8] <= pack_id(through):
                dropped += 1
                if not cur.delete():
                    break
        put_int(txn, h, LOG_START, through)
        return dropped

    n: int = store._write(fn)
    return n


def files_of(folder: Path) -> list[Path]:
    """Every file under `folder`, in a stable order (the order a snapshot streams them)."""
    out = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        out += [Path(root) / n for n in sorted(names)]
    return out
