"""The replica's side of replication from a primary on another host (docs/scale.md).

`serve --replica --primary ADDR --data DIR` keeps DIR a copy of the primary's bank that
only this process writes, and serves it as a same-host replica serves its bank
(server/replica.py polls DIR and reloads what moved):

- bootstrap: an empty DIR copies a snapshot (`ReplicaSnapshot`) into `DIR/.bootstrap/`,
  checking each chunk's crc32 and each file's whole crc32; a dropped connection resumes from
  the file and offset already on disk (the state lives in `.bootstrap/state.json`), then
  the folders are moved into place and `DIR/replica.json` is written last.
- following: a `Puller` thread holds `FollowStore` open from the store's generation (the
  generation is committed with the records, so a restart or a cut resumes exactly where
  the last applied delta left it), applies each delta in one transaction and reports it
  back, and fetches newly published index and head generations (`generations_only`
  snapshots) into `indexes/` and `heads/`, switching CURRENT atomically; an index is
  installed once the store has reached the generation it covers.
- too far behind (the primary trimmed its log) or the primary compacted: a new snapshot
  is copied and swapped in as compaction swaps environments, and the log says why.
- its own change log is kept back to what its published indexes catch up from, as the
  primary's is (the primary's trims are not copied: each keeps what it needs).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from featurebank.core.bank import Bank, current_generation, prune, write_atomic
from featurebank.core.errors import DamagedFile, FailedPrecondition, InvalidInput, NotFound
from featurebank.server.replica import BankState, ReplicaEngine
from featurebank.server.replication import TRIM_EVERY_S, crc32_prefix, published_need
from featurebank.store import replication as records
from featurebank.v1 import featurebank_pb2 as pb
from featurebank.v1 import featurebank_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

STATE = "replica.json"
STAGING = ".bootstrap"
GENERATIONS_STAGING = ".generations"
RETRY_S = (0.05, 0.2, 0.5, 1.0, 2.0)  # reconnect backoff
SNAPSHOT_ATTEMPTS = 30
MAX_MESSAGE_BYTES = 64 << 20
WRITE_BYTES = 256 << 10  # each write() of a chunk (4 MiB writes measured 5x slower on ext4)

Progress = Callable[[int, int], None]  # (bytes held, bytes in the snapshot)


@dataclass(frozen=True)
class PrimaryLink:
    """How to reach the primary: its address, the bank there, and a token if it wants one."""

    address: str
    bank: str = ""
    token: str | None = None

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
        ])

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
        for attempt in range(SNAPSHOT_ATTEMPTS):
            try:
                self._stream(on_progress)
                assert self.header is not None
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
                log.info("snapshot stream from %s dropped (%s): resuming", self.link.address, code)
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
            writer = _Files(self.folder)
            try:
                for chunk in stream:
                    if chunk.snapshot_id:
                        self._start(chunk)
                        writer.sizes = {f["path"]: f for f in self.header["files"]}  # type: ignore[index]
                        self.resumed_at = writer.held()
                        continue
                    self.received += writer.write(chunk)
                    if on_progress is not None:
                        on_progress(writer.held(), writer.total())
            finally:
                writer.close()
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
    """Appends chunks to the files they belong to, checking offsets and crc32s."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.sizes: dict[str, dict[str, Any]] = {}
        self._open: tuple[str, Any, int] | None = None  # path, file, crc32 so far

    def held(self) -> int:
        return sum(min(f["size"], _size(self.folder / p)) for p, f in self.sizes.items())

    def total(self) -> int:
        return sum(f["size"] for f in self.sizes.values())

    def write(self, chunk: pb.SnapshotChunk) -> int:
        """Append one chunk; returns its size."""
        data = chunk.data  # each access to a bytes field copies it
        if zlib.crc32(data) != chunk.crc32:
            raise BadChunk(f"chunk of {chunk.path} at {chunk.offset} fails its crc32")
        f = self.sizes.get(chunk.path)
        if f is None:
            raise FailedPrecondition(f"the primary sent {chunk.path!r}, not in its snapshot")
        if self._open is None or self._open[0] != chunk.path:
            self.close()
            self._open = self._begin(chunk.path)
        path, out, crc = self._open
        if out.tell() != chunk.offset:
            raise BadChunk(f"{path}: chunk at {chunk.offset}, but {out.tell()} bytes held")
        view = memoryview(data)
        for s in range(0, len(view), WRITE_BYTES):  # large writes are several times slower
            out.write(view[s : s + WRITE_BYTES])
        crc = zlib.crc32(data, crc)
        self._open = (path, out, crc)
        if out.tell() >= f["size"]:
            out.flush()
            os.fsync(out.fileno())
            if crc != chunk.file_crc32:
                out.close()
                (self.folder / path).unlink()  # copied again from its start
                self._open = None
                raise BadChunk(f"{path} copied from the primary fails its crc32")
            self.close()
        return len(data)

    def _begin(self, path: str) -> tuple[str, Any, int]:
        target = self.folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        held = target.stat().st_size if target.exists() else 0  # resuming: what is on disk counts
        return path, target.open("ab"), crc32_prefix(target, held) if held else 0

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None


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


# ---------------------------------------------------------------- installing generations


def install_generation(staging: Path, bank: Bank, kind: str, generation: int) -> None:
    """Move `staging/<kind>/<gen>` into the bank and make it live (CURRENT replaced atomically)."""
    parent = bank.root / kind
    src = staging / kind / str(generation)
    if not src.is_dir():
        return
    parent.mkdir(exist_ok=True)
    if not (parent / str(generation)).exists():
        os.replace(src, parent / str(generation))
    write_atomic(parent / "CURRENT", f"{generation}\n".encode())
    prune(parent)


def index_covers(folder: Path) -> int:
    """The store generation a published index generation covers."""
    return int(json.loads((folder / "manifest.json").read_text())["store_generation"])


# ---------------------------------------------------------------- following


class Puller:
    """The thread that keeps a replica's DIR on the primary's commits and generations."""

    def __init__(self, link: PrimaryLink, data: Path) -> None:
        self.link, self.data, self.bank = link, data, Bank(data)
        state = read_state(data)
        if state is None:
            raise NotFound(f"{data} holds no replica yet ({STATE} missing)")
        self.state = state
        self.primary_generation = 0
        self.primary_index = current_generation(self.bank.indexes_dir) or 0
        self.primary_head = current_generation(self.bank.heads_dir) or 0
        self.connected = False
        self.error = ""
        self._trimmed_at = 0.0
        self._stop = threading.Event()
        self._channel: grpc.Channel | None = None
        self._thread = threading.Thread(target=self._run, name="fb-puller", daemon=True)
        from featurebank import store as store_mod
        from featurebank.store import env

        env.SYNC_META = False  # what a crash undoes here is copied again from the primary
        self.store = store_mod.open(data)  # the replica's only writer
        self.primary_generation = int(self.store.generation)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        channel = self._channel
        if channel is not None:
            channel.close()
        if self._thread.is_alive():
            self._thread.join(10)
        self.store.close()

    def upstream(self, local: BankState) -> BankState:
        """The primary's generations as its stream last said (for lag)."""
        return BankState(max(self.primary_generation, local.store_generation),
                         self.primary_index, self.primary_head)

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                self._follow()
                attempt = 0
            except grpc.RpcError as e:
                self.error = f"{e.code()}: {e.details()}"  # type: ignore[attr-defined]
            except Exception as e:  # noqa: BLE001 - logged, retried: the replica keeps serving
                self.error = f"{type(e).__name__}: {e}"
                log.warning("following %s failed: %s", self.link.address, self.error)
            self.connected = False
            if self._stop.is_set():
                return
            log.info("follow stream from %s ended (%s): reconnecting", self.link.address,
                     self.error or "closed")
            self._stop.wait(RETRY_S[min(attempt, len(RETRY_S) - 1)])
            attempt += 1

    def _follow(self) -> None:
        acks: queue.Queue[pb.FollowRequest | None] = queue.Queue()
        first = pb.FollowRequest(
            bank=self.link.bank, after_generation=int(self.store.generation),
            store_epoch=self.state["store_epoch"], replica_id=self.state["replica_id"],
        )

        def requests() -> Iterator[pb.FollowRequest]:
            yield first
            while (ack := acks.get()) is not None:
                yield ack

        channel = self._channel = self.link.channel()
        try:
            stream = pb_grpc.FeatureBankStub(channel).FollowStore(requests(), metadata=self.link.metadata)
            parts: list[records.Record] = []
            for msg in stream:
                self.connected, self.error = True, ""
                if msg.rebootstrap:
                    log.warning("bootstrapping again from %s: %s", self.link.address, msg.rebootstrap)
                    self.rebootstrap()
                    return
                self.primary_generation = max(self.primary_generation, msg.primary_store_generation)
                self.primary_index, self.primary_head = msg.index_generation, msg.head_generation
                parts += [records.Record(r.db, r.key, None if r.deleted else r.value) for r in msg.records]
                if msg.complete:
                    records.apply(self.store, parts, msg.after_generation, msg.generation)
                    parts = []
                    acks.put(pb.FollowRequest(after_generation=msg.generation))
                self._fetch_generations()
                self._trim_log()
        finally:
            acks.put(None)
            channel.close()
            self._channel = None

    def _trim_log(self) -> None:
        """Keep the local change log back to what the local indexes catch up from only."""
        now = time.monotonic()
        if now - self._trimmed_at < TRIM_EVERY_S:
            return
        self._trimmed_at = now
        need = min(published_need(self.bank), int(self.store.generation))
        if need > records.log_start(self.store):
            records.trim_log(self.store, need)

    def _fetch_generations(self) -> None:
        """Copy and install the primary's published generations this replica lacks."""
        local = (current_generation(self.bank.indexes_dir) or 0, current_generation(self.bank.heads_dir) or 0)
        if (self.primary_index, self.primary_head) == local or self.primary_index < local[0]:
            return
        staging = self.data / GENERATIONS_STAGING
        header = self._pending_or_fetch(staging)
        index_gen, head_gen = header["index_generation"], header["head_generation"]
        if index_gen and index_gen != local[0]:
            if index_covers(staging / "indexes" / str(index_gen)) > int(self.store.generation):
                return  # installed once the store holds what it covers
            install_generation(staging, self.bank, "indexes", index_gen)
        if head_gen and head_gen != local[1]:
            install_generation(staging, self.bank, "heads", head_gen)
        shutil.rmtree(staging, ignore_errors=True)

    def _pending_or_fetch(self, staging: Path) -> dict[str, Any]:
        download = Download(self.link, staging, generations_only=True)
        if download.header is not None and download.header["index_generation"] < self.primary_index:
            download._reset()  # a newer generation was published meanwhile
        return download.run()

    def rebootstrap(self) -> None:
        """Copy a new snapshot and swap it in as compaction swaps environments."""
        staging = self.data / STAGING
        shutil.rmtree(staging, ignore_errors=True)
        header = Download(self.link, staging).run()
        store_dir = self.bank.store_dir
        live = (store_dir / "CURRENT").read_text().strip()
        env = f"env-{int(live.split('-')[1]) + 1}"
        new = next((staging / "store").glob("env-*"))
        os.replace(new, store_dir / env)
        write_atomic(store_dir / "CURRENT", f"{env}\n".encode())
        shutil.rmtree(store_dir / live, ignore_errors=True)
        for kind, gen in (("indexes", header["index_generation"]), ("heads", header["head_generation"])):
            if gen:
                install_generation(staging, self.bank, kind, gen)
        self.state = {**self.state, "store_epoch": header["store_epoch"],
                      "bootstraps": int(self.state.get("bootstraps", 1)) + 1}
        write_state(self.data, self.state)
        shutil.rmtree(staging, ignore_errors=True)
        log.warning("replica %s copied store generation %d again (bootstrap %d)", self.data,
                    header["store_generation"], self.state["bootstraps"])

    def lag(self) -> dict[str, Any]:
        return {"follows": f"primary {self.link.address} over gRPC",
                "primary": self.link.address,
                "primary_store_generation": self.primary_generation,
                "bootstraps": int(self.state.get("bootstraps", 1))}


class RemoteReplicaEngine(ReplicaEngine):
    """A ReplicaEngine over DIR, with the Puller that keeps DIR on the primary."""

    def __init__(self, bank: str | Path, *, link: PrimaryLink, **kwargs: Any) -> None:
        super().__init__(bank, primary=link.address, **kwargs)
        self.link = link
        self.puller: Puller | None = None
        follower = self.follower
        self.info.extra = lambda: {"replica": {**follower.lag(), **self._puller_lag()}}

    def _puller_lag(self) -> dict[str, Any]:
        return self.puller.lag() if self.puller is not None else {}

    def open(self) -> None:
        self.puller = Puller(self.link, Path(self.bank.root))
        super().open()
        self.puller.start()

    def upstream(self, local: BankState) -> BankState:
        return self.puller.upstream(local) if self.puller is not None else local

    def _close_sync(self) -> None:
        if self.puller is not None:
            self.puller.stop()
        super()._close_sync()

