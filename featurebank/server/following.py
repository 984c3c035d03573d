"""Which banks read replicas follow: a shared lock each replica holds on `BANK/followers.lock`.

Why a lock and not a list: a replica that dies (or is killed) lets go of its lock with
its process, so a bank is never reported followed by a replica that is gone; and a lock
can be taken on a bank whose file system is read-only (the file is only opened to read).
DropBank asks whether anyone holds it before it removes a bank.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_FILE = "followers.lock"


def follow(bank_root: Path) -> int | None:
    """Mark the bank followed by this process until `unfollow`; None where the file can be
    neither found nor made (a read-only bank its primary never marked: nothing to protect)."""
    path = Path(bank_root) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def unfollow(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)  # closing the descriptor releases the lock


def followed(bank_root: Path) -> bool:
    """Whether any process (a read replica) follows the bank now."""
    path = Path(bank_root) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the lock when it was taken
    return False
