"""The reading half of a salvage, run as a child process: what a damaged store still holds.

`store.salvage` runs `python -m featurebank.store.salvage_read STORE_DIR NEW_ENV REPORT`,
so even a crash while reading damaged files is contained in this process; the reading
itself never maps a file (see `store.pages`). Every environment in store/ is read, the one
CURRENT names first (its last commit, then the one before), then older ones (a compaction
interrupted before it switched leaves one); an item is taken from the first that still
holds it. Records no tree points at any more (under a lost branch page) are found by
scanning the file's leaf pages and judged by their content. The items are written by the
compaction's writers into NEW_ENV, which gets one more commit than any it was read from:
the lost ids logged as deleted, so indexes and followers drop them. The report (JSON) says
what was recovered and what was not.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurebank.store.codec import (
    DELETED,
    ROW_DTYPE,
    decode_json_list,
    decode_rows,
    default_block_rows,
    encode_json_list,
    encode_keys,
    encode_rows,
    key_record,
    pack_id,
    unpack_id,
)
from featurebank.store.env import CURRENT, ENV_PREFIX, INITIAL_MAP_SIZE, EnvHandle
from featurebank.store.pages import Environment, read_environment, scan_leaves

_INFO_NAMES = (
    b"spec", b"format", b"block_rows", b"generation", b"labels_generation", b"count",
    b"next_id", b"next_code",
)  # fmt: skip
_LOG_KINDS = (b"a", b"r", b"d")
_DB_NAMES = ("info", "vocab", "log", "key2id", "vectors", "rows", "keys", "meta", "errors", "thumbs")
SHOWN = 20  # lost ids and keys listed in the report; the counts are always exact


@dataclass
class Row:
    """One live item as salvaged."""

    vector: bytes
    code: int
    state: int
    key: str
    meta: Any  # None: its metadata record is lost (it is salvaged without)


@dataclass
class Source:
    """What one environment still holds, as records of each database."""

    name: str
    tree: Environment
    db: dict[str, dict[bytes, bytes]] = field(default_factory=dict)
    scanned: dict[str, dict[bytes, list[bytes]]] = field(default_factory=dict)

    def int(self, name: bytes) -> int | None:
        raw = self.db["info"].get(name)
        return int.from_bytes(raw, "big") if raw is not None and len(raw) == 8 else None


def environments(store_dir: Path) -> list[str]:
    """The environment folders of a store (env-<n>), oldest first."""
    return sorted(
        (p.name for p in store_dir.glob(ENV_PREFIX + "*")
         if p.is_dir() and p.name[len(ENV_PREFIX):].isdigit()),
        key=lambda n: int(n[len(ENV_PREFIX):]),
    )  # fmt: skip


def _read_sources(store_dir: Path) -> list[Source]:
    try:
        live = (store_dir / CURRENT).read_text(errors="replace").strip()
    except OSError:
        live = ""
    sources = []
    for name in environments(store_dir):
        data = store_dir / name / "data.mdb"
        scanned: dict[str, dict[bytes, list[bytes]]] | None = None
        for n, tree in enumerate(read_environment(data)):
            src = Source(name if n == 0 else f"{name} (its previous commit)", tree,
                         {n: dict(db.records) for n, db in tree.databases.items()})  # fmt: skip
            for db in _DB_NAMES:
                src.db.setdefault(db, {})
            if tree.problem is None and (any(db.lost for db in tree.databases.values())
                                         or "rows" not in tree.databases):  # fmt: skip
                scanned = scanned if scanned is not None else _classify(scan_leaves(data))
                src.scanned = scanned
                for db in ("info", "vocab", "log", "key2id"):
                    for k, values in scanned.get(db, {}).items():
                        src.db[db].setdefault(k, values[-1])
            sources.append(src)
    # the environment CURRENT names first (its last commit, then the one before), then the
    # others by their newest commit
    return sorted(sources, key=lambda s: (s.name.split()[0] != live, -(s.int(b"generation") or 0)))


def _classify(records: list[tuple[bytes, bytes]]) -> dict[str, dict[bytes, list[bytes]]]:
    """Which database a record found outside any tree belongs to, by its key's shape.

    Block keys are 8-byte big-endian ids and log keys a generation and a kind (both start
    with NUL, which user keys cannot hold); vocabulary keys are 'c'+code or 'l'+label.
    """
    out: dict[str, dict[bytes, list[bytes]]] = {}

    def add(db: str, k: bytes, v: bytes) -> None:
        out.setdefault(db, {}).setdefault(k, []).append(v)

    for k, v in records:
        if len(k) == 8 and k[0] == 0:
            add("block", k, v)
        elif len(k) == 9 and k[0] == 0 and k[8:] in _LOG_KINDS:
            add("log", k, v)
        elif k in _INFO_NAMES:
            add("info", k, v)
        elif (k[:1] == b"c" and len(k) == 5 and b"\0" in k) or (k[:1] == b"l" and len(v) == 4):
            add("vocab", k, v)
        elif len(v) == 8 and b"\0" not in k:
            add("key2id", k, v)
    return out


def _block_rows(
    src: Source, key: bytes, row_bytes: int, key_of: dict[int, str]
) -> list[tuple[int, Row | None]] | None:
    """The rows of one block: (id, item) for live rows, item None when it is unreadable.
    A lost keys record is made good from the key table (`key_of`: id -> key)."""
    first = unpack_id(key)
    rows = _rows_of(src.db["rows"].get(key), first)
    scanned = src.scanned.get("block", {}).get(key, [])
    if rows is None:
        candidates = [r for r in (_rows_of(v, first) for v in scanned) if r is not None]
        if not candidates:
            return None
        # deletes are final and blocks only grow, so the newest version has the most of both
        rows = max(candidates, key=lambda r: (len(r[0]), int((r[2] == DELETED).sum())))
    ids, codes, states = rows
    n = len(ids)
    vectors = _pick(src.db["vectors"].get(key), scanned, lambda v: len(v) == n * row_bytes)
    keys = _pick(src.db["keys"].get(key), scanned, lambda v: _keys_of(v, n) is not None)
    meta = _pick(src.db["meta"].get(key), scanned, lambda v: _meta_of(v, n) is not None)
    names = _keys_of(keys, n) if keys is not None else None
    metas = _meta_of(meta, n) if meta is not None else None
    out: list[tuple[int, Row | None]] = []
    for i in range(n):
        if states[i] == DELETED:
            continue
        name = names[i] if names is not None else key_of.get(int(ids[i]))
        if vectors is None or name is None:
            out.append((int(ids[i]), None))
            continue
        out.append((int(ids[i]), Row(
            vectors[i * row_bytes : (i + 1) * row_bytes], int(codes[i]), int(states[i]), name,
            metas[i] if metas is not None else None,
        )))  # fmt: skip
    return out


def _rows_of(value: bytes | None, first: int) -> tuple[np.ndarray, ...] | None:
    if value is None or not value or len(value) % ROW_DTYPE.itemsize:
        return None
    ids, codes, states = decode_rows(value)
    if int(ids[0]) != first or (len(ids) > 1 and (np.diff(ids.astype(np.int64)) <= 0).any()):
        return None
    return ids, codes, states


def _pick(value: bytes | None, scanned: list[bytes], fits: Any) -> bytes | None:
    if value is not None and fits(value):
        return value
    return next((v for v in scanned if fits(v)), None)


def _keys_of(value: bytes, n: int) -> list[str] | None:
    try:
        keys = value.decode("utf-8").split("\0")
    except UnicodeDecodeError:
        return None
    if len(keys) != n or not all(k and k.isprintable() for k in keys):
        return None
    return keys


def _meta_of(value: bytes, n: int) -> list[Any] | None:
    if value[:1] != b"[":
        return None
    try:
        meta = decode_json_list(value)
    except ValueError:
        return None
    return meta if len(meta) == n else None


def assemble(store_dir: Path) -> tuple[list[Source], dict[str, Any], dict[int, Row], dict[int, str]]:
    """Read every environment; returns the sources, the spec, the items and known lost keys."""
    sources = _read_sources(store_dir)
    spec = next((_json(s.db["info"][b"spec"]) for s in sources if b"spec" in s.db["info"]), None)
    spec = spec or _spec_from_manifests(store_dir.parent)
    items: dict[int, Row] = {}
    unreadable: set[int] = set()
    deleted = _logged(sources, b"d")
    if spec is None:
        return sources, {}, items, {}
    row_bytes = int(spec["dim"]) * np.dtype(spec["dtype"]).itemsize
    mapped = _complete_key_map(sources[0]) if sources else None  # the newest commit's keys
    key_of: dict[int, str] = {}
    for src in reversed(sources):  # the newest commit's mapping wins
        for k, v in src.db["key2id"].items():
            if len(v) == 8 and k[:1] != b"\xff":  # 0xFF: a long key, stored hashed
                with contextlib.suppress(UnicodeDecodeError):
                    key_of[unpack_id(v)] = k.decode()
    for src in sources:
        keys = set(src.db["rows"]) | set(src.scanned.get("block", {}))
        for key in sorted(keys):
            for i, row in _block_rows(src, key, row_bytes, key_of) or ():
                if i in items or i in deleted:  # ids are never reused: a logged delete is final
                    continue
                if row is not None and mapped is not None and mapped.get(row.key) != i:
                    continue  # its key no longer names it: deleted or replaced since
                if row is None:
                    unreadable.add(i)
                else:
                    items[i] = row
    lost_keys = {i: k for i, k in key_of.items() if i not in items and i not in deleted}
    lost_keys.update((i, "") for i in unreadable - deleted - set(items) - set(lost_keys))
    return sources, spec, items, lost_keys


def _complete_key_map(src: Source) -> dict[str, int] | None:
    """key -> id from an environment's key table when it was read whole (None otherwise)."""
    table = src.tree.databases.get("key2id")
    if table is None or table.lost or len(table.records) != table.entries:
        return None
    return {k.decode(errors="replace"): unpack_id(v) for k, v in table.records.items()}


def _json(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) and "dim" in value and "dtype" in value else None


def _manifests(bank_root: Path) -> Iterator[dict[str, Any]]:
    """The index and head manifests still readable, newest first (each records the spec
    and the store generation it covered)."""
    for path in sorted(bank_root.glob("[ih]*/*/manifest.json"), key=lambda p: -p.stat().st_mtime):
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict):
            yield manifest


def _spec_from_manifests(bank_root: Path) -> dict[str, Any] | None:
    for manifest in _manifests(bank_root):
        spec = manifest.get("spec")
        if isinstance(spec, dict) and _json(json.dumps(spec).encode()):
            return spec
    return None


def _logged(sources: list[Source], kind: bytes) -> set[int]:
    """The ids the change logs record as added (b"a") or deleted (b"d")."""
    return {int(i) for s in sources for k, v in s.db["log"].items()
            if k[8:] == kind and len(v) % 8 == 0 for i in np.frombuffer(v, "<u8")}  # fmt: skip


def run_child(store_dir: Path, new: str, report_path: Path) -> None:
    """Read every environment of `store_dir`, write the salvaged items into `new`."""
    sources, spec, items, lost_keys = assemble(store_dir)
    info = sources[0].tree.databases.get("info") if sources else None
    raw = info.records.get(b"count") if info is not None else None  # as last committed, not a stale copy
    count = int.from_bytes(raw, "big") if raw is not None and len(raw) == 8 else None
    expected = _logged(sources, b"a") - _logged(sources, b"d")  # what the logs say is live
    lost = sorted((expected | set(lost_keys)) - set(items))
    problems = [f"{s.name}: {s.tree.problem}" for s in sources if s.tree.problem]
    problems += [
        f"{s.name}: {sum(db.damaged_pages for db in s.tree.databases.values())} damaged pages"
        for s in sources if any(db.damaged_pages for db in s.tree.databases.values())
    ]  # fmt: skip
    report: dict[str, Any] = {
        "environments": [s.name for s in sources],
        "problems": problems,
        "recovered": len(items),
        "counted": count,  # what the store's own counter said, where it was readable
        "lost": len(lost) if expected or lost_keys else None,  # None: the logs are gone too
        "lost_ids": lost[:SHOWN],
        "lost_keys": [lost_keys[i] for i in lost if lost_keys.get(i)][:SHOWN],
        "without_meta": sorted(i for i, row in items.items() if row.meta is None),
        "spec_lost": not spec,
        "new_environment": new,
    }
    if items and spec:
        report["generation"] = _write(store_dir / new, sources, spec, items, lost)
    report_path.write_text(json.dumps(report, indent=1))


def _write(path: Path, sources: list[Source], spec: dict[str, Any], items: dict[int, Row],
           lost: list[int]) -> int:  # fmt: skip
    """The fresh environment: blocks re-packed from the items, the tables rebuilt from them."""
    from featurebank.store.compact import write_blocks, write_chunks

    dtype = np.dtype(spec["dtype"])
    block_rows = next((s.int(b"block_rows") for s in sources if s.int(b"block_rows")), None)
    block_rows = block_rows or default_block_rows(int(spec["dim"]), dtype.itemsize)
    ids = sorted(items)
    covered = [m.get("store_generation") for m in _manifests(path.parent.parent)]
    gen = max([s.int(b"generation") or 0 for s in sources]
              + [unpack_id(k[:8]) for s in sources for k in s.db["log"]]
              + [g for g in covered if isinstance(g, int)]) + 1  # never behind what was derived  # fmt: skip
    log = {k: v for s in reversed(sources) for k, v in s.db["log"].items() if len(v) % 8 == 0}
    logged = _logged(sources, b"a")
    unlogged = np.array([i for i in ids if i not in logged], dtype="<u8")
    if unlogged.size:
        log[pack_id(gen) + b"a"] = unlogged.tobytes()
    if lost:
        log[pack_id(gen) + b"d"] = np.array(lost, dtype="<u8").tobytes()
    vocab = {k: v for s in reversed(sources) for k, v in s.db["vocab"].items()}
    codes = [int.from_bytes(k[1:], "big") for k in vocab if k[:1] == b"c"]
    numbers: dict[bytes, int] = {
        b"format": next((f for s in sources if (f := s.int(b"format"))), 1),
        b"block_rows": block_rows,
        b"generation": gen,
        b"labels_generation": gen,
        b"count": len(ids),
        b"next_id": max([ids[-1] + 1, *[s.int(b"next_id") or 0 for s in sources]]),
        b"next_code": max([max(codes, default=-1) + 1, *[s.int(b"next_code") or 0 for s in sources]]),
    }
    info = {b"spec": json.dumps(spec).encode()}
    info.update((k, v.to_bytes(8, "big")) for k, v in numbers.items())
    key2id = {key_record(items[i].key.encode()): pack_id(i) for i in ids}
    new = EnvHandle(path, create=True, map_size=INITIAL_MAP_SIZE)
    try:
        tables = {"info": info, "vocab": vocab, "log": log, "key2id": key2id,
                  "errors": sources[0].db["errors"], "thumbs": sources[0].db["thumbs"]}  # fmt: skip
        for db, records in tables.items():
            write_chunks(new, db, iter(sorted(records.items())))
        write_blocks(new, _blocks(items, ids, block_rows))
        new.env.sync(True)
    finally:
        new.close()
    return gen


def _blocks(items: dict[int, Row], ids: list[int], block_rows: int) -> Iterator[tuple[bytes, dict[str, bytes]]]:
    for s in range(0, len(ids), block_rows):
        part = ids[s : s + block_rows]
        rows = [items[i] for i in part]
        yield pack_id(part[0]), {
            "vectors": b"".join(r.vector for r in rows),
            "rows": encode_rows(np.array(part, np.uint64), np.array([r.code for r in rows], np.int32),
                                np.array([r.state for r in rows], np.uint8)),  # fmt: skip
            "keys": encode_keys([r.key for r in rows]),
            "meta": encode_json_list([r.meta or {} for r in rows]),
        }


if __name__ == "__main__":
    run_child(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
