"""Compaction: copy the live items into a fresh environment, then switch CURRENT to it.

A copy rather than an in-place rewrite because LMDB never shrinks its file, and
because readers (in this or other processes) may still be scanning the old
environment: they keep a consistent view until their next call. Blocks without
deleted rows are copied unchanged; the rest are re-packed with their neighbours.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator
from typing import Any

import lmdb
import numpy as np

from featurebank.core.bank import write_atomic
from featurebank.core.errors import StorageFull
from featurebank.store.codec import (
    DELETED,
    decode_json_list,
    decode_keys,
    decode_rows,
    encode_json_list,
    encode_keys,
    encode_rows,
    pack_id,
)
from featurebank.store.env import (
    CURRENT,
    DB_NAMES,
    ENV_PREFIX,
    EnvHandle,
    SharedStore,
    is_disk_full,
)

log = logging.getLogger(__name__)

_CHUNK_BYTES = 64 << 20  # commit the new environment in pieces of this size
_BLOCK_DBS = ("vectors", "rows", "keys", "meta")
Record = tuple[bytes, dict[str, bytes]]  # block key, {db name: value}


def compact(sh: SharedStore, block_rows: int, row_bytes: int) -> None:
    """Write the live items of `sh`'s current environment to `env-<n+1>` and switch."""
    old = sh.current()
    name = f"{ENV_PREFIX}{int(old.name[len(ENV_PREFIX) :]) + 1}"
    path = sh.path / name
    shutil.rmtree(path, ignore_errors=True)
    new = EnvHandle(path, create=True, map_size=old.map_size)
    try:
        with sh.read(old) as (txn, _):
            for db in DB_NAMES:
                if db not in _BLOCK_DBS:
                    write_chunks(new, db, _copy(txn.cursor(db=old.dbs[db])))
            blocks = _repack(txn, old, block_rows, row_bytes)
            write_blocks(new, blocks)
        new.env.sync(True)
    except BaseException as e:
        new.close()
        shutil.rmtree(path, ignore_errors=True)
        if isinstance(e, lmdb.Error) and is_disk_full(e):
            raise StorageFull(f"no room to compact {sh.path} ({e}); the store is unchanged") from e
        raise
    write_atomic(sh.path / CURRENT, f"{name}\n".encode())
    sh.install(new)
    shutil.rmtree(old.path, ignore_errors=True)
    log.info("compacted %s into %s", old.path, path)


def _copy(cursor: Any) -> Iterator[tuple[bytes, bytes]]:
    for k, v in cursor:
        yield bytes(k), bytes(v)


def _chunks(items: Iterable[Any], size_of: Any) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    size = 0
    for item in items:
        chunk.append(item)
        size += size_of(item)
        if size >= _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _commit(new: EnvHandle, fn: Any) -> None:
    """One write transaction on the new environment, growing its map if needed."""
    while True:
        try:
            with new.env.begin(write=True) as txn:
                fn(txn)
            return
        except lmdb.MapFullError:
            new.env.set_mapsize(new.map_size * 2)


def write_chunks(new: EnvHandle, db: str, items: Iterable[tuple[bytes, bytes]]) -> None:
    """Append sorted records to `db` of a fresh environment, committed in chunks."""
    for chunk in _chunks(items, lambda kv: len(kv[0]) + len(kv[1])):
        _commit(new, lambda txn, c=chunk: txn.cursor(db=new.dbs[db]).putmulti(c, append=True))


def write_blocks(new: EnvHandle, blocks: Iterable[Record]) -> None:
    """Append blocks (key, {db: record}) in id order to a fresh environment."""
    def put(txn: Any, chunk: list[Record]) -> None:
        for key, values in chunk:
            for db, value in values.items():
                txn.put(key, value, append=True, db=new.dbs[db])

    for chunk in _chunks(blocks, lambda rec: sum(len(v) for v in rec[1].values())):
        _commit(new, lambda txn, c=chunk: put(txn, c))


class _Pending:
    """Live rows waiting to fill a re-packed block."""

    def __init__(self) -> None:
        self.ids: list[np.ndarray] = []
        self.codes: list[np.ndarray] = []
        self.states: list[np.ndarray] = []
        self.vectors: list[bytes] = []
        self.keys: list[Any] = []
        self.meta: list[Any] = []

    def __len__(self) -> int:
        return len(self.keys)

    def add(
        self, txn: Any, old: EnvHandle, key: bytes, live: np.ndarray, rows: Any, row_bytes: int
    ) -> None:
        ids, codes, states = rows
        vec = np.frombuffer(txn.get(key, db=old.dbs["vectors"]), np.uint8).reshape(-1, row_bytes)
        self.ids.append(ids[live])
        self.codes.append(codes[live])
        self.states.append(states[live])
        self.vectors.append(vec[live].tobytes())
        keys = decode_keys(txn.get(key, db=old.dbs["keys"]))
        meta = decode_json_list(txn.get(key, db=old.dbs["meta"]))
        self.keys += [keys[i] for i in live]
        self.meta += [meta[i] for i in live]

    def take(self, block_rows: int, row_bytes: int) -> Record:
        ids = np.concatenate(self.ids)
        codes, states = np.concatenate(self.codes), np.concatenate(self.states)
        vectors = b"".join(self.vectors)
        n = min(block_rows, len(ids))
        record = {
            "vectors": vectors[: n * row_bytes],
            "rows": encode_rows(ids[:n], codes[:n], states[:n]),
            "keys": encode_keys(self.keys[:n]),
            "meta": encode_json_list(self.meta[:n]),
        }
        key = pack_id(int(ids[0]))
        self.ids, self.codes, self.states = [ids[n:]], [codes[n:]], [states[n:]]
        self.vectors, self.keys, self.meta = (
            [vectors[n * row_bytes :]],
            self.keys[n:],
            self.meta[n:],
        )
        return key, record


def _repack(txn: Any, old: EnvHandle, block_rows: int, row_bytes: int) -> Iterator[Record]:
    pending = _Pending()
    for k, v in txn.cursor(db=old.dbs["rows"]):
        key = bytes(k)
        rows = tuple(a.copy() for a in decode_rows(v))
        live = np.flatnonzero(rows[2] != DELETED)
        if len(live) == len(rows[0]) == block_rows and not len(pending):
            yield key, {db: bytes(txn.get(key, db=old.dbs[db])) for db in _BLOCK_DBS}
            continue
        if len(live):
            pending.add(txn, old, key, live, rows, row_bytes)
        while len(pending) >= block_rows:
            yield pending.take(block_rows, row_bytes)
    while len(pending):
        yield pending.take(block_rows, row_bytes)
