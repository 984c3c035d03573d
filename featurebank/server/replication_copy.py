"""Copying a snapshot of the primary's bank into a replica's folder, resumably.

`ReplicaSnapshot` streams a snapshot's files in chunks (server/replication.py); a
`Download` appends them to the files they belong to under its folder, checking each
chunk's crc32, its offset, and each file's whole crc32 on its last chunk. What is on disk
is the state: after a dropped connection (or a restart of either side) it asks for the
same snapshot from the first file not complete and the bytes of it already held; a chunk
or file that fails its check is removed and copied again; a snapshot the primary no longer
keeps is started over. `bootstrap` makes an empty `--data` folder a bank this way, moving
the copied folders into place and writing `DIR/replica.json` last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from featurebank.core.bank import write_atomic
from featurebank.core.errors import DamagedFile, FailedPrecondition, InvalidInput
from featurebank.core.memory import streaming_buffers
from featurebank.server.checksums import crc32, crc32_combine, crc32_prefix
from featurebank.server.disk import Appender, preallocate
from featurebank.v1 import featurebank_pb2 as pb
from featurebank.v1 import featurebank_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

STATE = "replica.json"
STAGING = ".bootstrap"
RETRY_S = (0.05, 0.2, 0.5, 1.0, 2.0)  # reconnect backoff
SNAPSHOT_SILENT_S = 60.0  # no chunk for this long: the connection is dead (Watchdog)
SNAPSHOT_ATTEMPTS = 30
MAX_MESSAGE_BYTES = 64 << 20
QUEUED_CHUNKS = 4  # chunks received but not yet written, at most

Progress = Callable[[int, int], None]  # (bytes held, bytes in the snapshot)


@dataclass(frozen=True)
class PrimaryLink:
    """How to reach the primary: its address, the bank there, a token if it wants one, and
    the CA its TLS certificate chains to (None: plaintext)."""

    address: str
    bank: str = ""
    token: str | None = None
    tls_ca: Path | None = None

    def channel(self) -> grpc.Channel:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
        ]
        if self.tls_ca is None:
            return grpc.insecure_channel(self.address, options=options)
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(self.tls_ca).read_bytes())
        return grpc.secure_channel(self.address, credentials, options=options)

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []


def read_state(data: Path) -> dict[str, Any] | None:
    """DIR/replica.json: written once a bootstrap completed (None before)."""
    try:
        state: dict[str, Any] = json.loads((data / STATE).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise DamagedFile(f"{data / STATE} is damaged: remove {data} to copy the bank again") from None
    return state


def write_state(data: Path, state: dict[str, Any]) -> None:
    write_atomic(data / STATE, json.dumps(state, indent=1).encode())


# ---------------------------------------------------------------- copying a snapshot


class Watchdog:
    """Cancels a stream from the primary silent for `silent_s` while the replica waits on it.

    The primary sends a follow stream a heartbeat every second and a snapshot stream its
    chunks back to back, so silence means a connection that is open
    but dead (a host gone without closing it, a listener that accepts and never answers),
    which TCP and gRPC keepalive would notice only after many seconds. Time spent applying
    what it receives (a delta, a chunk on a slow disk) does not count. The stream's channel
    is closed too: a call gRPC is still retrying on a new connection (after the primary
    went away before it answered) is not always ended by cancelling it alone.
    """

    def __init__(self, call: Any, channel: grpc.Channel, silent_s: float) -> None:
        self._call, self._channel, self._silent_s = call, channel, silent_s
        self._waiting_since: float | None = time.monotonic()
        self._done = threading.Event()
        threading.Thread(target=self._watch, name="fb-stream-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Around the work on a message received: not silence."""
        self._waiting_since = None
        try:
            yield
        finally:
            self._waiting_since = time.monotonic()

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self._silent_s / 4)):
            since = self._waiting_since
            if since is not None and time.monotonic() - since > self._silent_s:
                log.warning("stream from the primary silent for %.0f s: reconnecting", self._silent_s)
                self._call.cancel()
                self._channel.close()
                return


class Download:
    """One snapshot being copied into `folder`, resumable from what is on disk."""

    def __init__(self, link: PrimaryLink, folder: Path, generations_only: bool = False) -> None:
        self.link, self.folder, self.generations_only = link, folder, generations_only
        self.state_path = folder / "state.json"
        self.header: dict[str, Any] | None = None
        self.received = 0  # bytes received by this process (not those resumed from disk)
        self.resumed_at = 0  # bytes already on disk when the last stream started
        if self.state_path.exists():
            self.header = json.loads(self.state_path.read_text())

    def run(self, on_progress: Progress | None = None) -> dict[str, Any]:
        """Copy until complete, reconnecting after a dropped connection; returns the header."""
        with streaming_buffers():
            return self._copy(on_progress)

    def _copy(self, on_progress: Progress | None) -> dict[str, Any]:
        for attempt in range(SNAPSHOT_ATTEMPTS):
            try:
                self._stream(on_progress)
                assert self.header is not None
                sync_files(self.folder, [f["path"] for f in self.header["files"]])
                return self.header
            except BadChunk as e:  # the damaged file was removed: copied again from its start
                log.warning("%s: copying it again", e)
                continue
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                if code == grpc.StatusCode.NOT_FOUND and self.header is not None:
                    log.warning("snapshot %s expired on the primary: starting a new one",
                                self.header["id"])
                    self._reset()
                    continue
                if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                            grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                    raise FailedPrecondition(
                        f"the primary {self.link.address} refused the snapshot: {e.details()}"  # type: ignore[attr-defined]
                    ) from None
                log.log(logging.WARNING if attempt >= len(RETRY_S) else logging.INFO,
                        "snapshot stream from %s dropped (%s): resuming", self.link.address, code)
                time.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])
        raise FailedPrecondition(f"could not copy a snapshot from {self.link.address} "
                                 f"after {SNAPSHOT_ATTEMPTS} attempts")

    def _reset(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.header = None

    def _where(self) -> tuple[str, int]:
        """The first file not complete on disk and how much of it is."""
        assert self.header is not None
        for f in self.header["files"]:
            p = self.folder / f["path"]
            held = p.stat().st_size if p.exists() else 0
            if held < f["size"] or not p.exists():
                return f["path"], held
        return "", -1

    def _stream(self, on_progress: Progress | None) -> None:
        request = pb.SnapshotRequest(bank=self.link.bank, generations_only=self.generations_only)
        if self.header is not None:
            path, offset = self._where()
            if offset < 0:
                return  # everything is on disk
            request.snapshot_id, request.path, request.offset = self.header["id"], path, offset
        with self.link.channel() as channel:
            stub = pb_grpc.FeatureBankStub(channel)
            stream = stub.ReplicaSnapshot(request, metadata=self.link.metadata)
            watchdog = Watchdog(stream, channel, SNAPSHOT_SILENT_S)
            writer: _Files | None = None
            try:
                for chunk in stream:
                    with watchdog.busy():
                        if chunk.snapshot_id:
                            self._start(chunk)
                            assert self.header is not None
                            writer = _Files(self.folder, self.header["files"])
                            self.resumed_at = writer.resumed
                            continue
                        if writer is None:
                            raise FailedPrecondition(f"the snapshot stream from {self.link.address} "
                                                     "sent data before its header")
                        writer.put(chunk)
                        if on_progress is not None:
                            on_progress(writer.held(), writer.total())
            finally:
                watchdog.stop()
                if writer is not None:
                    writer.close()
                    self.received += writer.written
        if writer is not None:
            writer.check()
        if self.header is None or self._where()[1] >= 0:
            raise FailedPrecondition(f"the snapshot stream from {self.link.address} ended early")

    def _start(self, chunk: pb.SnapshotChunk) -> None:
        if self.header is not None and chunk.snapshot_id != self.header["id"]:
            self._reset()
        if self.header is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.header = {
                "id": chunk.snapshot_id, "store_generation": chunk.store_generation,
                "store_epoch": chunk.store_epoch, "index_generation": chunk.index_generation,
                "head_generation": chunk.head_generation,
                "files": [{"path": f.path, "size": f.size} for f in chunk.files],
            }
            for f in self.header["files"]:
                _safe(f["path"])
            write_atomic(self.state_path, json.dumps(self.header).encode())


class BadChunk(FailedPrecondition):
    """A chunk or a file that does not match its crc32 (or its offset)."""


def _safe(path: str) -> str:
    """A snapshot's path must stay inside the folder it is copied into."""
    parts = Path(path).parts
    if not parts or Path(path).is_absolute() or ".." in parts or parts[0] in (STAGING, STATE, "state.json"):
        raise InvalidInput(f"the primary sent a file path outside the bank: {path!r}")
    return path


class _Files:
    """Writes chunks into the files they belong to on its own thread, checking offsets and
    crc32s: os.write lets go of the GIL, so checking and writing one chunk
    overlaps receiving the next (a bounded queue between them). Each file is allocated
    ahead and written past the page cache where it can be (server/disk.py); a file complete
    is fsynced on a thread of its own while the next one streams."""

    def __init__(self, folder: Path, files: list[dict[str, Any]]) -> None:
        self.folder = folder
        self.sizes = {f["path"]: int(f["size"]) for f in files}
        self.resumed = sum(min(size, _size(folder / p)) for p, size in self.sizes.items())
        self.written = 0  # bytes this writer wrote
        self._open: _OpenFile | None = None
        self._syncing: list[threading.Thread] = []  # fsyncs of the files completed
        self._error: BaseException | None = None
        self._queue: queue.Queue[pb.SnapshotChunk | None] = queue.Queue(QUEUED_CHUNKS)
        self._thread = threading.Thread(target=self._run, name="fb-snapshot-writer", daemon=True)
        self._thread.start()

    def held(self) -> int:
        return self.resumed + self.written

    def total(self) -> int:
        return sum(self.sizes.values())

    def put(self, chunk: pb.SnapshotChunk) -> None:
        """Queue a chunk; raises what the writer met with an earlier one."""
        self.check()
        if chunk.path not in self.sizes:
            raise FailedPrecondition(f"the primary sent {chunk.path!r}, not in its snapshot")
        self._queue.put(chunk)

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Write what is queued (up to a failed chunk), close the file open, and wait for the
        fsyncs of the files completed."""
        self._queue.put(None)
        self._thread.join()
        for t in self._syncing:
            t.join()

    def _run(self) -> None:
        try:
            while (chunk := self._queue.get()) is not None:
                if self._error is None:
                    try:
                        self._write(chunk)
                    except BaseException as e:  # noqa: BLE001 - raised by put/check
                        self._error = e
        finally:
            self._close_file()

    def _write(self, chunk: pb.SnapshotChunk) -> None:
        data = chunk.data  # each access to a bytes field copies it
        if crc32(data) != chunk.crc32:
            raise BadChunk(f"chunk of {chunk.path} at {chunk.offset} fails its crc32")
        if self._open is None or self._open.path != chunk.path:
            self._close_file()
            self._open = self._begin(chunk.path)
        f = self._open
        if f.out.size != chunk.offset:
            raise BadChunk(f"{f.path}: chunk at {chunk.offset}, but {f.out.size} bytes held")
        f.out.append(data)
        f.crc = crc32_combine(f.crc, chunk.crc32, len(data))
        self.written += len(data)
        if f.out.size >= self.sizes[f.path]:
            self._open = None
            if f.crc != chunk.file_crc32:
                f.out.close()
                (self.folder / f.path).unlink()  # copied again from its start
                raise BadChunk(f"{f.path} copied from the primary fails its crc32")
            sync = threading.Thread(target=f.out.sync_and_close, name="fb-snapshot-fsync")
            sync.start()  # while the next file streams
            self._syncing.append(sync)

    def _begin(self, path: str) -> _OpenFile:
        target = self.folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        out = Appender(target)  # resuming: its size is what is on disk
        preallocate(out.fd, out.size, self.sizes[path] - out.size)
        return _OpenFile(path, out, crc32_prefix(target, out.size) if out.size else 0)

    def _close_file(self) -> None:
        if self._open is not None:
            self._open.out.close()
            self._open = None


@dataclass
class _OpenFile:
    path: str
    out: Appender  # its size: the bytes of the file on disk
    crc: int  # crc32 of those


def sync_files(folder: Path, paths: list[str]) -> None:
    """fsync every file of a copy (those this process wrote are synced already; those a
    stopped one left may not be), so it is durable before it is moved into place."""
    for p in paths:
        fd = os.open(folder / p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


def bootstrap(
    link: PrimaryLink, data: Path, on_progress: Progress | None = None
) -> dict[str, Any]:
    """Make `data` a copy of the primary's bank (resuming a copy left half done)."""
    state = read_state(data)
    if state is not None:
        return state
    resuming = (data / STAGING / "state.json").exists()
    if data.exists() and not resuming and any(p.name != STAGING for p in data.iterdir()):
        raise FailedPrecondition(
            f"--data {data} is not empty and holds no replica ({STATE} missing): give an empty "
            "folder, or the folder this replica used before"
        )
    started = time.monotonic()
    download = Download(link, data / STAGING)
    header = download.run(on_progress)
    for name in ("store", "models", "indexes", "heads"):
        if (data / STAGING / name).exists():
            shutil.rmtree(data / name, ignore_errors=True)  # left by a start that stopped here
            os.replace(data / STAGING / name, data / name)
    state = {
        "replica_id": uuid.uuid4().hex[:12], "primary": link.address, "bank": link.bank,
        "store_epoch": header["store_epoch"], "bootstraps": 1,
        "bootstrap_seconds": round(time.monotonic() - started, 3),
        "bootstrap_bytes": sum(f["size"] for f in header["files"]),
    }
    write_state(data, state)
    shutil.rmtree(data / STAGING, ignore_errors=True)
    log.info("copied %.1f MiB from %s in %.2fs (store generation %d)",
             state["bootstrap_bytes"] / 2**20, link.address, state["bootstrap_seconds"],
             header["store_generation"])
    return state
