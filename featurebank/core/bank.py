"""The bank directory: one folder users pass around, and its atomic generations.

Indexes and heads are published the same way: build into a temporary folder,
rename it to its generation number, then switch `CURRENT` with
write-temp, fsync, rename, fsync-dir. A process killed at any point leaves
`CURRENT` on the previous good generation.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from featurebank.core.errors import (
    DamagedFile,
    FailedPrecondition,
    ReadOnlyBank,
    StorageFull,
    shown,
)
from featurebank.core.integrity import read_json, require_intact, write_checksums

log = logging.getLogger(__name__)

T = TypeVar("T")


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
    path = parent / "CURRENT"
    try:
        text = path.read_text(errors="replace").strip()
    except FileNotFoundError:
        return None
    if not text.isdigit():
        raise DamagedFile(f"{path} is damaged (it holds {shown(text)}, not a generation number)")
    return int(text)


def generations(parent: Path) -> list[int]:
    """The published generation numbers under `parent`, newest first."""
    if not parent.is_dir():
        return []
    return sorted((int(p.name) for p in parent.iterdir() if p.name.isdigit()), reverse=True)


def candidates(parent: Path) -> tuple[list[int], list[str]]:
    """The generations to try loading, best first: the live one, then the others newest first.

    Also returns what is wrong with `CURRENT` itself (damaged, or naming a missing
    generation), so a loader that falls back can say why.
    """
    damaged: list[str] = []
    try:
        live = current_generation(parent)
    except DamagedFile as e:
        damaged.append(str(e))
        live = None
    published = generations(parent)
    if live is not None and live not in published:
        damaged.append(f"{parent / 'CURRENT'} names generation {live}, which is missing")
        live = None
    elif live is None and published and not damaged:
        damaged.append(f"{parent / 'CURRENT'} is missing, though generation {published[0]} is published")
    order = ([live] if live is not None else []) + [g for g in published if g != live]
    return order, damaged


MANIFEST = "manifest.json"  # every index and head generation has one


def newest_manifest(parent: Path) -> tuple[int, dict[str, Any]] | None:
    """The best generation under `parent` whose manifest is still readable, with that
    manifest (a damaged generation's params are worth keeping); None if there is none."""
    for gen in candidates(parent)[0]:
        try:
            return gen, read_json(parent / str(gen) / MANIFEST, f"the {parent.name} manifest")
        except DamagedFile:
            continue
    return None


def current_dir(parent: Path, what: str) -> Path:
    """The live generation's folder, or a clear error naming what is missing."""
    gen = current_generation(parent)
    if gen is None:
        raise FailedPrecondition(f"no {what} yet in {parent.parent}: build one first")
    return parent / str(gen)


def load_newest_intact(
    parent: Path, load: Callable[[int], T], what: str
) -> tuple[int, T, list[str]] | None:
    """Load the live generation under `parent`, or else the newest one that is intact.

    `load(gen)` raises DamagedFile for a file it cannot read. Returns (generation, value,
    what was found damaged on the way), None when nothing was ever published, and raises
    DamagedFile naming every damaged file when no generation is intact.
    """
    order, damaged = candidates(parent)
    for gen in order:
        try:
            require_intact(parent / str(gen))
            value = load(gen)
        except DamagedFile as e:
            damaged.append(str(e))
            continue
        if damaged:
            log.warning("%s; serving %s generation %d instead", "; ".join(damaged), what, gen)
        return gen, value, damaged
    if damaged:
        raise DamagedFile(
            f"no intact {what} generation in {parent}: {'; '.join(damaged)}; "
            f"run `featurebank store repair --bank {parent.parent}`"
        )
    return None


STAGING = ".staging-"
DAMAGED = ".damaged-"  # a generation `store repair` set aside: .damaged-<gen>-<time>
STALE_STAGING_S = 24 * 3600  # when the owner of a staging folder cannot be asked


_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def staging_dir(parent: Path) -> Path:
    """A fresh temporary folder beside the generations, to build the next one in.

    Its name carries the building process (host and pid), so the next build removes
    the staging folders of builds that were killed before they published.
    """
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_dead_staging(parent)
        prefix = f"{STAGING}{socket.gethostname()}-{os.getpid()}-"
        return Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    except OSError as e:
        if e.errno in _READ_ONLY:
            raise ReadOnlyBank(f"bank {parent.parent} is read-only ({parent}: {e.strerror})") from None
        if e.errno in _FULL:
            raise StorageFull(f"could not write {parent} ({e.strerror})") from None
        raise


def full_or_read_only(
    e: BaseException, where: Path, what: str, kept: str = "what was there"
) -> BaseException | None:
    """The featurebank error a failed write means (disk full, read-only), or None."""
    code = getattr(e, "errno", None)
    if code in _FULL or any(os.strerror(c) in str(e) for c in _FULL):
        return StorageFull(
            f"could not write the {what} into {where} (disk full): {kept} is unchanged; "
            "free space and run it again"
        )
    if code == errno.EROFS:
        return ReadOnlyBank(f"could not write the {what} into {where}: read-only file system")
    return None


def replace_folder(out: Path, write: Callable[[Path], None], what: str) -> None:
    """Write a folder's files with `write(tmp)`, then swap it in for `out`, all or nothing."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        write(tmp)
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        known = full_or_read_only(e, out, what)
        if known is not None:
            raise known from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def publish_files(parent: Path, write: Callable[[Path], None], what: str, keep: int = 2) -> int:
    """Write a generation's files with `write(staging)` and publish them, all or nothing.

    A failure (a full disk included) removes the staging folder and leaves the live
    generation as it was; a full disk is reported as StorageFull naming the folder.
    """
    staging = staging_dir(parent)
    try:
        write(staging)
        return publish(parent, staging, keep=keep)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(staging, ignore_errors=True)
        known = full_or_read_only(e, parent, what, kept="the live generation")
        if known is not None:
            raise known from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish(parent: Path, staging: Path, keep: int = 2) -> int:
    """Turn `staging` into the next generation, make it live, and prune old ones."""
    aside = [int(p.name.split("-")[1]) for p in parent.glob(f"{DAMAGED}*-*") if p.is_dir()]
    gen = max([*generations(parent), *aside], default=0) + 1  # numbers are never reused
    write_checksums(staging)
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
    try:
        live = current_generation(parent)
    except DamagedFile:
        return  # keep everything a repair may fall back to
    for gen in generations(parent)[keep:]:
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
