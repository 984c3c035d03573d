"""Read an LMDB data file page by page with plain reads, to salvage what a damage left.

LMDB maps its file and trusts every page number it finds: in a truncated file a page
beyond the end kills the process with SIGBUS, and a zeroed or overwritten page sends it
after garbage. This reader never maps the file: each page is read with `pread`, checked
(its own page number, its kind, offsets inside the page) and skipped when wrong, so a
damaged subtree costs only the records under it, and the key range they covered is
reported. The layout is LMDB's 64-bit one (lmdb's mdb.c: MDB_page, MDB_node, MDB_db,
MDB_meta); databases are plain (no duplicate keys), as the store creates them.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from featurebank.store.header import META_MAGIC

_PAGE_HEADER = 16
_P_BRANCH, _P_LEAF, _P_OVERFLOW = 0x01, 0x02, 0x04
_F_BIGDATA, _F_SUBDATA = 0x01, 0x02
_NODE = 8
_DB = struct.Struct("<IHHQQQQQ")  # MDB_db: pad, flags, depth, branch, leaf, overflow, entries, root
_NO_PAGE = 0xFFFFFFFFFFFFFFFF  # P_INVALID: an empty database's root
_MAX_DEPTH = 32
_MAX_VALUE = 1 << 31  # a bigger record is a damaged size field, not a value


@dataclass
class Database:
    """What could be read of one named database: its records, and what was lost."""

    records: dict[bytes, bytes] = field(default_factory=dict)
    entries: int = 0  # how many records its header says it holds
    lost: list[tuple[bytes | None, bytes | None]] = field(default_factory=list)  # key ranges [lo, hi)
    damaged_pages: int = 0


@dataclass
class Environment:
    """One data file as salvaged: each named database, and why anything is missing."""

    path: Path
    txnid: int = 0
    databases: dict[str, Database] = field(default_factory=dict)
    problem: str | None = None  # set when nothing at all could be read


class _File:
    def __init__(self, fd: int, psize: int, size: int) -> None:
        self.fd, self.psize, self.size = fd, psize, size

    def page(self, pgno: int) -> bytes | None:
        """Page `pgno` if it lies inside the file and says it is that page."""
        if pgno <= 1 or (pgno + 1) * self.psize > self.size:
            return None
        buf = os.pread(self.fd, self.psize, pgno * self.psize)
        if len(buf) < self.psize or struct.unpack_from("<Q", buf)[0] != pgno:
            return None
        return buf

    def overflow(self, pgno: int, length: int) -> bytes | None:
        first = self.page(pgno)
        if first is None or not struct.unpack_from("<H", first, 10)[0] & _P_OVERFLOW:
            return None
        pages = struct.unpack_from("<I", first, 12)[0]
        if length > pages * self.psize - _PAGE_HEADER or (pgno + pages) * self.psize > self.size:
            return None
        data = os.pread(self.fd, length, pgno * self.psize + _PAGE_HEADER)
        return data if len(data) == length else None


def read_environment(path: Path) -> list[Environment]:
    """Every record still readable in `path` (an LMDB data file) as of each of its two
    commits (LMDB keeps the previous one intact until the next), newest first."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return [Environment(path, problem=f"{path} cannot be read ({e.strerror})")]
    try:
        size = os.fstat(fd).st_size
        metas = _metas(fd)
        if not metas:
            return [Environment(path, problem=f"{path} has no valid LMDB header (both meta pages are damaged)")]
        out = []
        for psize, txnid, main in metas:
            env = Environment(path, txnid)
            _read_all(_File(fd, psize, size), main, env)
            out.append(env)
        return out
    finally:
        os.close(fd)


def _metas(fd: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """The valid meta pages as (page size, transaction id, main database), newest first."""
    first = os.pread(fd, 4096, 0)
    if len(first) < 160:
        return []
    psize = struct.unpack_from("<I", first, _PAGE_HEADER + 24)[0]  # kept in the free db's pad
    out = []
    for offset in {0, psize} if 512 <= psize <= 1 << 16 else {0}:
        buf = os.pread(fd, 160, offset)
        if len(buf) < 152 or struct.unpack_from("<I", buf, _PAGE_HEADER)[0] != META_MAGIC:
            continue
        own_psize = struct.unpack_from("<I", buf, _PAGE_HEADER + 24)[0]
        if not 512 <= own_psize <= 1 << 16:
            continue
        main = _DB.unpack_from(buf, _PAGE_HEADER + 24 + _DB.size)
        txnid = struct.unpack_from("<Q", buf, _PAGE_HEADER + 128)[0]
        out.append((own_psize, txnid, main))
    return sorted(out, key=lambda m: -m[1])


def _read_all(f: _File, main: tuple[int, ...], env: Environment) -> None:
    """The main database names the others: each of its F_SUBDATA records is an MDB_db."""
    top = Database(entries=main[6])
    subs: dict[str, tuple[int, ...]] = {}
    _walk(f, main[7], top, None, None, 0, subs)
    env.databases[""] = top
    for name, db in subs.items():
        sub = Database(entries=db[6])
        _walk(f, db[7], sub, None, None, 0, None)
        env.databases[name] = sub


def _walk(
    f: _File,
    pgno: int,
    db: Database,
    lo: bytes | None,
    hi: bytes | None,
    depth: int,
    subs: dict[str, tuple[int, ...]] | None,
) -> None:
    """Read the subtree at `pgno` (keys in [lo, hi)); a bad page loses just its range."""
    if pgno == _NO_PAGE:
        return
    page = f.page(pgno) if depth < _MAX_DEPTH else None
    nodes = _nodes(page, f.psize) if page is not None else None
    if page is None or nodes is None:
        db.damaged_pages += 1
        db.lost.append((lo, hi))
        return
    flags = struct.unpack_from("<H", page, 10)[0]
    if flags & _P_BRANCH:
        children = []
        for i, (off, ksize) in enumerate(nodes):
            lo16, hi16, top16 = struct.unpack_from("<HHH", page, off)
            key = page[off + _NODE : off + _NODE + ksize] if i else lo  # the first key is implied
            children.append((lo16 | hi16 << 16 | top16 << 32, key))
        for i, (child, key) in enumerate(children):
            upper = children[i + 1][1] if i + 1 < len(children) else hi
            _walk(f, child, db, key, upper, depth + 1, subs)
        return
    for off, ksize in nodes:
        _leaf_node(f, page, off, ksize, db, subs)


def _nodes(page: bytes, psize: int) -> list[tuple[int, int]] | None:
    """(offset, key size) of each node of a branch or leaf page; None if it is not one."""
    flags, lower, upper = struct.unpack_from("<HHH", page, 10)
    if not flags & (_P_BRANCH | _P_LEAF) or lower < _PAGE_HEADER or lower > upper or upper > psize:
        return None
    n = (lower - _PAGE_HEADER) >> 1
    out = []
    for ptr in struct.unpack_from(f"<{n}H", page, _PAGE_HEADER):
        if ptr < upper or ptr + _NODE > psize:
            return None
        ksize = struct.unpack_from("<H", page, ptr + 6)[0]
        if ptr + _NODE + ksize > psize:
            return None
        out.append((ptr, ksize))
    return out


def _leaf_node(
    f: _File,
    page: bytes,
    off: int,
    ksize: int,
    db: Database,
    subs: dict[str, tuple[int, ...]] | None,
) -> None:
    lo16, hi16, nflags = struct.unpack_from("<HHH", page, off)
    length = lo16 | hi16 << 16
    key = page[off + _NODE : off + _NODE + ksize]
    start = off + _NODE + ksize
    if nflags & _F_SUBDATA:
        if subs is not None and length == _DB.size and start + length <= len(page):
            subs[key.decode(errors="replace")] = _DB.unpack_from(page, start)
        return
    value: bytes | None
    if nflags & _F_BIGDATA:
        big = struct.unpack_from("<Q", page, start)[0] if start + 8 <= len(page) else 0
        value = f.overflow(big, length) if length < _MAX_VALUE else None
    else:
        value = page[start : start + length] if start + length <= len(page) else None
    if value is None:
        db.damaged_pages += 1
        db.lost.append((key, key + b"\0"))
    else:
        db.records[key] = value


def scan_leaves(path: Path) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of every leaf page in the file, whichever tree it belonged to.

    What is left when a branch page (or a database's root) was lost: the leaves under it
    are usually still in the file, unreferenced. Pages that were freed by later commits are
    found too, so a caller must judge each record by its content (`store.salvage` does).
    """
    out: list[tuple[bytes, bytes]] = []
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return out
    try:
        metas = _metas(fd)
        psize = metas[0][0] if metas else 4096
        f = _File(fd, psize, os.fstat(fd).st_size)
        for pgno in range(2, f.size // psize):
            page = f.page(pgno)
            if page is None or not struct.unpack_from("<H", page, 10)[0] & _P_LEAF:
                continue
            db = Database()  # one per page: each version of a record is kept
            for off, ksize in _nodes(page, psize) or ():
                _leaf_node(f, page, off, ksize, db, None)
            out += db.records.items()
    finally:
        os.close(fd)
    return out
