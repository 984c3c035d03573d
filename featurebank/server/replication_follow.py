"""The replica's side of replication from a primary on another host (docs/scale.md).

`serve --replica --primary ADDR --data DIR` keeps DIR a copy of the primary's bank that
only this process writes, and serves it as a same-host replica serves its bank
(server/replica.py polls DIR and reloads what moved):

- bootstrap: an empty DIR is filled from a snapshot first (server/replication_copy.py).
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from featurebank.classify.quality import decisions
from featurebank.core.bank import Bank, current_generation, prune, write_atomic
from featurebank.core.errors import NotFound
from featurebank.server import replication
from featurebank.server.replica import BankState, ReplicaEngine
from featurebank.server.replication import TRIM_EVERY_S, published_need
from featurebank.server.replication_copy import (
    RETRY_S,
    STAGING,
    STATE,
    Download,
    PrimaryLink,
    Watchdog,
    read_state,
    write_state,
)
from featurebank.store import replication as records
from featurebank.v1 import featurebank_pb2 as pb
from featurebank.v1 import featurebank_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

GENERATIONS_STAGING = ".generations"
SILENT_BEATS = 5  # heartbeats missed before a stream counts as cut (a half-open connection)


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
            log.log(logging.WARNING if attempt >= len(RETRY_S) else logging.INFO,  # a run of them
                    "follow stream from %s ended (%s): reconnecting", self.link.address,
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
        stream = pb_grpc.FeatureBankStub(channel).FollowStore(requests(), metadata=self.link.metadata)
        watchdog = Watchdog(stream, channel, SILENT_BEATS * replication.HEARTBEAT_S)
        try:
            parts: list[records.Record] = []
            for msg in stream:
                with watchdog.busy():
                    self.connected, self.error = True, ""
                    if msg.rebootstrap:
                        log.warning("bootstrapping again from %s: %s", self.link.address, msg.rebootstrap)
                        self.rebootstrap()
                        return
                    self.primary_generation = max(self.primary_generation, msg.primary_store_generation)
                    self.primary_index, self.primary_head = msg.index_generation, msg.head_generation
                    parts += [records.Record(r.db, r.key, None if r.deleted else r.value) for r in msg.records]
                    if msg.decisions_changed:
                        decisions.install(self.bank, msg.quality_decisions)
                    if msg.complete:
                        records.apply(self.store, parts, msg.after_generation, msg.generation)
                        parts = []
                        acks.put(pb.FollowRequest(after_generation=msg.generation))
                    self._fetch_generations()
                    self._trim_log()
        finally:
            watchdog.stop()
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

