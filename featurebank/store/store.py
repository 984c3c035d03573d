"""The bank's feature store: vectors, labels, splits and metadata in one LMDB environment.

Importable without TensorFlow. Layout and invariants:

- `BANK/store/CURRENT` names the live environment `BANK/store/env-<n>/` (an LMDB env
  with named sub-databases, see `codec` for the records); `writer.lock` admits
  one writing process at a time.
- Ids are sequential uint64, never reused; vectors are packed in blocks keyed by their
  first id and are never rewritten by relabelling or deleting (only `compact()` drops
  deleted rows, into a fresh environment).
- Every commit bumps `generation` and logs the ids it added, relabelled or deleted,
  so `changes_since(gen)` lets an index catch up.
- Inputs are checked before a transaction starts, and each call is one transaction,
  so a bad or interrupted batch leaves nothing behind.

Why one module of this size: `Store` is one class whose methods share the transaction
helpers and the invariants above (ids, blocks, generations, change log); its parts that
stand alone live beside it (env, codec, rows, items, compact, transfer).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from featurebank.core import bank_models
from featurebank.core.bank import Bank, write_atomic
from featurebank.core.errors import FailedPrecondition, InvalidInput, NotFound, shown
from featurebank.core.spec import Spec
from featurebank.store import metadata
from featurebank.store import thumbs as thumbs_db
from featurebank.store.codec import (
    DELETED,
    NO_LABEL,
    SPLIT_CODES,
    SPLITS,
    check_keys,
    check_label,
    check_lengths,
    check_metas,
    check_split,
    check_vectors,
    decode_keys,
    decode_rows,
    default_block_rows,
    encode_json_list,
    encode_keys,
    encode_rows,
    key_record,
    key_records,
    pack_id,
    pack_ids,
    unpack_id,
)
from featurebank.store.env import (
    CURRENT,
    ENV_PREFIX,
    INITIAL_MAP_SIZE,
    EnvHandle,
    SharedStore,
    acquire,
    release,
)
from featurebank.store.items import Changes, Items, Lazy
from featurebank.store.rows import (
    LOG_ADDED,
    LOG_DELETED,
    LOG_META,
    LOG_RELABELLED,
    Part,
    Snapshot,
    as_ids,
    assemble_keys,
    assemble_meta,
    check_reaches,
    commit_generation,
    gather_vectors,
    get_int,
    labels_of_codes,
    locate,
    log_errors,
    log_ids,
    put_int,
)

__all__ = ["Changes", "Items", "Spec", "Store", "create", "open", "open_or_create"]

log = logging.getLogger(__name__)

FORMAT = 1
TAIL_BYTES = 3 * 4096 - 64
"""The largest block a small append tops up: three LMDB overflow pages, less their header."""
_SPLIT_NAMES = np.array([*SPLITS, *[""] * (256 - len(SPLITS))], dtype=object)
_ADDED, _RELABELLED, _DELETED, _META = LOG_ADDED, LOG_RELABELLED, LOG_DELETED, LOG_META
Txn = Any  # lmdb.Transaction


# ---- opening -------------------------------------------------------------------------------


def create(
    bank: str | os.PathLike[str] | Bank,
    spec: Spec,
    exist_ok: bool = False,
    *,
    block_rows: int | None = None,
    map_size: int = INITIAL_MAP_SIZE,
) -> Store:
    """Create BANK/store/ for vectors of `spec`; the returned store holds the writer lock."""
    b = Bank(bank)
    if spec.dim <= 0:
        raise InvalidInput(f"spec needs a positive dim to create a store: [{spec.describe()}]")
    rows = block_rows or default_block_rows(spec.dim, np.dtype(spec.dtype).itemsize)
    if rows <= 0:
        raise InvalidInput(f"block_rows must be positive, got {rows}")
    shared = acquire(b.store_dir)
    try:
        shared.acquire_writer()
        try:
            if (b.store_dir / CURRENT).exists():
                if not exist_ok:
                    raise FailedPrecondition(f"bank {b.root} already has a store")
                store = Store(b, shared, readonly=False, writer=True)
                store.spec.check_same(spec)
                return store
            bank_models.keep(b, spec)  # before the store exists: a bank never lacks its model
            _init_env(b.store_dir, spec, rows, map_size)
            return Store(b, shared, readonly=False, writer=True)
        except BaseException:
            shared.release_writer()
            raise
    except BaseException:
        release(shared)
        raise


def _init_env(store_dir: Path, spec: Spec, block_rows: int, map_size: int) -> None:
    handle = EnvHandle(store_dir / f"{ENV_PREFIX}1", create=True, map_size=map_size)
    try:
        with handle.env.begin(write=True) as txn:
            info = handle.dbs["info"]
            txn.put(b"spec", json.dumps(spec.to_dict()).encode(), db=info)
            for name, value in (("format", FORMAT), ("block_rows", block_rows)):
                txn.put(name.encode(), value.to_bytes(8, "big"), db=info)
        handle.env.sync(True)
    finally:
        handle.close()
    write_atomic(store_dir / CURRENT, f"{ENV_PREFIX}1\n".encode())


def open(bank: str | os.PathLike[str] | Bank, readonly: bool = False) -> Store:  # noqa: A001
    """Open an existing store; a writable one takes the writer lock at its first write."""
    b = Bank(bank)
    if not (b.store_dir / CURRENT).exists():
        envs = sorted(p.name for p in b.store_dir.glob(f"{ENV_PREFIX}*")) if b.store_dir.is_dir() else []
        if envs:  # NotFound still: a create interrupted before CURRENT is simply redone
            raise NotFound(f"{b.store_dir / CURRENT} is missing, though {', '.join(envs)} is "
                           "there: `featurebank store repair` points it back")  # fmt: skip
        raise NotFound(f"no store in bank {b.root}: create one first (e.g. featurebank embed)")
    shared = acquire(b.store_dir)
    try:
        return Store(b, shared, readonly=readonly, writer=False)
    except BaseException:
        release(shared)
        raise


@contextmanager
def borrowed(bank: BankLike) -> Iterator[Store]:
    """The open bank handle: the caller's open store as it is, or a path opened read-only
    for the duration of the block. Library functions take either, so a long-lived
    process (the server) passes its store and a script passes a path."""
    if isinstance(bank, Store):
        yield bank
        return
    with open(bank, readonly=True) as st:
        yield st


def open_or_create(bank: str | os.PathLike[str] | Bank, spec: Spec, **kwargs: Any) -> Store:
    """Open the bank's store if it exists (refusing another spec), else create it."""
    try:
        store = open(bank)
    except NotFound:
        return create(bank, spec, exist_ok=True, **kwargs)
    try:
        store.spec.check_same(spec)
        if bank_models.copy_of(store.bank, store.spec) is None and spec.weights_path:
            # a bank made before banks kept their model: keep the file this job was given
            bank_models.keep(store.bank, store.spec, spec.weights_path)
            store.spec = bank_models.locate(store.bank, store.spec)
    except BaseException:
        store.close()
        raise
    return store


# ---- the store -----------------------------------------------------------------------------


class Store:
    """One bank's store. Use as a context manager, or call close()."""

    def __init__(self, bank: Bank, shared: SharedStore, readonly: bool, writer: bool) -> None:
        self.bank = bank
        self.path = bank.store_dir
        self.readonly = readonly
        self._shared = shared
        self._writer = writer
        self._closed = False
        with shared.read() as (txn, h):
            raw = txn.get(b"spec", db=h.dbs["info"])
            if raw is None:
                raise FailedPrecondition(f"store {self.path} has no spec record")
            # the bank's own copy of its model file, wherever the recorded path points now
            self.spec = bank_models.locate(bank, Spec.from_dict(json.loads(bytes(raw))))
            self.block_rows = get_int(txn, h, "block_rows")
        self._dtype = np.dtype(self.spec.dtype)

    # ---- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the writer lock (if held) and this process's handle on the environment."""
        if self._closed:
            return
        self._closed = True
        if self._shared.valid:
            if self._writer:
                self._shared.release_writer()
            release(self._shared)

    def __repr__(self) -> str:
        return f"Store({str(self.bank.root)!r}, {self.spec.describe()!r})"

    def _sh(self) -> SharedStore:
        """This process's shared handle; after a fork the child gets a fresh one."""
        if self._closed:
            raise FailedPrecondition(f"store {self.path} is closed")
        if not self._shared.valid:
            self._shared = acquire(self.path)
            self._writer = False
        return self._shared

    def acquire_writer(self) -> None:
        """Take the writer lock now (writes take it anyway), to fail fast with WriterBusy."""
        if self.readonly:
            raise FailedPrecondition(f"store of bank {self.bank.root} was opened read-only")
        sh = self._sh()
        with sh.lock:
            if not self._writer:
                sh.acquire_writer()
                self._writer = True

    def writer_pid(self) -> int | None:
        """Which process holds the bank's writer lock now (-1: unknown), None when none does."""
        return self._sh().holder()

    def _write(self, fn: Any) -> Any:
        self.acquire_writer()
        return self._sh().write(fn)

    def watch_commits(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` (on the committing thread; it must be quick) after every commit this
        process makes to the bank, by any of its stores; returns what stops it. Why: a
        replica's stream waits for the next commit instead of polling the generation (commits
        by other processes are seen when it next looks)."""
        listeners = self._sh().on_commit
        listeners.append(listener)
        return lambda: listeners.remove(listener) if listener in listeners else None

    # ---- generations ----------------------------------------------------------------------

    def _info(self, name: str) -> int:
        sh = self._sh()
        with sh.read() as (txn, h):
            return get_int(txn, h, name)

    @property
    def generation(self) -> int:
        """The last committed generation (read fresh: another process may have written)."""
        return self._info("generation")

    @property
    def labels_generation(self) -> int:
        """Generation of the last change to which items are labelled how (labels, splits)."""
        return self._info("labels_generation")

    @property
    def count(self) -> int:
        """Number of live items."""
        return self._info("count")

    # ---- writing --------------------------------------------------------------------------

    def put_batch(
        self,
        keys: Sequence[str],
        vectors: np.ndarray,
        labels: Sequence[str | None] | None = None,
        splits: Sequence[str] | None = None,
        meta: Sequence[dict[str, Any] | None] | None = None,
        *,
        spec: Spec | None = None,
        replace: bool = False,
        thumbnails: Sequence[bytes | None] | None = None,
    ) -> np.ndarray:
        """Add new items in one transaction and return their ids.

        Keys already stored are refused (filter with `missing()` to resume a job), unless
        `replace`: then the stored items are deleted and re-added with new ids in the
        same transaction (an atomic upsert). `thumbnails`: a small JPEG (or None) per item.
        """
        if spec is not None:
            self.spec.check_same(spec)
        key_bytes = check_keys(keys)
        vecs = check_vectors(keys, vectors, self.spec)
        for name, values in (("labels", labels), ("splits", splits), ("meta", meta)):
            check_lengths(keys, name, values)
        labs = (
            [check_label(k, v) for k, v in zip(keys, labels, strict=True)]
            if labels is not None
            else None
        )
        states = np.array(
            [check_split(k, s) for k, s in zip(keys, splits, strict=True)]
            if splits is not None
            else [SPLIT_CODES["none"]] * len(keys),
            dtype=np.uint8,
        )
        now = time.time()
        metas = check_metas(keys, meta, now)
        if thumbnails is not None:
            thumbs_db.check_thumbnails(keys, thumbnails)
        if not len(keys):
            return np.zeros(0, dtype=np.uint64)
        records = key_records(key_bytes)

        def fn(txn: Txn, h: EnvHandle) -> np.ndarray:
            first = get_int(txn, h, "next_id")
            ids = np.arange(first, first + len(keys), dtype=np.uint64)
            replaced = self._replace_in_txn(txn, h, records) if replace else None
            self._claim_keys(txn, h, keys, records, ids)
            codes = (
                self._codes_for(txn, h, labs)
                if labs is not None
                else np.full(len(keys), NO_LABEL, np.int32)
            )
            self._append_rows(txn, h, ids, vecs, codes, states, list(keys), metas)
            if thumbnails is not None:
                thumbs_db.put(txn, h.dbs, ids, thumbnails)
            labelled = bool((codes != NO_LABEL).any())
            if replaced is not None:
                labelled |= replaced[1]
            gen = commit_generation(txn, h, labels_changed=labelled)
            log_ids(txn, h, gen, _ADDED, ids)
            if replaced is not None:
                log_ids(txn, h, gen, _DELETED, replaced[0])
            put_int(txn, h, "next_id", first + len(keys))
            put_int(txn, h, "count", get_int(txn, h, "count") + len(keys))
            log_errors(txn, h, gen, self._clear_errors(txn, h, records))
            return ids

        ids: np.ndarray = self._write(fn)
        return ids

    def _replace_in_txn(
        self, txn: Txn, h: EnvHandle, records: list[bytes]
    ) -> tuple[np.ndarray, bool]:
        """Delete whichever of the batch's keys are stored: (their ids, any labelled)."""
        found = [(rec, txn.get(rec, db=h.dbs["key2id"])) for rec in records]
        stored = [(rec, unpack_id(v)) for rec, v in found if v is not None]
        if not stored:
            return np.zeros(0, np.uint64), False
        ids = np.array(sorted(i for _, i in stored), dtype=np.uint64)
        return ids, self._delete_in_txn(txn, h, ids, [rec for rec, _ in stored])

    def _claim_keys(
        self, txn: Txn, h: EnvHandle, keys: Sequence[str], records: list[bytes], ids: np.ndarray
    ) -> None:
        """Map keys to ids, refusing any key already stored (the transaction then aborts)."""
        pairs = list(zip(records, pack_ids(ids), strict=True))
        _, added = txn.cursor(db=h.dbs["key2id"]).putmulti(pairs, overwrite=False)
        if added == len(pairs):
            return
        for key, (rec, value) in zip(keys, pairs, strict=True):
            if bytes(txn.get(rec, db=h.dbs["key2id"])) != value:
                raise InvalidInput(
                    f"key {shown(key)} is already in bank {self.bank.root}; use missing() to skip "
                    "stored keys or delete() it first"
                )

    def _codes_for(self, txn: Txn, h: EnvHandle, labels: Sequence[str | None]) -> np.ndarray:
        """Label codes, adding new labels to the vocabulary (codes are never reused)."""
        vocab = h.dbs["vocab"]
        table: dict[str, int] = {}
        for label in set(labels):
            if label is None:
                continue
            raw = txn.get(b"l" + label.encode(), db=vocab)
            if raw is None:
                code = get_int(txn, h, "next_code")
                put_int(txn, h, "next_code", code + 1)
                txn.put(b"l" + label.encode(), code.to_bytes(4, "big"), db=vocab)
                txn.put(b"c" + code.to_bytes(4, "big"), label.encode(), db=vocab)
            else:
                code = int.from_bytes(bytes(raw), "big")
            table[label] = code
        return np.array([NO_LABEL if x is None else table[x] for x in labels], dtype=np.int32)

    def _append_rows(
        self,
        txn: Txn,
        h: EnvHandle,
        ids: np.ndarray,
        vecs: np.ndarray,
        codes: np.ndarray,
        states: np.ndarray,
        keys: list[str],
        metas: list[dict[str, Any]],
    ) -> None:
        """Top up the last block while it stays small, then append whole new blocks.

        Why only while small: LMDB rewrites a value whole, so topping up a full-size last
        block would cost a 1-item Upsert the whole block (256 KiB) of writes. The last block
        is rewritten only while it fits `TAIL_BYTES` or is no bigger than the rows being
        added; otherwise a new block starts, and `compact` packs small blocks into full ones.
        """
        start = 0
        cur = txn.cursor(db=h.dbs["rows"])
        if cur.last():
            tail = bytes(cur.key())
            t_ids, t_codes, t_states = decode_rows(bytes(cur.value()))
            row_bytes = vecs.itemsize * (vecs.shape[1] if vecs.ndim > 1 else 1)
            tail_bytes, new_bytes = len(t_ids) * row_bytes, len(ids) * row_bytes
            top_up = tail_bytes + new_bytes <= TAIL_BYTES or tail_bytes <= new_bytes
            m = min(self.block_rows - len(t_ids), len(ids)) if top_up else 0
            if m > 0:
                db = h.dbs
                txn.put(
                    tail,
                    bytes(txn.get(tail, db=db["vectors"])) + vecs[:m].tobytes(),
                    db=db["vectors"],
                )
                rows = encode_rows(
                    np.concatenate([t_ids, ids[:m]]),
                    np.concatenate([t_codes, codes[:m]]),
                    np.concatenate([t_states, states[:m]]),
                )
                txn.put(tail, rows, db=db["rows"])
                old = bytes(txn.get(tail, db=db["keys"]))
                txn.put(tail, old + b"\0" + encode_keys(keys[:m]), db=db["keys"])
                old = bytes(txn.get(tail, db=db["meta"]))
                txn.put(tail, old[:-1] + b"," + encode_json_list(metas[:m])[1:], db=db["meta"])
                start = m
        for s in range(start, len(ids), self.block_rows):
            e = min(len(ids), s + self.block_rows)
            key = pack_id(int(ids[s]))
            txn.put(key, vecs[s:e].data.cast("B"), append=True, db=h.dbs["vectors"])
            txn.put(
                key, encode_rows(ids[s:e], codes[s:e], states[s:e]), append=True, db=h.dbs["rows"]
            )
            txn.put(key, encode_keys(keys[s:e]), append=True, db=h.dbs["keys"])
            txn.put(key, encode_json_list(metas[s:e]), append=True, db=h.dbs["meta"])

    def _clear_errors(self, txn: Txn, h: EnvHandle, records: Iterable[bytes]) -> list[bytes]:
        """Forget the recorded errors of keys now stored; returns the records removed."""
        if not txn.stat(h.dbs["errors"])["entries"]:
            return []
        return [rec for rec in records if txn.delete(rec, db=h.dbs["errors"])]

    def _ids_in_txn(self, txn: Txn, h: EnvHandle, keys: Sequence[str], exc: type) -> np.ndarray:
        key_bytes = check_keys(keys, unique=False)
        out = np.empty(len(keys), dtype=np.uint64)
        for i, (key, kb) in enumerate(zip(keys, key_bytes, strict=True)):
            raw = txn.get(key_record(kb), db=h.dbs["key2id"])
            if raw is None:
                raise exc(f"key {shown(key)} is not in bank {self.bank.root}")
            out[i] = unpack_id(raw)
        return out

    def relabel(
        self,
        labels: Mapping[str, str | None] | None = None,
        splits: Mapping[str, str] | None = None,
    ) -> int:
        """Set labels and splits together in one transaction; returns how many items changed.

        Only the small rows records are rewritten: vectors stay where they are.
        Unknown keys raise InvalidInput naming the key, and nothing changes.
        """
        new_labels = {k: check_label(k, v) for k, v in (labels or {}).items()}
        new_splits = {k: check_split(k, v) for k, v in (splits or {}).items()}
        keys = list(dict.fromkeys([*new_labels, *new_splits]))
        check_keys(keys)
        if not keys:
            return 0

        def fn(txn: Txn, h: EnvHandle) -> int:
            loc = locate(txn, h, self._ids_in_txn(txn, h, keys, InvalidInput))
            new_codes = self._codes_for(txn, h, list(new_labels.values())).tolist()
            codes_of = dict(zip(new_labels, new_codes, strict=True))
            changed: list[np.ndarray] = []
            for b, (bkey, bids, codes, states) in enumerate(loc.blocks):
                sel = np.flatnonzero(loc.block == b)
                before_c, before_s = codes.copy(), states.copy()
                for i, row in zip(sel.tolist(), loc.row[sel].tolist(), strict=True):
                    key = keys[i]
                    if key in new_labels:
                        codes[row] = codes_of[key]
                    if key in new_splits:
                        states[row] = new_splits[key]
                diff = (codes != before_c) | (states != before_s)
                if diff.any():
                    txn.put(bkey, encode_rows(bids, codes, states), db=h.dbs["rows"])
                    changed.append(bids[diff])
            if not changed:
                return 0
            ids = np.sort(np.concatenate(changed))
            gen = commit_generation(txn, h, labels_changed=True)
            log_ids(txn, h, gen, _RELABELLED, ids)
            return len(ids)

        n: int = self._write(fn)
        return n

    def set_labels(self, mapping: Mapping[str, str | None]) -> int:
        """Relabel items (None = unlabelled) in one transaction; returns how many changed."""
        return self.relabel(labels=mapping)

    def set_splits(self, mapping: Mapping[str, str]) -> int:
        """Move items between train/val/test/none; returns how many changed."""
        return self.relabel(splits=mapping)

    def delete(self, keys: Iterable[str]) -> int:
        """Remove items from every read (space comes back with compact()); returns the count.

        Unknown keys raise NotFound and nothing is deleted.
        """
        unique = list(dict.fromkeys(keys))
        records = key_records(check_keys(unique))
        if not unique:
            return 0

        def fn(txn: Txn, h: EnvHandle) -> int:
            ids = self._ids_in_txn(txn, h, unique, NotFound)
            labelled = self._delete_in_txn(txn, h, ids, records)
            gen = commit_generation(txn, h, labels_changed=labelled)
            log_ids(txn, h, gen, _DELETED, np.sort(ids))
            return len(ids)

        n: int = self._write(fn)
        return n

    def _delete_in_txn(self, txn: Txn, h: EnvHandle, ids: np.ndarray, records: list[bytes]) -> bool:
        """Mark rows deleted and forget their keys; returns whether any was labelled."""
        loc = locate(txn, h, ids)
        labelled = False
        for b, (bkey, bids, codes, states) in enumerate(loc.blocks):
            rows = loc.row[loc.block == b]
            labelled |= bool((codes[rows] != NO_LABEL).any())
            states[rows] = DELETED
            txn.put(bkey, encode_rows(bids, codes, states), db=h.dbs["rows"])
        for rec in records:
            txn.delete(rec, db=h.dbs["key2id"])
        thumbs_db.drop(txn, h.dbs, ids)
        put_int(txn, h, "count", get_int(txn, h, "count") - len(ids))
        return labelled

    def set_meta(self, mapping: Mapping[str, Mapping[str, Any] | None], merge: bool = True) -> int:
        """Change items' user metadata without touching vectors; returns how many changed.

        `merge`: the given fields are set (None removes one) and the others kept; otherwise
        the user map is replaced. Unknown keys raise NotFound and nothing changes.
        """
        keys = list(mapping)
        check_keys(keys)
        updates = [metadata.check_user_meta(k, mapping[k]) for k in keys]
        if not keys:
            return 0

        def fn(txn: Txn, h: EnvHandle) -> int:
            ids = self._ids_in_txn(txn, h, keys, NotFound)
            changed = metadata.set_in_txn(txn, h, ids, updates, merge)
            if changed:
                gen = commit_generation(txn, h, labels_changed=False)
                log_ids(txn, h, gen, _META, np.unique(ids))  # what replicas on other hosts copy
            return changed

        n: int = self._write(fn)
        return n

    def item_table(self) -> Items:
        """Every live item's id, key, label, split and metadata, without vectors (for filters)."""
        sh = self._sh()
        with sh.read() as (txn, h):
            snap, sel, keys, metas = metadata.columns(txn, h)
            codes, states = snap.codes[sel], snap.states[sel]
            vocab = self._vocab(txn, h, np.unique(codes).tolist())
        return Items(
            ids=snap.ids[sel].astype(np.uint64),
            keys=keys,
            vectors=np.zeros((len(sel), 0), np.float32),
            labels=Lazy(lambda: labels_of_codes(codes, vocab)),
            splits=Lazy(lambda: _SPLIT_NAMES[states].tolist()),
            meta=metas,
        )

    # ---- errors ---------------------------------------------------------------------------

    def record_error(self, key: str, reason: str) -> None:
        """Remember an input that could not be embedded, so nothing is silently lost."""
        (kb,) = check_keys([key])
        value = json.dumps({"key": key, "reason": str(reason), "time": time.time()}).encode()

        def fn(txn: Txn, h: EnvHandle) -> None:
            txn.put(key_record(kb), value, db=h.dbs["errors"])
            log_errors(txn, h, commit_generation(txn, h, labels_changed=False), [key_record(kb)])

        self._write(fn)

    def errors(self) -> list[dict[str, Any]]:
        sh = self._sh()
        with sh.read() as (txn, h):
            return [json.loads(bytes(v)) for _, v in txn.cursor(db=h.dbs["errors"])]

    def clear_error(self, key: str) -> bool:
        """Forget a recorded error; returns whether there was one."""
        (kb,) = check_keys([key])

        def fn(txn: Txn, h: EnvHandle) -> bool:
            if not txn.delete(key_record(kb), db=h.dbs["errors"]):
                return False
            log_errors(txn, h, commit_generation(txn, h, labels_changed=False), [key_record(kb)])
            return True

        found: bool = self._write(fn)
        return found

    # ---- lookups --------------------------------------------------------------------------

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The keys not stored yet, in order (what a resumed job still has to embed)."""
        key_bytes = check_keys(keys, unique=False)
        sh = self._sh()
        with sh.read() as (txn, h):
            db = h.dbs["key2id"]
            return [
                k
                for k, kb in zip(keys, key_bytes, strict=True)
                if txn.get(key_record(kb), db=db) is None
            ]

    def has(self, key: str) -> bool:
        return not self.missing([key])

    def ids_of(self, keys: Sequence[str]) -> np.ndarray:
        sh = self._sh()
        with sh.read() as (txn, h):
            return self._ids_in_txn(txn, h, keys, NotFound)

    def get(self, ids: Any, dtype: Any = np.float32) -> Items:
        """Items by id, in the order given; NotFound names the first unknown or deleted id."""
        arr = as_ids(ids)
        sh = self._sh()
        with sh.read() as (txn, h):
            return self._get_in_txn(txn, h, arr, dtype)

    def vectors_of(self, ids: Any, dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, vectors of the found ids in the order given): only the vectors are
        read, for re-ranking search candidates (unknown and deleted ids are not found)."""
        with self._sh().read() as (txn, h):
            found, vectors = gather_vectors(txn, h, as_ids(ids), self.spec.dim, self._dtype)
        return found, vectors.astype(dtype, copy=False)  # one cast: float16's is per element

    def keys_of(self, ids: Any) -> dict[int, str]:
        """id -> key of the live ids among `ids` (unknown and deleted ids are left out).

        The lookup behind every search's hits: it reads only keys, no vectors or metadata.
        """
        arr = as_ids(ids)
        out: dict[int, str] = {}
        sh = self._sh()
        with sh.read() as (txn, h):
            loc = locate(txn, h, arr)
            for b, (bkey, *_) in enumerate(loc.blocks):
                positions = np.flatnonzero(loc.block == b)
                block = decode_keys(txn.get(bkey, db=h.dbs["keys"]))
                out.update(zip(arr[positions].tolist(), [block[r] for r in loc.row[positions]],
                               strict=True))
        return out

    def get_by_keys(self, keys: Sequence[str], dtype: Any = np.float32) -> Items:
        sh = self._sh()
        with sh.read() as (txn, h):
            return self._get_in_txn(txn, h, self._ids_in_txn(txn, h, keys, NotFound), dtype)

    def thumbnail_count(self) -> int:
        """How many live items keep a thumbnail (0: the bank keeps none)."""
        with self._sh().read() as (txn, h):
            return thumbs_db.count(txn, h.dbs)

    def thumbnails(self, keys: Sequence[str]) -> list[bytes | None]:
        """The JPEG thumbnail of each key (None where none was kept); NotFound for unknown keys."""
        sh = self._sh()
        with sh.read() as (txn, h):
            return thumbs_db.get(txn, h.dbs, self._ids_in_txn(txn, h, keys, NotFound))

    def _get_in_txn(self, txn: Txn, h: EnvHandle, ids: np.ndarray, dtype: Any) -> Items:
        loc = locate(txn, h, ids)
        if len(ids) and (loc.block < 0).any():
            bad = int(ids[np.flatnonzero(loc.block < 0)[0]])
            raise NotFound(f"id {bad} is not in bank {self.bank.root} (unknown or deleted)")
        picks = []
        codes = np.empty(len(ids), np.int32)
        states = np.empty(len(ids), np.uint8)
        for b, (bkey, _bids, bcodes, bstates) in enumerate(loc.blocks):
            positions = np.flatnonzero(loc.block == b)
            rows = loc.row[positions]
            codes[positions], states[positions] = bcodes[rows], bstates[rows]
            picks.append((bkey, rows, positions))
        return self._read_items(txn, h, ids, codes, states, picks, dtype)

    def _read_items(
        self,
        txn: Txn,
        h: EnvHandle,
        ids: np.ndarray,
        codes: np.ndarray,
        states: np.ndarray,
        picks: list[tuple[bytes, np.ndarray, np.ndarray]],
        dtype: Any,
        ordered: bool = False,
    ) -> Items:
        """Copy picked rows of whole blocks (np.frombuffer on the map) into one array.

        `ordered`: rows of each pick increase (scans in id order), so a pick as long as
        its block is the whole block. Keys, labels, splits and metadata are kept as raw
        bytes and codes, and decoded only if the caller reads them.
        """
        n, dim = len(ids), self.spec.dim
        vectors = np.empty((n, dim), dtype=dtype)
        parts: list[Part] = []
        for bkey, rows, positions in picks:
            block = np.frombuffer(txn.get(bkey, db=h.dbs["vectors"]), dtype=self._dtype)
            block = block.reshape(-1, dim)
            p0, k = int(positions[0]), len(positions)
            whole = k == len(block) and (ordered or np.array_equal(rows, np.arange(k)))
            whole = whole and positions[-1] - p0 == k - 1
            if whole:
                vectors[p0 : p0 + k] = block  # the common case in scans: the whole block
            else:
                vectors[positions] = block[rows]
            raw_keys = bytes(txn.get(bkey, db=h.dbs["keys"]))
            raw_meta = bytes(txn.get(bkey, db=h.dbs["meta"]))
            parts.append(Part(raw_keys, raw_meta, rows, positions, whole))
        vocab = self._vocab(txn, h, np.unique(codes).tolist())
        return Items(
            ids=ids.astype(np.uint64, copy=False),
            keys=Lazy(lambda: assemble_keys(n, parts)),
            vectors=vectors,
            labels=Lazy(lambda: labels_of_codes(codes, vocab)),
            splits=Lazy(lambda: _SPLIT_NAMES[states].tolist()),
            meta=Lazy(lambda: assemble_meta(n, parts)),
        )

    def _vocab(self, txn: Txn, h: EnvHandle, codes: Iterable[int]) -> dict[int, str]:
        """Code -> label, cached per process (codes never change meaning)."""
        cache = self._shared.vocab
        for code in set(codes) - cache.keys() - {NO_LABEL}:
            raw = txn.get(b"c" + int(code).to_bytes(4, "big"), db=h.dbs["vocab"])
            if raw is None:
                raise FailedPrecondition(f"label code {code} missing from {self.path}")
            cache[int(code)] = bytes(raw).decode()
        return cache

    def _decode_labels(self, txn: Txn, h: EnvHandle, codes: np.ndarray) -> list[str | None]:
        return labels_of_codes(codes, self._vocab(txn, h, np.unique(codes).tolist()))

    def labels_of(self, ids: Any) -> list[str | None]:
        """Labels of ids (None for unlabelled, deleted or unknown ids, e.g. FAISS's -1)."""
        arr = as_ids(ids)
        sh = self._sh()
        with sh.read() as (txn, h):
            loc = locate(txn, h, arr)
            codes = np.full(len(arr), NO_LABEL, np.int32)
            for b, (_key, _bids, bcodes, _states) in enumerate(loc.blocks):
                positions = np.flatnonzero(loc.block == b)
                codes[positions] = bcodes[loc.row[positions]]
            return self._decode_labels(txn, h, codes)

    # ---- scans ----------------------------------------------------------------------------

    def _plan(self, snap: Snapshot, split: str | None, labelled_only: bool, ids: Any) -> np.ndarray:
        if ids is None:
            return snap.select(split, labelled_only)
        want = as_ids(ids)
        pos = np.minimum(np.searchsorted(snap.ids, want), max(len(snap.ids) - 1, 0))
        if not len(snap.ids):
            bad_mask = np.ones(len(want), bool)
        else:
            bad_mask = (snap.ids[pos] != want) | (snap.states[pos] == DELETED)
        if bad_mask.any():
            bad = int(want[np.flatnonzero(bad_mask)[0]])
            raise NotFound(f"id {bad} is not in bank {self.bank.root} (unknown or deleted)")
        keep = np.ones(len(want), bool)
        if split is not None:
            keep &= snap.states[pos] == check_split("<filter>", split)
        if labelled_only:
            keep &= snap.codes[pos] != NO_LABEL
        return pos[keep]

    def _read_selection(
        self, txn: Txn, h: EnvHandle, snap: Snapshot, sel: np.ndarray, dtype: Any, ordered: bool
    ) -> Items:
        picks = []
        blocks = snap.block[sel]
        if len(sel):
            cuts = np.flatnonzero(np.diff(blocks)) + 1
            starts = np.concatenate([[0], cuts])
            ends = np.concatenate([cuts, [len(sel)]])
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
                positions = np.arange(s, e)
                picks.append((snap.block_keys[blocks[s]], snap.row[sel[s:e]], positions))
        return self._read_items(
            txn, h, snap.ids[sel], snap.codes[sel], snap.states[sel], picks, dtype, ordered
        )

    def to_numpy(
        self,
        split: str | None = None,
        labelled_only: bool = False,
        dtype: Any = np.float32,
        ids: Any = None,
    ) -> Items:
        """Every live item (or those filtered) in one array, from one consistent snapshot."""
        sh = self._sh()
        with sh.read() as (txn, h):
            snap = Snapshot(txn, h)
            sel = self._plan(snap, split, labelled_only, ids)
            return self._read_selection(txn, h, snap, sel, dtype, ordered=ids is None)

    def iter_batches(
        self,
        batch_size: int = 65536,
        split: str | None = None,
        labelled_only: bool = False,
        ids: Any = None,
        dtype: Any = np.float32,
    ) -> Iterator[Items]:
        """Scan in batches, all from the snapshot taken at the first batch.

        Each batch reads in its own short transaction (user code between batches never
        holds one); the snapshot stays valid because stored rows are never rewritten in
        place, and the environment read is kept open even if another process compacts.
        """
        if batch_size <= 0:
            raise InvalidInput(f"batch_size must be positive, got {batch_size}")
        sh = self._sh()
        with sh.read() as (txn, h):
            snap = Snapshot(txn, h)
            h.pins += 1
        try:
            sel = self._plan(snap, split, labelled_only, ids)
            for s in range(0, len(sel), batch_size):
                with sh.read(h) as (txn, _):
                    batch = self._read_selection(
                        txn, h, snap, sel[s : s + batch_size], dtype, ordered=ids is None
                    )
                yield batch  # outside the transaction: the caller's code may take long
        finally:
            h.pins -= 1

    def label_table(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(ids sorted, codes into the sorted vocabulary or -1, vocabulary) of all live items."""
        sh = self._sh()
        with sh.read() as (txn, h):
            snap = Snapshot(txn, h)
            live = snap.states != DELETED
            ids, raw = snap.ids[live], snap.codes[live]
            used = np.unique(raw[raw != NO_LABEL])
            vocab = self._vocab(txn, h, used.tolist())
        names = [vocab[int(c)] for c in used]
        order = np.argsort(np.array(names, dtype=object)) if names else np.zeros(0, np.int64)
        vocabulary = [names[i] for i in order]
        remap = np.full(int(used.max()) + 2 if len(used) else 1, NO_LABEL, np.int32)
        remap[used[order]] = np.arange(len(used), dtype=np.int32)
        codes = np.where(raw == NO_LABEL, NO_LABEL, remap[np.maximum(raw, 0)]).astype(np.int32)
        return ids, codes, vocabulary

    def backup(self, dest: str | Path) -> Path:
        """Copy the store into the new bank `dest` while writers go on (LMDB's hot copy).

        The copy is one consistent snapshot, compacted, and opens like any store.
        """
        target = Bank(dest).store_dir
        if target.exists():
            raise InvalidInput(f"backup target {target} already exists; choose a new folder")
        sh = self._sh()
        with sh.read() as (txn, h):  # the read pins the environment against compaction
            (target / h.name).mkdir(parents=True)
            h.env.copy(str(target / h.name), compact=True, txn=txn)
            name = h.name
        write_atomic(target / CURRENT, f"{name}\n".encode())
        return target

    def ids_in_split(self, split: str) -> np.ndarray:
        """Sorted ids of the live items in `split` (e.g. the held-out test items that never vote)."""
        sh = self._sh()
        with sh.read() as (txn, h):
            snap = Snapshot(txn, h)
            return np.sort(snap.ids[snap.select(split, labelled_only=False)])

    def label_vocabulary(self) -> list[str]:
        """Sorted labels that at least one live item carries."""
        return self.label_table()[2]

    def stats(self) -> dict[str, Any]:
        """Counts by label and split, errors, sizes and generations (for `store info`)."""
        sh = self._sh()
        with sh.read() as (txn, h):
            snap = Snapshot(txn, h)
            info = {n: get_int(txn, h, n) for n in ("generation", "labels_generation", "count")}
            n_errors = int(txn.stat(h.dbs["errors"])["entries"])
            live = snap.states != DELETED
            codes, counts = np.unique(snap.codes[live], return_counts=True)
            vocab = self._vocab(txn, h, codes.tolist())
            env_dir, map_size = h.path, h.map_size
        splits, split_counts = np.unique(snap.states[live], return_counts=True)
        by_label = {vocab[int(c)]: int(n) for c, n in zip(codes, counts, strict=True) if c >= 0}
        unlabelled = int(counts[codes == NO_LABEL].sum())
        return {
            "bank": str(self.bank.root),
            "path": str(self.path),
            "spec": self.spec.to_dict(),
            **info,
            "labelled": int(live.sum()) - unlabelled,
            "unlabelled": unlabelled,
            "labels": dict(sorted(by_label.items())),
            "splits": {SPLITS[int(s)]: int(n) for s, n in zip(splits, split_counts, strict=True)},
            "errors": n_errors,
            "deleted_pending_compact": int((~live).sum()),
            "blocks": len(snap.block_keys),
            "block_rows": self.block_rows,
            "vector_bytes": int(live.sum()) * self.spec.dim * self._dtype.itemsize,
            "size_bytes": (env_dir / "data.mdb").stat().st_size,
            "map_size": map_size,
        }

    def changes_since(self, generation: int) -> Changes:
        """Ids added, relabelled and deleted after `generation` (see `Changes`)."""
        if generation < 0:
            raise InvalidInput(f"generation must be >= 0, got {generation}")
        parts: dict[bytes, list[np.ndarray]] = {_ADDED: [], _RELABELLED: [], _DELETED: []}
        sh = self._sh()
        with sh.read() as (txn, h):
            check_reaches(txn, h, generation, self.bank.root)
            current = get_int(txn, h, "generation")
            cur = txn.cursor(db=h.dbs["log"])
            if cur.set_range(pack_id(generation + 1)):
                for k, v in cur:
                    kind = bytes(k)[8:]
                    if kind in parts:  # metadata changes (_META) move no index row
                        parts[kind].append(np.frombuffer(v, dtype="<u8").copy())
        added, relabelled, deleted = (
            np.unique(np.concatenate(parts[kind])) if parts[kind] else np.zeros(0, np.uint64)
            for kind in (_ADDED, _RELABELLED, _DELETED)
        )
        return Changes(
            added=np.setdiff1d(added, deleted).astype(np.uint64),
            relabelled=np.setdiff1d(relabelled, np.union1d(added, deleted)).astype(np.uint64),
            deleted=np.setdiff1d(deleted, added).astype(np.uint64),
            generation=current,
        )

    # ---- compaction -----------------------------------------------------------------------

    def compact(self) -> None:
        """Rewrite the live items into a fresh environment and switch to it atomically.

        Readers in other processes keep reading the old environment until their next
        call; a crash before the switch leaves the old one live and the new one is
        removed by the next writer.
        """
        from featurebank.store import compact

        self.acquire_writer()
        sh = self._sh()
        sh.require_writer()
        with sh.lock:
            compact.compact(sh, self.block_rows, self.spec.dim * self._dtype.itemsize)


BankLike: TypeAlias = "str | os.PathLike[str] | Bank | Store"
"""What library functions take for a bank: a path, its Bank, or an open Store (the handle)."""
