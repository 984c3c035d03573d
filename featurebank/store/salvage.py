"""Salvage a damaged store: copy every item still readable into a fresh environment.

`featurebank store repair` calls `salvage(bank)` when committed items of the store cannot
be read back. Holding the bank's writer lock, it runs the reading half in a child process
(`store.salvage_read`, so a crash while reading damaged files is contained), then, when
anything was recovered, switches CURRENT to the fresh environment atomically and sets the
old environments aside (renamed `.damaged-env-<n>-<time>`, never deleted). The report of
what was recovered and lost is kept in `store/salvage.json`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from featurebank.core.bank import DAMAGED, Bank, write_atomic
from featurebank.core.errors import DamagedFile, ReadOnlyBank, WriterBusy
from featurebank.store.env import CURRENT, ENV_PREFIX, WRITER_LOCK
from featurebank.store.salvage_read import SHOWN, environments

REPORT = "salvage.json"
_CHILD_TIMEOUT_S = 3600


def salvage(bank: str | Path | Bank) -> dict[str, Any]:
    """Salvage `bank`'s store into a fresh environment; returns what was kept and lost."""
    b = Bank(bank)
    store_dir = b.store_dir
    fd = _lock(store_dir)
    try:
        names = environments(store_dir)
        if not names:
            raise DamagedFile(f"{store_dir} holds no environment to salvage (no {ENV_PREFIX}* folder)")
        new = f"{ENV_PREFIX}{max(int(n[len(ENV_PREFIX):]) for n in names) + 1}"
        report_path = store_dir / f".{REPORT}.{os.getpid()}"
        cmd = [sys.executable, "-m", "featurebank.store.salvage_read", str(store_dir), new,
               str(report_path)]  # fmt: skip
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=_CHILD_TIMEOUT_S)
            code, stderr = r.returncode, r.stderr
        except subprocess.TimeoutExpired:
            code, stderr = 1, f"still reading after {_CHILD_TIMEOUT_S} s"
        if code != 0 or not report_path.exists():
            shutil.rmtree(store_dir / new, ignore_errors=True)
            report_path.unlink(missing_ok=True)
            why = f"signal {-code}" if code < 0 else f"exit {code}"
            last = (stderr.strip().splitlines() or [""])[-1]
            raise DamagedFile(
                f"reading the damaged store {store_dir} failed ({why}: {last[:300]}); "
                "nothing was changed"
            )
        report: dict[str, Any] = json.loads(report_path.read_text())
        report_path.unlink()
        if report["recovered"] == 0:
            shutil.rmtree(store_dir / new, ignore_errors=True)
            report["switched"] = False
            return report
        write_atomic(store_dir / CURRENT, f"{new}\n".encode())
        stamp = int(time.time())
        report["set_aside"] = []
        for name in names:
            aside = store_dir / f"{DAMAGED}{name}-{stamp}"
            os.rename(store_dir / name, aside)
            report["set_aside"].append(str(aside))
        report["switched"] = True
        write_atomic(store_dir / REPORT, json.dumps(report, indent=1).encode())
        return report
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _lock(store_dir: Path) -> int:
    """The bank's writer lock, so no writer commits into the environment being replaced.

    Taken here rather than by `SharedStore.acquire_writer`, which removes every
    environment CURRENT does not name: the very ones a salvage reads.
    """
    path = store_dir / WRITER_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise ReadOnlyBank(f"bank {store_dir.parent} is read-only ({path}: {e.strerror})") from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WriterBusy(
            f"bank {store_dir.parent} is being written by another process (lock {path}); "
            "stop it before repairing the store"
        ) from None
    return fd


def describe(report: dict[str, Any], store_dir: Path) -> list[str]:
    """What a salvage did, for `store repair`'s lines."""
    if report["spec_lost"] or not report["switched"]:
        why = "its spec is unreadable" if report["spec_lost"] else "no item is readable"
        return [f"nothing is recoverable from {store_dir} ({why}; "
                f"{'; '.join(report['problems']) or 'see store verify'}): restore the bank from "
                "a copy made by `featurebank store backup`"]  # fmt: skip
    lines = [f"salvaged {report['recovered']} items from {', '.join(report['environments'])} into "
             f"{store_dir / report['new_environment']} (old environments set aside: "
             f"{', '.join(Path(p).name for p in report['set_aside'])})"]  # fmt: skip
    if report["lost"] is None:
        lines.append(f"the change log is unreadable too, so what was lost is not known "
                     f"(the store counted {report['counted']})")  # fmt: skip
    elif report["lost"]:
        keys = f"; keys {', '.join(report['lost_keys'])}" if report["lost_keys"] else ""
        more = " (first ones)" if report["lost"] > len(report["lost_ids"]) else ""
        lines.append(f"could not recover {report['lost']} items: ids "
                     f"{', '.join(map(str, report['lost_ids']))}{more}{keys}")  # fmt: skip
    counted = report["counted"]
    if counted is None and report["problems"]:
        lines.append("the store's own count is lost with its last commit, so items that "
                     "neither the change log nor the key table still names may be missing too")  # fmt: skip
    elif counted is not None and counted > report["recovered"] + (report["lost"] or 0):
        lines.append(f"the store counted {counted} live items: "
                     f"{counted - report['recovered']} are not recovered, not all of them "
                     "named above (their log entries are lost too)")  # fmt: skip
    else:
        lines.append("every item the change log names was recovered")
    if report["without_meta"]:
        ids = report["without_meta"]
        lines.append(f"{len(ids)} items were recovered without their metadata (ids "
                     f"{', '.join(map(str, ids[:SHOWN]))}{' ...' if len(ids) > SHOWN else ''})")  # fmt: skip
    return lines
