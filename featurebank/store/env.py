"""LMDB plumbing for the store: one environment per process, one writer per bank.

LMDB's rules, and how they are kept here:

- an environment must not be opened twice in one process -> a per-process
  registry keyed by the store directory's real path hands out one `SharedStore`;
- an environment must not be used across `fork()` -> fork waits until no
  transaction is open, the child closes its inherited handles (touching only its
  own reader slots) and its stores reopen on their next call;
- long read transactions pin old pages -> every read here is a short
  transaction that never spans user code; stale reader slots of dead processes
  are cleared at open (`reader_check`);
- the map has a fixed size -> writes grow it on `MapFullError` and retry, and
  readers adopt a grown map on `MapResizedError`.

`compact()` writes a fresh environment (`env-<n>/`) and switches `CURRENT` to it
atomically; readers notice on their next call and the old directory is removed.
Only the holder of `writer.lock` (fcntl.flock, non-blocking) may write. A store on a
read-only mount is opened read-only without LMDB's lock file, and refuses writers.

One module, over 400 lines, because every rule above constrains the same handles and
locks; split, each invariant would be kept in one file and broken in another.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from featurebank.core.errors import (
    DamagedFile,
    FeaturebankError,
    NotFound,
    ReadOnlyBank,
    StorageFull,
    WriterBusy,
)
from featurebank.core.rwlock import RWLock
from featurebank.store.header import check_data_file, read_only_fs

log = logging.getLogger(__name__)

T = TypeVar("T")

DB_NAMES = (
    "info", "vectors", "rows", "keys", "meta", "key2id", "vocab", "log", "errors", "thumbs",
)
ADDED_LATER = ("thumbs",)  # created when a store made before them is opened
CURRENT = "CURRENT"
WRITER_LOCK = "writer.lock"
ENV_PREFIX = "env-"
INITIAL_MAP_SIZE = 64 << 20
# False in a replica's process: commits skip LMDB's second fsync (of the meta page); a system
# crash may undo the last commits but never breaks the store, and the replica re-fetches them.
SYNC_META = True
MAX_MAP_SIZE = 1 << 42
# LMDB reports a short write (the usual first sign of a full disk) as EIO.
_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO)


def is_disk_full(e: BaseException) -> bool:
    """LMDB reports write failures as lmdb.Error carrying the errno text; OSError as errno."""
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        return True
    text = str(e)
    return any(os.strerror(code) in text for code in _DISK_FULL)


class EnvHandle:
    """One open LMDB environment and its named databases."""

    def __init__(
        self, path: Path, create: bool, map_size: int = INITIAL_MAP_SIZE, frozen: bool = False
    ) -> None:
        """`frozen`: the file system is read-only, so nothing can write the environment:
        it is opened read-only without LMDB's lock file (which could not be created)."""
        self.path = path
        self.name = path.name
        self.pins = 0
        self.closed = False
        if not create:
            check_data_file(path)
        try:
            self.env = lmdb.open(
                str(path),
                subdir=True,
                create=create,
                map_size=map_size,
                max_dbs=len(DB_NAMES) + 2,
                max_readers=1022,
                meminit=False,
                readonly=frozen,
                lock=not frozen,
                metasync=SYNC_META,
            )
        except lmdb.Error as e:
            if is_disk_full(e):
                raise StorageFull(f"could not open {path} (disk full: {e})") from None
            if create:
                raise
            raise DamagedFile(f"{path / 'data.mdb'} is damaged ({e})") from None
        try:
            if not frozen:
                stale = self.env.reader_check()
                if stale:
                    log.info("cleared %d stale LMDB readers in %s", stale, path)
            self.dbs = self._open_dbs(create, frozen)
        except lmdb.Error as e:
            self.env.close()
            if is_disk_full(e):
                raise StorageFull(f"could not write {path} (disk full: {e})") from None
            raise DamagedFile(f"{path / 'data.mdb'} is damaged ({e})") from None
        except BaseException:
            self.env.close()
            raise

    def _open_dbs(self, create: bool, frozen: bool = False) -> dict[str, Any]:
        if frozen:  # nothing can write: py-lmdb opens each handle in its own read transaction
            with self.env.begin() as txn:
                present = [n for n in DB_NAMES if txn.get(n.encode()) is not None]
            return {n: self.env.open_db(n.encode(), create=False) for n in present}
        # A write transaction even to open existing databases: py-lmdb drops handles
        # opened in a read transaction when it ends. It changes nothing, so commits for free.
        txn = self.env.begin(write=True)
        try:
            dbs = {
                n: self.env.open_db(n.encode(), txn=txn, create=create or n in ADDED_LATER)
                for n in DB_NAMES
            }
        except BaseException:
            txn.abort()
            raise
        txn.commit()  # handles opened in a transaction only outlive it once it commits
        return dbs

    @property
    def map_size(self) -> int:
        return int(self.env.info()["map_size"])

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.env.close()


class SharedStore:
    """Everything one process shares about one store directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.RLock()  # serialises writers and environment switches
        self.rw = RWLock()
        self.refs = 0
        self.valid = True
        self.handle: EnvHandle | None = None
        self._sig: tuple[int, int, int] | None = None
        self.retired: list[EnvHandle] = []
        self.writer_fd: int | None = None
        self.writer_refs = 0
        self.vocab: dict[int, str] = {}  # label codes never change meaning, so this only grows
        self.frozen = read_only_fs(path)  # on a read-only mount: readers only
        self.on_commit: list[Callable[[], None]] = []  # called after each commit by this process

    # ---- which environment is current ---------------------------------------------------

    def current(self) -> EnvHandle:
        """The live environment, switching if another process compacted (CURRENT replaced)."""
        try:
            st = os.stat(self.path / CURRENT)
        except FileNotFoundError:
            raise NotFound(f"no store in {self.path.parent} (missing {self.path})") from None
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        handle = self.handle
        if handle is not None and sig == self._sig and not handle.closed:
            return handle
        with self.lock:
            return self._switch()

    def _read_current(self) -> tuple[tuple[int, int, int], str]:
        """CURRENT's identity and content, read from one open file so they agree."""
        path = self.path / CURRENT
        try:
            with path.open("rb") as f:
                st = os.fstat(f.fileno())
                name = f.read(256).decode(errors="replace").strip()
        except FileNotFoundError:
            raise NotFound(f"no store in {self.path.parent} (missing {self.path})") from None
        if not name.startswith(ENV_PREFIX) or "/" in name:
            raise DamagedFile(f"{path} is damaged (it names {name[:40]!r}, not an environment)")
        if not (self.path / name).is_dir():
            raise DamagedFile(f"{path} names {name}, which does not exist in {self.path}")
        return (st.st_ino, st.st_mtime_ns, st.st_size), name

    def _switch(self) -> EnvHandle:
        """Open the environment CURRENT names, making sure it was still live once opened.

        Compaction switches CURRENT before deleting the old environment, so if CURRENT
        is unchanged after the open, the files opened were not being deleted.
        """
        for _attempt in range(50):
            sig, name = self._read_current()
            h = self.handle
            if h is not None and h.name == name and not h.closed:
                self._sig = sig
                return h
            try:
                new = EnvHandle(self.path / name, create=False, frozen=self.frozen)
            except (lmdb.Error, DamagedFile):
                if self._read_current()[0] != sig:
                    continue  # compacted away while opening: follow CURRENT
                raise
            if self._read_current()[0] != sig:
                new.close()
                continue
            if h is not None:
                self.retired.append(h)
            self.handle, self._sig = new, sig
            return new
        raise FeaturebankError(f"could not open the store in {self.path}: CURRENT keeps changing")

    def install(self, handle: EnvHandle) -> None:
        """Make a freshly written environment current in this process (after compaction)."""
        if self.handle is not None:
            self.retired.append(self.handle)
        self.handle, self._sig = handle, self._read_current()[0]

    def close_retired(self) -> None:
        """Unmap environments replaced by compaction once no iteration still reads them."""
        if not any(h.pins == 0 for h in self.retired):
            return
        with self.rw.exclusive():
            for h in [h for h in self.retired if h.pins == 0]:
                h.close()
                self.retired.remove(h)

    # ---- transactions -------------------------------------------------------------------

    @contextlib.contextmanager
    def read(self, handle: EnvHandle | None = None) -> Iterator[tuple[Any, EnvHandle]]:
        """A short read transaction (buffers: values are views valid inside the block)."""
        if self.retired:
            self.close_retired()
        while True:
            with self.rw.shared():
                h = handle if handle is not None else self.current()
                try:
                    txn = h.env.begin(buffers=True)
                except lmdb.MapResizedError:
                    pass
                else:
                    try:
                        yield txn, h
                    finally:
                        txn.abort()
                    return
            with self.rw.exclusive():
                h.env.set_mapsize(0)  # adopt the size the writer grew the map to

    def write(self, fn: Callable[[Any, EnvHandle], T]) -> T:
        """Run `fn` in one write transaction; grow the map and retry if it fills up. Once it
        committed, each `on_commit` listener is called (outside the lock).

        `fn` must only read and write through the transaction, so a retry starts clean.
        """
        self.require_writer()
        with self.lock:
            while True:
                h = self.current()
                try:
                    with self.rw.shared(), h.env.begin(write=True, buffers=True) as txn:
                        result = fn(txn, h)
                    break
                except lmdb.MapFullError:
                    self.grow(h)
                except lmdb.Error as e:
                    if is_disk_full(e):
                        raise StorageFull(
                            f"could not write {self.path} (disk full or failing: {e}); the last "
                            "committed batch is intact, this one was not written"
                        ) from e
                    raise
        for listener in list(self.on_commit):
            with contextlib.suppress(Exception):  # a listener must not fail a committed write
                listener()
        return result

    def grow(self, h: EnvHandle) -> None:
        size = h.map_size
        if size >= MAX_MAP_SIZE:
            raise StorageFull(f"the store map of {self.path} reached {size} bytes")
        new = min(MAX_MAP_SIZE, max(size * 2, INITIAL_MAP_SIZE))
        with self.rw.exclusive():
            h.env.set_mapsize(new)
        log.info("grew the LMDB map of %s to %d MiB", h.path, new >> 20)

    # ---- the single writer --------------------------------------------------------------

    def acquire_writer(self) -> None:
        """Take the bank's writer lock for this process (shared by its writable stores)."""
        with self.lock:
            if self.writer_fd is not None:
                self.writer_refs += 1
                return
            if self.frozen:
                raise ReadOnlyBank(
                    f"bank {self.path.parent} is read-only (its file system is mounted "
                    "read-only): it can be read, searched and served, not written"
                )
            self.path.mkdir(parents=True, exist_ok=True)
            lock_path = self.path / WRITER_LOCK
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise ReadOnlyBank(
                        f"bank {self.path.parent} is read-only ({lock_path}: {e.strerror})"
                    ) from None
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise WriterBusy(
                    f"bank {self.path.parent} is being written by process {holder} "
                    f"(lock {lock_path}); wait for it to finish or open the store read-only"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.writer_fd, self.writer_refs = fd, 1
            self._remove_orphan_envs()

    def holder(self) -> int | None:
        """The pid of the process holding the bank's writer lock, or None when nobody does.

        Probed with a lock of its own (a second open file conflicts with any holder, this
        process included) and released at once.
        """
        if self.writer_fd is not None:
            return os.getpid()
        lock_path = self.path / WRITER_LOCK
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def require_writer(self) -> None:
        if self.writer_fd is None:
            raise FeaturebankError(f"this process does not hold the writer lock of {self.path}")

    def release_writer(self) -> None:
        with self.lock:
            if self.writer_fd is None:
                return
            self.writer_refs -= 1
            if self.writer_refs <= 0 and self.valid:
                fd, self.writer_fd = self.writer_fd, None
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def _remove_orphan_envs(self) -> None:
        """Environments left by a compaction that crashed before switching CURRENT."""
        try:
            live = (self.path / CURRENT).read_text().strip()
        except FileNotFoundError:
            live = None
        for p in self.path.glob(ENV_PREFIX + "*"):
            if p.name != live and p.is_dir():
                log.info("removing leftover environment %s", p)
                shutil.rmtree(p, ignore_errors=True)

    def close(self) -> None:
        with self.rw.exclusive():
            for h in [*self.retired, *([self.handle] if self.handle else [])]:
                h.close()
        self.retired, self.handle = [], None


# ---- the per-process registry ----------------------------------------------------------------

_REGISTRY: dict[str, SharedStore] = {}
_REGISTRY_LOCK = threading.Lock()


def acquire(path: Path) -> SharedStore:
    """The one SharedStore of this process for `path` (a store directory)."""
    key = os.path.realpath(path)
    with _REGISTRY_LOCK:
        shared = _REGISTRY.get(key)
        if shared is None:
            shared = _REGISTRY[key] = SharedStore(Path(key))
        shared.refs += 1
        return shared


def release(shared: SharedStore) -> None:
    with _REGISTRY_LOCK:
        shared.refs -= 1
        if shared.refs > 0 or not shared.valid:
            return
        _REGISTRY.pop(str(shared.path), None)
    shared.close()


def _before_fork() -> None:
    """Let running transactions finish and hold new ones off, so none spans the fork."""
    _REGISTRY_LOCK.acquire()
    for shared in _REGISTRY.values():
        shared.rw.acquire_exclusive()


def _after_fork_in_parent() -> None:
    for shared in _REGISTRY.values():
        shared.rw.release_exclusive()
    _REGISTRY_LOCK.release()


def _after_fork_in_child() -> None:
    """LMDB handles must not cross fork: close the inherited ones and start afresh.

    No transaction is open (see `_before_fork`), so closing touches nothing the
    parent uses: LMDB only clears reader slots of this (new) pid. The writer lock's
    inherited descriptor is closed without unlocking: the lock stays the parent's.
    """
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.Lock()
    for shared in _REGISTRY.values():
        shared.valid = False
        shared.rw = RWLock()
        for h in [*shared.retired, *([shared.handle] if shared.handle else [])]:
            h.close()
        if shared.writer_fd is not None:
            os.close(shared.writer_fd)
            shared.writer_fd = None
    _REGISTRY.clear()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)
