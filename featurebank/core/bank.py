"""The bank directory: one folder users pass around, and its atomic generations.

Indexes and heads are published the same way: build into a temporary folder,
rename it to its generation number, then switch `CURRENT` with
write-temp, fsync, rename, fsync-dir. A process killed at any point leaves
`CURRENT` on the previous good generation.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

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


def staging_dir(parent: Path) -> Path:
    """A fresh temporary folder beside the generations, to build the next one in."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=parent, prefix=".staging-"))


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
    for p in parent.glob(".staging-*"):
        if _owner_dead(p):
            shutil.rmtree(p, ignore_errors=True)


def _owner_dead(staging: Path) -> bool:
    """Staging folders are only removed once old enough that no live build can own them."""
    try:
        return time.time() - staging.stat().st_mtime > 24 * 3600
    except FileNotFoundError:
        return False
