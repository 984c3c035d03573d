"""What the store's files say about themselves, read before LMDB maps them.

LMDB maps data.mdb and trusts it: a file shorter than its header says makes the
process die of SIGBUS on first touch, and a file of random bytes is reported only as
an opaque lmdb.Error. Both are checked here with plain reads, so the error names the
file and what is wrong. A read-only mount is found here too: LMDB cannot create its
lock file there, so such a store is opened read-only without one.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from featurebank.core.errors import DamagedFile

META_MAGIC = 0xBEEFC0DE
_PAGE_HEADER = 16  # the meta pages' layout on 64-bit builds (lmdb's mdb.c: MDB_meta)


def check_data_file(env_dir: Path) -> None:
    """Compare data.mdb with its own header before mapping it: a short file would SIGBUS.

    An LMDB file starts with two meta pages; the newer one (by transaction id) names the
    last page in use, so the file must be at least that long.
    """
    path = env_dir / "data.mdb"
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_PAGE_HEADER + 160)
            psize = struct.unpack_from("<I", head, _PAGE_HEADER + 24)[0] if len(head) >= 44 else 0
            f.seek(psize)
            second = f.read(_PAGE_HEADER + 160) if 0 < psize <= 1 << 16 else b""
    except FileNotFoundError:
        raise DamagedFile(f"{path} is missing (the store's environment)") from None
    metas = [m for m in (head, second) if len(m) >= _PAGE_HEADER + 136]
    valid = [m for m in metas if struct.unpack_from("<I", m, _PAGE_HEADER)[0] == META_MAGIC]
    if not valid:
        raise DamagedFile(f"{path} is damaged (not an LMDB environment: no valid header)")
    newest = max(valid, key=lambda m: struct.unpack_from("<Q", m, _PAGE_HEADER + 128)[0])
    last_page = struct.unpack_from("<Q", newest, _PAGE_HEADER + 120)[0]
    needed = (last_page + 1) * psize
    if size < needed:
        raise DamagedFile(
            f"{path} is truncated ({size} bytes; its header says at least {needed})"
        )


def read_only_fs(path: Path) -> bool:
    """Whether `path` is on a file system mounted read-only."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except FileNotFoundError:
        return False
