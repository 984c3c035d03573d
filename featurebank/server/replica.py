"""Read replicas: a server that opens a bank read-only and follows what its primary publishes.

A replica answers Classify, ClassifyBatch, Search, Embed and GetInfo from the same bank
directory the primary writes (same host, local filesystem: see docs/scale.md), and
refuses every write RPC with FAILED_PRECONDITION naming the primary. The other read RPCs
(Suggest, Audit, GetThumbnails, GetReport) are served too: only what changes the bank, or
follows a job of the primary (GetOperation), is refused.

Following, the way a restarting primary catches up: a `Follower` thread polls, every
`follow_interval_s`, the store's committed generation (LMDB readers in another process see
each commit as a consistent snapshot), `indexes/CURRENT` and `heads/CURRENT` (published
generations, switched atomically). When any of them moved, the engine reloads as the
primary does after a publish: the classifier swaps index and head at once, and the
searcher catches up from the store's change log (new items into its in-memory segment,
deletions filtered, labels swapped); calls in flight keep the snapshot they started with.
Each search also catches the searcher up with the store before it runs.

Freshness bound: a commit the primary has acknowledged is answered by a replica at its
next search, at the latest one follow interval later, plus the time to apply it
(proportional to the changes); a published generation within one interval plus the time
to load its index. `GetInfo.replica` reports how far behind the replica is at any moment.

Health: if the bank cannot be read (its directory gone, a generation missing, the store
failing) for `FAILURES_BEFORE_NOT_SERVING` polls in a row, the replica goes NOT_SERVING
and answers every call with UNAVAILABLE instead of answering from a bank it can no
longer see; it returns to SERVING at the first poll that reads the bank again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from featurebank.core.bank import current_generation
from featurebank.core.errors import DamagedFile, FailedPrecondition, InvalidInput
from featurebank.server.auth import REPLICATE, WRITE, aborting_handler, required_role
from featurebank.server.engine import Engine
from featurebank.server.following import follow, unfollow

log = logging.getLogger(__name__)

DEFAULT_FOLLOW_INTERVAL_S = 0.2
FAILURES_BEFORE_NOT_SERVING = 3


def refusal(method: str, primary: str | None) -> str:
    """What a replica answers to a call only the primary serves: where to send it."""
    where = f"the primary at {primary}" if primary else "the primary (address not configured: --primary)"
    return f"{method} is served by the primary only; this server is a read replica: send it to {where}"


@dataclass(frozen=True)
class BankState:
    """What a replica compares between polls: the generations that change answers."""

    store_generation: int
    index_generation: int  # 0 = none published
    head_generation: int  # 0 = none published


def read_bank_state(engine: Engine) -> BankState:
    """The bank's committed and published generations, read fresh from disk.

    Raises when the bank cannot be read (its folder gone, the store failing); a published
    index generation whose folder is missing counts as unreadable too.
    """
    bank = engine.bank
    store_gen = int(engine.live.opened().generation)
    index_gen = _published(bank.indexes_dir)
    if index_gen > 0 and not (bank.indexes_dir / str(index_gen)).is_dir():
        raise FailedPrecondition(f"index generation {index_gen} of {bank.root} is missing")
    return BankState(store_gen, index_gen, _published(bank.heads_dir))


def _published(parent: Path) -> int:
    """CURRENT's generation (0: none); -1 when CURRENT is damaged, which the models are
    loaded around (the newest intact generation is served), not waited on."""
    try:
        return current_generation(parent) or 0
    except DamagedFile:
        return -1


class ReplicaEngine(Engine):
    """An Engine over a bank opened read-only, kept current by a `Follower`."""

    def __init__(
        self,
        bank: str | Path,
        *,
        primary: str | None = None,
        follow_interval_s: float = DEFAULT_FOLLOW_INTERVAL_S,
        **kwargs: Any,
    ) -> None:
        if follow_interval_s <= 0:
            raise InvalidInput(f"--follow-interval must be > 0 seconds, got {follow_interval_s}")
        super().__init__(bank, **kwargs)
        self.primary = primary
        self.failure: str | None = None  # why the bank cannot be read now
        self.follower = Follower(self, follow_interval_s)
        self._follow_mark: int | None = None
        self.info.extra = lambda: {"replica": self.follower.lag()}

    def open(self) -> None:
        """Open the store read-only (no writer lock), load the models, start following."""
        from featurebank import store as store_mod

        self.live.store = store_mod.open(self.bank.root, readonly=True)
        self._follow_mark = follow(self.bank.root)  # DropBank on the primary sees it
        self._open_embedder()
        self.follower.start()  # its first step loads the models

    @property
    def ready(self) -> bool:
        return self.models is not None and self.failure is None

    def unreadable(self) -> str | None:
        """Why a call must not be answered now (the bank cannot be read), or None."""
        if self.failure is None:
            return None
        return f"read replica cannot read its bank ({self.failure})"

    def loading(self) -> str | None:
        """Why a classify or search call must wait: the follower's first step has neither
        loaded the models nor found that there are none (so a client or load balancer
        retries elsewhere instead of taking "no index yet"), or None."""
        if self.live.models is None and self.live.load_error is None:
            return "read replica is still loading its bank"
        return None

    def set_failure(self, failure: str | None) -> None:
        """Record whether the bank is readable; health follows when that changes."""
        if failure == self.failure:
            return
        was_ready = self.ready
        self.failure = failure
        if failure is None:
            log.info("replica reads %s again", self.bank.root)
        else:
            log.warning("replica cannot read %s: %s", self.bank.root, failure)
        if self.ready != was_ready and self.on_ready is not None:
            self.on_ready(self.ready)

    def reload(self) -> None:
        """Swap to the bank's current generations, as the primary does after publishing.

        Only the follower's thread reloads: a replica has no other publisher to exclude.
        """
        self._load_models()
        if self.live.load_error is not None and self.models is not None:
            raise FailedPrecondition(self.live.load_error)  # serving the old models, but failing

    def upstream(self, local: BankState) -> BankState:
        """The generations this replica follows: its bank's own (a replica on another host
        reports its primary's)."""
        return local

    def applied_store_generation(self) -> int:
        m = self.models
        return int(m.searcher.store_generation) if m is not None else 0

    def _close_sync(self) -> None:
        self.follower.stop()
        super()._close_sync()
        unfollow(self._follow_mark)
        self._follow_mark = None


class Follower:
    """The thread that keeps a ReplicaEngine on the bank's latest generations."""

    def __init__(self, engine: ReplicaEngine, interval_s: float) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.applied: BankState | None = None
        self.caught_up_at = time.monotonic()
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fb-follower", daemon=True)

    def start(self) -> None:
        self.step()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.step()

    def step(self) -> None:
        """One poll: read the bank's generations, reload if they moved, update health."""
        engine = self.engine
        try:
            state = read_bank_state(engine)
            if state != self.applied:
                engine.reload()
                self.applied = state
            self.caught_up_at = time.monotonic()
            self.failures = 0
            engine.set_failure(None)
            lag = self.lag(state)
            self._export(lag["generations_behind"], lag["seconds_behind"])
        except Exception as e:  # noqa: BLE001 - any failure to read the bank counts
            self.failures += 1
            log.debug("follow step failed (%d in a row): %s", self.failures, e)
            if self.failures >= FAILURES_BEFORE_NOT_SERVING:
                engine.set_failure(f"{type(e).__name__}: {e}")
            self._export(None, time.monotonic() - self.caught_up_at)

    def _export(self, generations_behind: int | None, seconds_behind: float) -> None:
        metrics = self.engine.metrics
        if metrics is None:
            return
        metrics.set_replica_lag(generations_behind, seconds_behind)

    def lag(self, bank: BankState | None = None) -> dict[str, Any]:
        """How far the replica is behind `bank` (default: the bank as it is now; for GetInfo)."""
        engine = self.engine
        bank = engine.upstream(bank or read_bank_state(engine))
        applied = engine.applied_store_generation()
        behind = max(0, bank.store_generation - applied)
        served = (engine.live.index_generation(), engine.live.head_generation())
        caught_up = behind == 0 and served == (bank.index_generation, bank.head_generation)
        return {
            "primary": engine.primary or "",
            "bank_store_generation": bank.store_generation,
            "applied_store_generation": applied,
            "generations_behind": behind,
            "bank_index_generation": bank.index_generation,
            "bank_head_generation": bank.head_generation,
            "seconds_behind": 0.0 if caught_up else time.monotonic() - self.caught_up_at,
            "follow_interval_s": self.interval_s,
            "healthy": engine.failure is None,
            "error": engine.failure or "",
        }


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]
OnRefused = Callable[[str, grpc.StatusCode], None]


class ReplicaInterceptor(aio.ServerInterceptor):
    """Refuses write RPCs before their request is read (a replica never embeds an Upsert);
    health and reflection always pass. (A bank that cannot be read answers UNAVAILABLE
    from the router, server/router.py: only the call names which bank it asks.)"""

    def __init__(self, primary: str | None, on_refused: OnRefused | None = None) -> None:
        self.primary = primary
        self.on_refused = on_refused

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        role = required_role(method)
        if handler is None or role is None:
            return handler
        name = method.rsplit("/", 1)[-1]
        if role in (WRITE, REPLICATE):  # replicas do not feed other replicas
            return self._refused(handler, method, grpc.StatusCode.FAILED_PRECONDITION,
                                 refusal(name, self.primary))
        return handler

    def _refused(
        self, handler: grpc.RpcMethodHandler, method: str, code: grpc.StatusCode, details: str
    ) -> grpc.RpcMethodHandler:
        if self.on_refused is not None:
            self.on_refused(method, code)
        return aborting_handler(handler, code, details)
