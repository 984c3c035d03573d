"""Keeping the served index current without blocking reads or writes.

Why its own module: the engine's writes only commit to the store and catch the
live searcher up (its in-memory segment); everything that writes index files
happens here, off the writer thread, one publisher at a time (`publish_lock`):

- the first index of a bank that has none, after a write;
- checkpoints, which fold the segment into a new generation (index/checkpoint.py);
- RebuildIndex, which builds from a snapshot of the store while writes go on;
  the new searcher catches up with what was committed meanwhile before it is
  swapped in (the Classifier swaps models atomically).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from featurebank.core.bank import Bank, current_generation
from featurebank.core.errors import FailedPrecondition, NotFound, shown
from featurebank.index.checkpoint import Checkpointer, CheckpointPolicy
from featurebank.server.status import to_status

if TYPE_CHECKING:
    from featurebank.index.searcher import Searcher
    from featurebank.store import Store

log = logging.getLogger(__name__)


@dataclass
class Operation:
    """A background job (index rebuild) clients poll with GetOperation."""

    id: str
    kind: str
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    done: bool = False
    progress: float = 0.0
    stage: str = "queued"
    error: tuple[str, str] | None = None  # (status name, message)
    result: dict[str, Any] = field(default_factory=dict)
    index_generation: int = 0
    head_generation: int = 0


@dataclass(frozen=True)
class RebuildParams:
    """What RebuildIndex asked for: index overrides (None keeps the live params), head options."""

    index: dict[str, Any] = field(default_factory=dict)
    retrain_head: bool = False
    head_hidden: int | None = None  # None: the live head's (its HeadParams)
    head_epochs: int | None = None


def background_threads() -> int:
    """Threads for builds and folds: all cores but one, so serving keeps a core to itself."""
    return max(1, (os.cpu_count() or 1) - 1)


def build_k(count: int) -> int:
    """The k an index is tuned for: 10, or fewer on a tiny bank (a build refuses k > count)."""
    return max(1, min(10, count))


class IndexKeeper:
    """First builds, checkpoints and rebuilds of one served bank.

    `reload()` swaps the engine's models to the current generations and returns
    (index generation, head generation); `searcher()` is the live searcher or None.
    """

    def __init__(
        self,
        bank: Bank,
        store: Store,
        reload: Callable[[], tuple[int, int]],
        searcher: Callable[[], Searcher | None],
        policy: CheckpointPolicy,
    ) -> None:
        self.bank = bank
        self.store = store
        self._reload = reload
        self.publish_lock = threading.Lock()  # one index publisher at a time
        self._state_lock = threading.Lock()
        self.operations: dict[str, Operation] = {}
        self._rebuild: Operation | None = None
        self.background = ThreadPoolExecutor(1, thread_name_prefix="fb-rebuild")
        self.checkpointer = Checkpointer(policy, searcher, self._fold)
        self.repair_state: str | None = None  # set once a background repair starts

    def start(self) -> None:
        self.checkpointer.start()

    def close(self) -> None:
        self.checkpointer.stop()
        self.background.shutdown(wait=True)

    # ------------------------------------------------------------ first index, folds

    def ensure_index(self) -> bool:
        """Build the first index when the store has items and no index exists (True if built)."""
        from featurebank.index import build

        if current_generation(self.bank.indexes_dir) is not None:
            return False
        with self.publish_lock:
            if current_generation(self.bank.indexes_dir) is not None:
                return False
            count = int(self.store.count)
            if count == 0:
                return False
            build.build_index(self.store, k=build_k(count), threads=background_threads())
        self._reload()
        return True

    def _fold(self, why: str) -> dict[str, Any]:
        from featurebank.index.build import omp_threads
        from featurebank.index.fold import update_index

        with self.publish_lock, omp_threads(background_threads()):
            manifest = update_index(self.store)
        self._reload()
        log.info("checkpoint (%s) published index generation %s", why, manifest["generation"])
        return manifest

    def checkpoint_now(self) -> dict[str, Any] | None:
        """Fold whatever is pending now (tests and shutdown use it)."""
        return self.checkpointer.run_once(force=True)

    # ------------------------------------------------------------ rebuilds

    def start_rebuild(self, params: RebuildParams) -> Operation:
        from featurebank.index import build

        build.live_params(self.bank).override(**params.index)  # bad options fail the call
        with self._state_lock:
            running = self._rebuild
            if running is not None and not running.done:
                raise FailedPrecondition(
                    f"a rebuild is already running (operation {running.id}); poll GetOperation"
                )
            op = Operation(id=uuid.uuid4().hex, kind="rebuild")
            self.operations[op.id] = op
            self._rebuild = op
        self.background.submit(self._rebuild_job, op, params)
        return op

    def start_repair(self) -> None:
        """Rebuild damaged index and head generations from the store in the background,
        once (the server serves its fallback meanwhile); `repair_state` says how it went."""
        with self._state_lock:
            if self.repair_state is not None:
                return
            self.repair_state = "rebuilding the damaged generations in the background"
        self.background.submit(self._repair_job)

    def _repair_job(self) -> None:
        from featurebank.classify.repair import repair_derived

        actions: list[str] = []
        try:
            with self.publish_lock:
                repair_derived(self.bank, actions)
            self._reload()
            self.repair_state = f"repaired in the background: {'; '.join(actions) or 'nothing to do'}"
            log.info("%s", self.repair_state)
        except Exception as e:  # noqa: BLE001 - reported in GetInfo and the log
            _, message = to_status(e)
            self.repair_state = f"the background repair failed ({message}): run `featurebank store repair`"
            log.warning("%s", self.repair_state)

    def get_operation(self, op_id: str) -> Operation:
        try:
            return self.operations[op_id]
        except KeyError:
            raise NotFound(f"no operation {shown(op_id)} on this server") from None

    def _rebuild_job(self, op: Operation, params: RebuildParams) -> None:
        from featurebank.index import build

        try:
            with self.publish_lock:  # folds wait; reads and writes go on
                op.stage, op.progress = "building index", 0.05
                index = dict(params.index)
                if build.live_params(self.bank).k > int(self.store.count):
                    index.setdefault("k", build_k(int(self.store.count)))
                op.result["index"] = build.build_index(
                    self.store, threads=background_threads(), **index
                )
                if params.retrain_head:
                    from featurebank.classify import head_training

                    op.stage, op.progress = "training head", 0.6
                    # the live head's HeadParams, changed only where the caller named a value
                    op.result["head"] = head_training.train_head(
                        self.bank.root, hidden=params.head_hidden, epochs=params.head_epochs
                    )
                op.stage, op.progress = "catching up and swapping", 0.95
                op.index_generation, op.head_generation = self._reload()
            op.stage, op.progress = "done", 1.0
        except Exception as e:  # noqa: BLE001 - reported through GetOperation
            code, message = to_status(e)
            op.error = (code.name, message)
            op.stage = "failed"
            log.warning("rebuild %s failed: %s", op.id, message)
        finally:
            op.finished = time.time()
            op.done = True
