"""Thumbnails: one small JPEG per item, in the store's `thumbs` sub-database.

Why in the store: a page that shows neighbours cannot rely on reaching the items'
source paths (another machine, a bucket, a deleted folder), and a thumbnail is a
few kilobytes beside a vector that is already there. Records are keyed by the
item's id (big-endian, so sorted like every other record), written in the same
transaction as the item and removed with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from featurebank.core.errors import InvalidInput
from featurebank.store.codec import pack_ids

DB = "thumbs"
MAX_BYTES = 64 << 10
JPEG_MAGIC = b"\xff\xd8\xff"


def check_thumbnails(keys: Sequence[str], thumbs: Sequence[bytes | None]) -> None:
    """Each thumbnail is None or a JPEG of at most MAX_BYTES."""
    if len(thumbs) != len(keys):
        raise InvalidInput(f"{len(thumbs)} thumbnails for {len(keys)} keys")
    for key, t in zip(keys, thumbs, strict=True):
        if t is None:
            continue
        if not isinstance(t, bytes | bytearray | memoryview):
            raise InvalidInput(f"thumbnail of key {key!r} is {type(t).__name__}, not bytes")
        if not bytes(t[:3]) == JPEG_MAGIC:
            raise InvalidInput(f"thumbnail of key {key!r} is not a JPEG")
        if len(t) > MAX_BYTES:
            raise InvalidInput(
                f"thumbnail of key {key!r} has {len(t)} bytes; at most {MAX_BYTES}"
            )


def put(txn: Any, dbs: dict[str, Any], ids: np.ndarray, thumbs: Sequence[bytes | None]) -> None:
    """Store the thumbnails of new ids (appended: new ids are above every stored one)."""
    pairs = [(k, bytes(t)) for k, t in zip(pack_ids(ids), thumbs, strict=True) if t is not None]
    if pairs:
        txn.cursor(db=dbs[DB]).putmulti(pairs, append=True)


def drop(txn: Any, dbs: dict[str, Any], ids: np.ndarray) -> None:
    """Remove the thumbnails of deleted ids (free when the bank keeps none)."""
    if not count(txn, dbs):
        return
    for k in pack_ids(ids):
        txn.delete(k, db=dbs[DB])


def count(txn: Any, dbs: dict[str, Any]) -> int:
    """Items that keep a thumbnail."""
    return int(txn.stat(dbs[DB])["entries"])


def get(txn: Any, dbs: dict[str, Any], ids: np.ndarray) -> list[bytes | None]:
    out: list[bytes | None] = []
    for k in pack_ids(ids):
        raw = txn.get(k, db=dbs[DB])
        out.append(None if raw is None else bytes(raw))
    return out
