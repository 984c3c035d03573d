"""The bank directory: one folder users pass around, and its atomic generations.

Indexes and heads are published the same way: build into a temporary folder,
rename it to its generation number, then switch `CURRENT` with
write-temp, fsync, rename, fsync-dir. A process killed at any point leaves
`CURRENT` on the previous good generation.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from featurebank.core.errors import FailedPrecondition


class Bank:
    """Paths of one bank directory (see DESIGN.md for the layout)."""

    def __init__(self, root: str | os.PathLike[str] | Bank) -> None:
        self.root: Path = root.root if isinstance(root, Bank) else Path(root)

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    @property
    def indexes_dir(self) -> Path:
        return self.root / "indexes"

    @property
    def heads_dir(self) -> Path:
        return self.root / "heads"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    def read_job_record(self, job: str) -> dict[str, Any]:
        """What the last `job` (e.g. "embed") recorded about how it ran; {} if none ran yet.

        The record only saves work (a batch size search), so an unreadable one counts as none.
        """
        try:
            record = json.loads((self.jobs_dir / f"{job}.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def write_job_record(self, job: str, record: dict[str, Any]) -> None:
        """Replace `job`'s record atomically (the job holds the bank's writer lock meanwhile)."""
        data = json.dumps(record, indent=2, sort_keys=True).encode()
        write_atomic(self.jobs_dir / f"{job}.json", data)

    def __repr__(self) -> str:
        return f"Bank({str(self.root)!r})"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so readers see the old or the new file, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def current_generation(parent: Path) -> int | None:
    """The live generation under `parent` (indexes/ or heads/), or None if none was published."""
    try:
        return int((parent / "CURRENT").read_text().strip())
    except FileNotFoundError:
        return None


def current_dir(parent: Path, what: str) -> Path:
    """The live generation's folder, or a clear error naming what is missing."""
    gen = current_generation(parent)
    if gen is None:
        raise FailedPrecondition(f"no {what} yet in {parent.parent}: build one first")
    return parent / str(gen)


STAGING = ".staging-"
STALE_STAGING_S = 24 * 3600  # when the owner of a staging folder cannot be asked


def staging_dir(parent: Path) -> Path:
    """A fresh temporary folder beside the generations, to build the next one in.

    Its name carries the building process (host and pid), so the next build removes
    the staging folders of builds that were killed before they published.
    """
    parent.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(parent)
    prefix = f"{STAGING}{socket.gethostname()}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(dir=parent, prefix=prefix))


def publish(parent: Path, staging: Path, keep: int = 2) -> int:
    """Turn `staging` into the next generation, make it live, and prune old ones."""
    existing = [int(p.name) for p in parent.iterdir() if p.name.isdigit()]
    gen = max(existing, default=0) + 1
    for f in staging.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(staging)
    final = parent / str(gen)
    os.rename(staging, final)
    fsync_dir(parent)
    write_atomic(parent / "CURRENT", f"{gen}\n".encode())
    prune(parent, keep)
    return gen


def prune(parent: Path, keep: int = 2) -> None:
    """Drop all but the newest `keep` generations (never the live one) and dead staging folders."""
    live = current_generation(parent)
    gens = sorted((int(p.name) for p in parent.iterdir() if p.name.isdigit()), reverse=True)
    for gen in gens[keep:]:
        if gen != live:
            shutil.rmtree(parent / str(gen), ignore_errors=True)
    remove_dead_staging(parent)


def remove_dead_staging(parent: Path) -> list[Path]:
    """Remove the staging folders under `parent` whose build no longer runs; returns them."""
    removed = []
    for p in parent.glob(f"{STAGING}*"):
        if _owner_dead(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _owner_dead(staging: Path) -> bool:
    """Whether the build that made `staging` has ended without publishing it.

    A folder made on this host names its process: it is dead once that pid is gone.
    A folder from another host (a bank on shared storage) or an older name is only
    judged by age: no build takes STALE_STAGING_S.
    """
    host, pid = _staging_owner(staging.name)
    if host == socket.gethostname() and pid is not None:
        return not _pid_alive(pid)
    try:
        return time.time() - staging.stat().st_mtime > STALE_STAGING_S
    except FileNotFoundError:
        return False


def _staging_owner(name: str) -> tuple[str | None, int | None]:
    parts = name[len(STAGING) :].rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None, None
    return parts[0], int(parts[1])


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be building
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True
