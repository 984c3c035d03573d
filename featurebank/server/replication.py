"""The primary's side of replication to read replicas on other hosts (docs/scale.md).

Two RPCs, both for the write or the replicate role (server/auth.py):

- `ReplicaSnapshot`: a consistent copy of the store (LMDB's hot copy in one read
  transaction) and the published index and head generations (hard links: published
  folders never change), kept in `BANK/.snapshots/<id>/` with a manifest of every file's
  size. Streamed in chunks, each with its crc32, a file's last one with the crc32 of the
  whole file; a replica whose connection
  dropped asks for the same snapshot from the file and offset it holds, so nothing is sent
  twice. A snapshot is kept `SNAPSHOT_TTL_S` after its last use, across restarts of the
  server; not across a restart of the host, as it is written without fsync (`boot_id`).
- `FollowStore`: the store's records changed after the replica's generation
  (store/replication.py), then each new commit as it lands (the stream is woken by the
  commit), plus a heartbeat with the published generations every `HEARTBEAT_S`. The
  replica answers with the generation it applied: that is its lag here, and what the
  change log is kept for. The kept quality findings (`quality/decisions.json`, outside
  the store) travel on the stream too: first, and whenever the file changes.

Retention: the log is trimmed, at most every `TRIM_EVERY_S` while replicas follow, to the
oldest generation a replica seen in the last `grace_s` still needs, but never more than
`retention` generations back, and never past what this server's own published indexes
need to catch up from after a restart. A replica further behind is told to bootstrap again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featurebank.classify.quality import decisions
from featurebank.core.bank import Bank, current_generation, generations
from featurebank.core.errors import FailedPrecondition, InvalidInput, NotFound
from featurebank.core.memory import streaming_buffers
from featurebank.server.batching import run_in
from featurebank.server.checksums import crc32, crc32_combine, crc32_prefix
from featurebank.store import replication as records
from featurebank.store.rows import LogTrimmed
from featurebank.v1 import featurebank_pb2 as pb

if TYPE_CHECKING:
    from featurebank.server.engine import Engine
    from featurebank.server.metrics import Metrics
    from featurebank.store import Store

log = logging.getLogger(__name__)

SNAPSHOTS = ".snapshots"
MANIFEST = "manifest.json"
CHUNK_BYTES = 4 << 20
SNAPSHOT_TTL_S = 3600.0
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
HEARTBEAT_S = 1.0
TRIM_EVERY_S = 5.0
DELTA_PART_BYTES = 4 << 20
DEFAULT_LOG_RETENTION = 100_000  # generations of change log kept at most for replicas
DEFAULT_REPLICA_GRACE_S = 600.0  # a replica not seen for this long no longer holds the log


# ---------------------------------------------------------------- snapshots


def _link_tree(src: Path, dest: Path) -> None:
    """Hard links of a published (never rewritten) folder; a copy where links fail."""
    shutil.copytree(src, dest, copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def make_snapshot(store: Store, bank: Bank, generations_only: bool) -> dict[str, Any]:
    """Write a snapshot folder and its manifest; returns the manifest."""
    root = bank.root / SNAPSHOTS
    sid = uuid.uuid4().hex[:16]
    staging, folder = root / f".{sid}", root / sid
    staging.mkdir(parents=True)
    try:
        manifest: dict[str, Any] = {"id": sid, "boot": boot_id(), "store_generation": 0,
                                    "store_epoch": "", "index_generation": 0,
                                    "head_generation": 0}
        if not generations_only:
            gen, epoch = records.copy_to(store, staging / "store")
            manifest.update(store_generation=gen, store_epoch=epoch)
            if bank.root.joinpath("models").is_dir():
                _link_tree(bank.root / "models", staging / "models")
        for what, parent in (("index", bank.indexes_dir), ("head", bank.heads_dir)):
            live = current_generation(parent)
            if live is None or not (parent / str(live)).is_dir():
                continue
            _link_tree(parent / str(live), staging / parent.name / str(live))
            (staging / parent.name / "CURRENT").write_text(f"{live}\n")
            manifest[f"{what}_generation"] = live
        manifest["files"] = [
            {"path": str(p.relative_to(staging)), "size": p.stat().st_size}
            for p in records.files_of(staging)
        ]
        (staging / MANIFEST).write_text(json.dumps(manifest))
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("snapshot %s of %s: %d files, %.1f MiB", sid, bank.root, len(manifest["files"]),
             sum(f["size"] for f in manifest["files"]) / 2**20)
    return manifest


def boot_id() -> str:
    """This boot of the host: a snapshot is written without fsync, so after a crash or a
    power cut its pages may not all have reached the disk, and it is not served again."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:  # not Linux: every snapshot is of this boot
        return ""


def open_snapshot(bank: Bank, sid: str) -> dict[str, Any]:
    """The manifest of a kept snapshot; NotFound once it expired or was written before the
    host restarted (the replica starts over)."""
    if not sid.isalnum():
        raise InvalidInput(f"snapshot_id {sid!r} is not a snapshot id")
    path = bank.root / SNAPSHOTS / sid / MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"snapshot {sid} is no longer kept by the primary: start a new one") from None
    if manifest.get("boot", "") != boot_id():
        shutil.rmtree(path.parent, ignore_errors=True)
        raise NotFound(f"snapshot {sid} was written before the primary's host restarted: "
                       "start a new one")
    os.utime(path)  # in use: kept another SNAPSHOT_TTL_S
    return manifest


def expire_snapshots(bank: Bank, ttl_s: float = SNAPSHOT_TTL_S) -> None:
    root = bank.root / SNAPSHOTS
    if not root.is_dir():
        return
    now = time.time()
    for folder in root.iterdir():
        manifest = folder / MANIFEST
        age = now - (manifest.stat().st_mtime if manifest.exists() else folder.stat().st_mtime)
        if age > ttl_s:
            shutil.rmtree(folder, ignore_errors=True)


def _header(manifest: dict[str, Any]) -> pb.SnapshotChunk:
    return pb.SnapshotChunk(
        snapshot_id=manifest["id"],
        files=[pb.SnapshotFile(**f) for f in manifest["files"]],
        store_generation=manifest["store_generation"], store_epoch=manifest["store_epoch"],
        index_generation=manifest["index_generation"], head_generation=manifest["head_generation"],
    )


def _read_chunk(fd: int, offset: int) -> tuple[bytes, int]:
    """CHUNK_BYTES of a file from `offset`, and their crc32 (on a worker thread: the read
    lets go of the GIL)."""
    data = os.pread(fd, CHUNK_BYTES, offset)
    return data, crc32(data)


def _close_after(fd: int, _read: object) -> None:
    os.close(fd)


async def snapshot_stream(engine: Engine, request: pb.SnapshotRequest) -> AsyncIterator[pb.SnapshotChunk]:
    """The ReplicaSnapshot stream: the manifest, then the files from where the replica is.
    The next chunk is read while the last one is sent; a file's crc32 is combined from its
    chunks' (server/checksums.py)."""
    bank, store = engine.bank, engine.live.opened()
    await run_in(engine.compute, expire_snapshots, bank)
    if request.snapshot_id:
        manifest = open_snapshot(bank, request.snapshot_id)
    else:
        manifest = await asyncio.get_running_loop().run_in_executor(
            None, make_snapshot, store, bank, request.generations_only
        )
    yield _header(manifest)
    folder = bank.root / SNAPSHOTS / manifest["id"]
    paths = [f["path"] for f in manifest["files"]]
    start = 0
    if request.path:
        if request.path not in paths:
            raise InvalidInput(f"snapshot {manifest['id']} has no file {request.path!r}")
        start = paths.index(request.path)
    with streaming_buffers():
        async for chunk in _file_chunks(folder, manifest["files"][start:],
                                        request.offset if request.path else 0):
            yield chunk


async def _file_chunks(folder: Path, files: list[dict[str, Any]],
                       first_offset: int) -> AsyncIterator[pb.SnapshotChunk]:
    """The chunks of `files`, the first file's from `first_offset`."""
    loop = asyncio.get_running_loop()
    for i, f in enumerate(files):
        offset = first_offset if i == 0 else 0
        if not 0 <= offset <= f["size"]:
            raise InvalidInput(f"offset {offset} is outside {f['path']} ({f['size']} bytes)")
        path = folder / f["path"]
        whole = await loop.run_in_executor(None, crc32_prefix, path, offset) if offset else 0
        fd = os.open(path, os.O_RDONLY)
        pending = loop.run_in_executor(None, _read_chunk, fd, offset)
        try:
            while True:
                data, crc = await pending
                end = offset + len(data)
                last = end >= f["size"] or not data
                if not last:
                    pending = loop.run_in_executor(None, _read_chunk, fd, end)
                whole = crc32_combine(whole, crc, len(data))
                chunk = pb.SnapshotChunk(path=f["path"], offset=offset, data=data, crc32=crc)
                offset = end
                if last:
                    chunk.file_crc32 = whole
                    yield chunk
                    break
                yield chunk
        finally:  # a stream cut while a read is in flight closes the file after the read
            pending.add_done_callback(functools.partial(_close_after, fd))


# ---------------------------------------------------------------- following


@dataclass
class Follower:
    """A replica as the primary sees it."""

    replica_id: str
    peer: str
    applied: int
    seen: float = field(default_factory=time.monotonic)
    connected: bool = True


class Hub:
    """The replicas following one bank, and the change log kept for them."""

    def __init__(self, retention: int = DEFAULT_LOG_RETENTION,
                 grace_s: float = DEFAULT_REPLICA_GRACE_S, metrics: Metrics | None = None) -> None:
        if retention < 1:
            raise InvalidInput(f"--log-retention must be >= 1 generation, got {retention}")
        self.retention = retention
        self.grace_s = grace_s
        self.metrics = metrics
        self.followers: dict[str, Follower] = {}
        self.closed = False  # the bank is being dropped: every stream ends (`closing`)
        self._wakers: set[Callable[[], None]] = set()  # one per open stream
        self._lock = threading.Lock()
        self._trimmed_at = 0.0

    def seen(self, replica_id: str, peer: str, applied: int, primary: int) -> None:
        """A replica reported the generation it applied (`primary`: this store's now)."""
        if self.closed:
            return
        with self._lock:
            f = self.followers.get(replica_id)
            if f is None:
                f = self.followers[replica_id] = Follower(replica_id, peer, applied)
            f.peer, f.applied, f.seen, f.connected = peer, applied, time.monotonic(), True
        if self.metrics is not None:
            self.metrics.set_follower_lag(replica_id, max(0, primary - applied))

    def gone(self, replica_id: str) -> None:
        """Its stream ended: it still holds the log for `grace_s`."""
        with self._lock:
            f = self.followers.get(replica_id)
            if f is not None:
                f.connected, f.seen = False, time.monotonic()

    def connected(self) -> list[str]:
        """The replicas following now."""
        with self._lock:
            return [f.replica_id for f in self.followers.values() if f.connected]

    def attach(self, wake: Callable[[], None]) -> Callable[[], None]:
        """A stream's waker, called by `closing`; returns what detaches it."""
        self._wakers.add(wake)
        return lambda: self._wakers.discard(wake)

    @contextlib.contextmanager
    def closing(self, bank: str, force: bool) -> Iterator[None]:
        """Around DropBank: refused while replicas follow (unless `force`); else every stream
        ends (and those reconnecting), so the drop need not wait for them. A drop that fails
        reopens the hub: its replicas follow again as they reconnect."""
        followers = self.connected()
        if followers and not force:
            raise FailedPrecondition(f"bank {bank!r} is followed by replicas on other hosts "
                                     f"({', '.join(followers)}): stop them first, or drop with force")
        self.closed = True
        for wake in list(self._wakers):
            wake()
        try:
            yield
        except BaseException:
            self.closed = False
            raise

    def describe(self, store_generation: int) -> list[dict[str, Any]]:
        """Each replica's lag, for GetInfo and the metrics."""
        now = time.monotonic()
        with self._lock:
            return [
                {"replica_id": f.replica_id, "peer": f.peer, "applied_store_generation": f.applied,
                 "generations_behind": max(0, store_generation - f.applied),
                 "seconds_since_seen": 0.0 if f.connected else now - f.seen,
                 "connected": f.connected}
                for f in self.followers.values()
            ]

    def trim_point(self, generation: int, own_need: int) -> int:
        """The generation the log may be trimmed to now (see the module docstring)."""
        now = time.monotonic()
        with self._lock:
            needs = [f.applied for f in self.followers.values()
                     if f.connected or now - f.seen < self.grace_s]
        floor = generation - self.retention
        return max(0, min(own_need, max(floor, min(needs, default=generation))))

    def trim_due(self) -> bool:
        """At most one trim every TRIM_EVERY_S, whichever stream asks."""
        now = time.monotonic()
        with self._lock:
            if now - self._trimmed_at < TRIM_EVERY_S:
                return False
            self._trimmed_at = now
            return True

    def trim(self, store: Store, bank: Bank) -> None:
        point = self.trim_point(int(store.generation), published_need(bank))
        if point > records.log_start(store):
            dropped = records.trim_log(store, point)
            log.info("change log of %s trimmed through generation %d (%d entries)",
                     bank.root, point, dropped)


def published_need(bank: Bank) -> int:
    """The oldest store generation a published index of this bank catches up from."""
    needs = []
    for gen in generations(bank.indexes_dir):
        with contextlib.suppress(OSError, ValueError, KeyError):
            manifest = json.loads((bank.indexes_dir / str(gen) / "manifest.json").read_text())
            needs.append(int(manifest["store_generation"]))
    return min(needs, default=1 << 62)


def _published(bank: Bank) -> tuple[int, int]:
    out = []
    for parent in (bank.indexes_dir, bank.heads_dir):
        try:
            out.append(current_generation(parent) or 0)
        except Exception:  # noqa: BLE001 - a damaged CURRENT publishes nothing
            out.append(0)
    return out[0], out[1]


def _parts(delta: records.Delta) -> list[pb.StoreDelta]:
    """The delta in messages of at most DELTA_PART_BYTES; the last one says complete."""
    parts, current, size = [], pb.StoreDelta(), 0
    for r in delta.records:
        current.records.add(db=r.db, key=r.key, value=r.value or b"", deleted=r.value is None)
        size += len(r.key) + len(r.value or b"") + 16
        if size >= DELTA_PART_BYTES:
            parts.append(current)
            current, size = pb.StoreDelta(), 0
    parts.append(current)
    for p in parts:
        p.after_generation, p.generation = delta.after, delta.generation
    parts[-1].complete = True
    return parts


async def follow_stream(
    engine: Engine, hub: Hub, requests: AsyncIterator[pb.FollowRequest], peer: str
) -> AsyncIterator[pb.StoreDelta]:
    """The FollowStore stream: deltas as commits land, heartbeats between them.

    It sleeps until this process commits to the store (Store.watch_commits) or the next
    heartbeat is due, whichever comes first: no polling while nothing changes, and a commit
    by another process (or a newly published generation) is seen at the next heartbeat.
    """
    first = await anext(aiter(requests), None)
    if first is None:
        return
    store, bank = engine.live.opened(), engine.bank
    replica_id = first.replica_id or peer
    sent = first.after_generation
    hub.seen(replica_id, peer, sent, int(store.generation))
    loop = asyncio.get_running_loop()
    woken = asyncio.Event()

    def wake() -> None:  # on the committing thread
        with contextlib.suppress(RuntimeError):  # the loop closed: nothing waits any more
            loop.call_soon_threadsafe(woken.set)

    async def acks() -> None:
        async for ack in requests:
            hub.seen(replica_id, peer, ack.after_generation, int(store.generation))

    ack_task = asyncio.ensure_future(acks())
    unwatch, detach = store.watch_commits(wake), hub.attach(wake)
    try:
        epoch = records.epoch(store)
        if first.store_epoch != epoch:
            yield pb.StoreDelta(rebootstrap=(
                f"the primary's store is environment {epoch}, not {first.store_epoch or 'none'} "
                "(compacted since the replica copied it)"))
            return
        beat, announced = 0.0, (0, 0)
        told: tuple[int, int] | None = (-1, -1)  # the decisions' stamp last sent (none yet)
        while not hub.closed:
            woken.clear()  # before looking: a commit from here on wakes the wait below
            published = _published(bank)
            stamp = decisions.stamp(bank)
            if stamp != told:
                yield pb.StoreDelta(primary_store_generation=sent, index_generation=published[0],
                                    head_generation=published[1], decisions_changed=True,
                                    quality_decisions=decisions.content(bank))
                told, beat, announced = stamp, time.monotonic(), published  # a heartbeat too
            if int(store.generation) > sent:
                try:
                    delta = await run_in(engine.compute, records.delta_after, store, sent)
                except LogTrimmed as e:
                    yield pb.StoreDelta(rebootstrap=f"the replica is too far behind: {e}")
                    return
                if delta.epoch != epoch:
                    yield pb.StoreDelta(rebootstrap=f"the primary's store was compacted ({delta.epoch})")
                    return
                for part in _parts(delta):
                    part.primary_store_generation = delta.generation
                    part.index_generation, part.head_generation = published
                    yield part
                sent, beat, announced = delta.generation, time.monotonic(), published
            elif published != announced or time.monotonic() - beat >= HEARTBEAT_S:
                yield pb.StoreDelta(primary_store_generation=sent, index_generation=published[0],
                                    head_generation=published[1])
                beat, announced = time.monotonic(), published
            if hub.trim_due():
                await run_in(engine.compute, hub.trim, store, bank)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), max(0.0, beat + HEARTBEAT_S - time.monotonic()))
    finally:
        detach()
        unwatch()
        ack_task.cancel()
        hub.gone(replica_id)
