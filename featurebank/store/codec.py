"""Byte layouts of the store's records and the checks run before anything is written.

Vectors are packed in blocks of up to `block_rows` rows keyed by the block's
first id (big-endian, so appends are sorted), because one LMDB record per
vector wastes a 4 KiB page on a 2.5 KiB vector. Each block has four parallel
records in four sub-databases, all keyed the same:

- ``vectors``: ``n * dim`` values of the spec's dtype (only written, never changed);
- ``rows``: per row a packed (uint64 id, int32 label code or -1, uint8 state = split
  code or DELETED) -- the only record relabelling, re-splitting or deleting
  rewrites, 13 bytes per row;
- ``keys``: the rows' keys, NUL-separated; ``meta``: their metadata as a JSON list.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from featurebank.core.errors import InvalidInput, SpecMismatch, shown
from featurebank.core.spec import Spec
from featurebank.core.vocabulary import SPLITS

SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
DELETED = 255
NO_LABEL = -1
# One packed row per item, so all blocks' rows decode with one np.frombuffer.
ROW_DTYPE = np.dtype([("id", "<u8"), ("code", "<i4"), ("state", "u1")])
_MAX_KEY_BYTES = 480  # LMDB keys are limited to 511 bytes; longer keys are stored hashed
MAX_LABEL_BYTES = 400  # labels are LMDB keys of the vocabulary
_BE64 = struct.Struct(">Q")


def pack_id(i: int) -> bytes:
    """Big-endian so LMDB's byte order is numeric order and appends stay sorted."""
    return _BE64.pack(i)


def pack_ids(ids: np.ndarray) -> list[bytes]:
    be = np.asarray(ids, dtype=">u8").tobytes()
    return [be[i : i + 8] for i in range(0, len(be), 8)]


def unpack_id(b: bytes | memoryview) -> int:
    return int(_BE64.unpack(bytes(b))[0])


def key_records(keys_utf8: list[bytes]) -> list[bytes]:
    """key_record of each key, without a Python call per key when all are short."""
    if not keys_utf8 or max(map(len, keys_utf8)) <= _MAX_KEY_BYTES:
        return keys_utf8
    return [key_record(k) for k in keys_utf8]


def key_record(key_utf8: bytes) -> bytes:
    """The key2id record key: the key itself, or a hash for keys LMDB cannot hold.

    0xFF never starts valid UTF-8, so hashed keys cannot collide with plain ones.
    """
    if len(key_utf8) <= _MAX_KEY_BYTES:
        return key_utf8
    return b"\xff" + hashlib.sha256(key_utf8).digest()


def default_block_rows(dim: int, itemsize: int) -> int:
    """About 256 KiB of vectors per block: big enough to waste <1% of a page, small to rewrite."""
    return int(min(4096, max(16, (256 * 1024) // max(1, dim * itemsize))))


# ---- block records -------------------------------------------------------------------------


def encode_rows(ids: np.ndarray, codes: np.ndarray, states: np.ndarray) -> bytes:
    rows = np.empty(len(ids), ROW_DTYPE)
    rows["id"], rows["code"], rows["state"] = ids, codes, states
    return rows.tobytes()


def decode_rows(buf: bytes | bytearray | memoryview) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views (not copies) of a rows record: ids, label codes, states."""
    rows = np.frombuffer(buf, dtype=ROW_DTYPE)
    return rows["id"], rows["code"], rows["state"]


def encode_keys(keys: Sequence[str]) -> bytes:
    """NUL-separated UTF-8: one C-level split decodes a whole block (keys may not hold NUL)."""
    return "\0".join(keys).encode("utf-8")


def decode_keys(buf: bytes | memoryview) -> list[str]:
    return bytes(buf).decode("utf-8").split("\0")


def encode_json_list(values: Sequence[Any]) -> bytes:
    first = values[0] if len(values) else None
    if all(v is first for v in values):  # e.g. the same {"added": t} for a whole batch
        one = json.dumps(first, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return b"[" + b",".join([one] * len(values)) + b"]"
    return json.dumps(list(values), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode_json_list(buf: bytes | memoryview) -> list[Any]:
    out: list[Any] = json.loads(bytes(buf))
    return out


# ---- input checks (run before any transaction, so a bad batch commits nothing) -------------


def check_keys(keys: Sequence[str], *, unique: bool = True) -> list[bytes]:
    """UTF-8 bytes of each key; empty, non-str, non-UTF-8 or repeated keys are refused."""
    if isinstance(keys, (str, bytes)):
        raise InvalidInput("keys must be a sequence of str, not a single str")
    fast = _check_keys_fast(keys, unique)
    if fast is not None:
        return fast
    out: list[bytes] = []
    seen: set[str] = set()
    for i, key in enumerate(keys):
        if not isinstance(key, str):
            raise InvalidInput(f"key #{i} must be str, got {type(key).__name__}: {shown(key)}")
        if not key:
            raise InvalidInput(f"key #{i} is empty")
        if "\0" in key:
            raise InvalidInput(f"key {shown(key)} (#{i}) contains a NUL character")
        try:
            out.append(key.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise InvalidInput(f"key {shown(key)} (#{i}) is not valid UTF-8: {e.reason}") from None
        if unique:
            if key in seen:
                raise InvalidInput(f"key {shown(key)} appears twice in the batch")
            seen.add(key)
    return out


def _check_keys_fast(keys: Sequence[str], unique: bool) -> list[bytes] | None:
    """The common all-good batch checked and encoded in a few C-level passes; None sends
    anything unusual to the loop above, which names the offending key."""
    if not all(type(k) is str for k in keys) or "" in keys:
        return None
    joined = "\0".join(keys)
    if joined.count("\0") != len(keys) - 1 or (unique and len(set(keys)) != len(keys)):
        return None
    try:
        return joined.encode("utf-8").split(b"\0") if keys else []
    except UnicodeEncodeError:
        return None


def check_vectors(keys: Sequence[str], vectors: Any, spec: Spec) -> np.ndarray:
    """The batch as a C-contiguous array of the spec's dtype, or a clear refusal."""
    if not isinstance(vectors, np.ndarray):
        raise InvalidInput(f"vectors must be a numpy array, got {type(vectors).__name__}")
    if vectors.ndim == 1 and len(keys) == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2:
        raise SpecMismatch(
            f"vectors must be 2-D (n, {spec.dim}), got shape {vectors.shape}; "
            f"bank spec is [{spec.describe()}]"
        )
    if vectors.shape[0] != len(keys):
        raise InvalidInput(f"{vectors.shape[0]} vectors for {len(keys)} keys")
    first = f" (first key {shown(keys[0])})" if len(keys) else ""
    if vectors.shape[1] != spec.dim:
        raise SpecMismatch(
            f"vectors have dimension {vectors.shape[1]}{first} but the bank's "
            f"spec has dim={spec.dim}: bank is [{spec.describe()}]"
        )
    if vectors.dtype.kind != "f":
        raise SpecMismatch(
            f"vectors have dtype {vectors.dtype}{first} but the bank's spec "
            f"stores {spec.dtype}: bank is [{spec.describe()}]"
        )
    with np.errstate(over="ignore"):  # overflow to inf is reported below, naming the key
        out = np.ascontiguousarray(vectors, dtype=spec.dtype)
    if not _all_finite(out):
        row = int(np.flatnonzero(~np.isfinite(out).all(axis=1))[0])
        why = "NaN or inf" if not np.isfinite(vectors[row]).all() else f"beyond {spec.dtype} range"
        raise InvalidInput(f"vector for key {shown(keys[row])} (#{row}) has {why} values")
    return out


def _all_finite(a: np.ndarray) -> bool:
    """Fast path for float16, where np.isfinite converts: inf/NaN have all exponent bits set.

    Two plain reductions, no temporaries: as int16 a positive inf/NaN is >= 0x7C00, and as
    uint16 a negative one is >= 0xFC00 (every other negative value sorts below it).
    """
    if a.dtype == np.float16:
        if not a.size:
            return True
        return int(a.view(np.int16).max()) < 0x7C00 and int(a.view(np.uint16).max()) < 0xFC00
    return bool(np.isfinite(a).all())


def check_label(key: str, label: Any) -> str | None:
    if label is None:
        return None
    if not isinstance(label, str):
        raise InvalidInput(f"label for key {shown(key)} must be str or None, got {shown(label)}")
    if not label:
        raise InvalidInput(f"label for key {shown(key)} is empty (use None for unlabelled)")
    try:
        size = len(label.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput(f"label for key {shown(key)} is not valid UTF-8: {shown(label)}") from None
    if size > MAX_LABEL_BYTES:
        raise InvalidInput(f"label for key {shown(key)} is longer than {MAX_LABEL_BYTES} bytes")
    return label


def check_split(key: str, split: Any) -> int:
    code = SPLIT_CODES.get(split) if isinstance(split, str) else None
    if code is None:
        raise InvalidInput(f"split for key {shown(key)} must be one of {SPLITS}, got {shown(split)}")
    return code


def check_metas(
    keys: Sequence[str], meta: Sequence[Any] | None, added: float
) -> list[dict[str, Any]]:
    """JSON-safe copies of the items' metadata, with the time they were added.

    The whole batch is encoded once (fast); only if that fails is each item tried,
    to name the key at fault.
    """
    if meta is None:
        return [{"added": added}] * len(keys)
    out: list[dict[str, Any]] = []
    for key, m in zip(keys, meta, strict=True):
        if m is not None and not isinstance(m, dict):
            raise InvalidInput(f"meta for key {shown(key)} must be a dict, got {type(m).__name__}")
        out.append({"added": added, **(m or {})})
    try:
        _to_json(out)
    except (TypeError, ValueError, UnicodeEncodeError):
        for key, m in zip(keys, out, strict=True):
            try:
                _to_json(m)
            except (TypeError, ValueError, UnicodeEncodeError) as e:
                raise InvalidInput(f"meta for key {shown(key)} is not JSON-serialisable: {e}") from None
        raise
    return out


def _to_json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")


def check_lengths(keys: Sequence[str], name: str, values: Sequence[Any] | None) -> None:
    if values is not None and len(values) != len(keys):
        raise InvalidInput(f"{len(values)} {name} for {len(keys)} keys")
