"""One bank opened for serving: the composition root and its lifecycle.

The engine opens the bank's store (the server is its single writer), loads and swaps
the live Classifier and Searcher, opens the Embedder for image inputs, and owns the
executors that keep Keras, FAISS and LMDB work off the event loop. What a call does
lives in the parts it composes: `reads` (embed, classify, search, in dynamic
batches), `writes` (upsert, labels, delete, on the one writer thread), `info`
(GetInfo, suggest, audit, report) and the index keeper (first builds, checkpoints,
rebuilds: server/indexing.py). They share the bank's state through `live`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featurebank.core.bank import Bank
from featurebank.core.errors import FailedPrecondition
from featurebank.index.checkpoint import CheckpointPolicy
from featurebank.server.bounds import (
    DEFAULT_BATCH_TIMEOUT_MS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUED_ROWS,
    DEFAULT_SEARCH_THREADS,
)
from featurebank.server.indexing import IndexKeeper, Operation, RebuildParams
from featurebank.server.info import Info
from featurebank.server.live import Live, Models
from featurebank.server.metrics import Metrics
from featurebank.server.reads import Reads
from featurebank.server.shared_batches import SharedBatches
from featurebank.server.shared_models import ModelPool, SharedModel
from featurebank.server.writes import Writes

if TYPE_CHECKING:
    from featurebank.embedder.embedding import Embedder
    from featurebank.store import Store

log = logging.getLogger(__name__)


class Engine:
    """One bank opened for serving: `open()`, then the parts' async methods, then `close()`."""

    def __init__(
        self,
        bank: str | Path,
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        batch_timeout_ms: float = DEFAULT_BATCH_TIMEOUT_MS,
        metrics: Metrics | None = None,
        search_threads: int = DEFAULT_SEARCH_THREADS,
        device: str = "auto",
        precision: str = "auto",
        checkpoint: CheckpointPolicy | None = None,
        max_queued_rows: int = DEFAULT_MAX_QUEUED_ROWS,
        models: ModelPool | None = None,
        compute: ThreadPoolExecutor | None = None,
        batches: SharedBatches | None = None,
    ) -> None:
        self.bank = Bank(bank)
        self.model_pool = models  # shared with other banks of the server (same backbone)
        self._shared: SharedModel | None = None
        self.device, self.precision = device, precision
        self.metrics = metrics
        self.live = Live(self.bank, metrics)
        self.checkpoint_policy = checkpoint or CheckpointPolicy()
        # Banks of one server share its search threads: FAISS work of many banks at once
        # would otherwise oversubscribe the cores (each search also runs threads of its own).
        self._own_compute = compute is None
        self.compute = compute or ThreadPoolExecutor(search_threads, thread_name_prefix="fb-search")
        self.embed_pool = ThreadPoolExecutor(1, thread_name_prefix="fb-embed")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="fb-writer")
        self.reads = Reads(
            self.live, self.compute, self.embed_pool,
            max_batch_size=max_batch_size, batch_timeout_ms=batch_timeout_ms,
            search_threads=search_threads,
            on_batch=self._on_batch if metrics is not None else None, shared=batches,
        )
        self.writes = Writes(self.live, self.writer, max_queued_rows)
        self.info = Info(self.live, self.compute, self.reads.device_report)
        self.on_ready: Callable[[bool], None] | None = None  # called from any thread

    # ----------------------------------------------------------------- what callers ask

    @property
    def is_open(self) -> bool:
        """The store is open: calls can be answered (NOT_SERVING ones with FAILED_PRECONDITION)."""
        return self.live.is_open

    @property
    def ready(self) -> bool:
        """Classification can be answered (health reports SERVING)."""
        return self.live.models is not None

    @property
    def load_error(self) -> str | None:
        """Why classification cannot be answered (no index yet, or none intact); None if ready."""
        return self.live.load_error

    @property
    def dim(self) -> int:
        return int(self.live.opened().spec.dim)

    @property
    def store(self) -> Store | None:
        return self.live.store

    @property
    def models(self) -> Models | None:
        return self.live.models

    @property
    def embedder(self) -> Embedder | None:
        return self.live.embedder

    def device_report(self) -> dict[str, Any]:
        """Where images are embedded: devices, precision, largest batch, work per device."""
        return self.reads.device_report()

    # ----------------------------------------------------------------- lifecycle

    def open(self) -> None:
        """Open the store as the bank's writer and load whatever models exist (blocking).

        The index served is caught up with everything the store committed before
        this returns (the searcher's segment holds what the last generation lacks),
        so a restarted server never reports SERVING behind its store. A bank without
        any index stays NOT_SERVING until RebuildIndex or its next write builds one.
        """
        from featurebank import store as store_mod

        store = store_mod.open(self.bank.root)
        try:
            store.acquire_writer()  # the server is the bank's single writer while it runs
        except BaseException:
            store.close()
            raise
        self.live.store = store
        self._open_embedder()
        self.live.keeper = IndexKeeper(
            self.bank, store, self._reload, self.live.searcher, self.checkpoint_policy
        )
        self._load_models()
        self.live.keeper.start()

    def _open_embedder(self) -> None:
        """The model that embeds image inputs, when the bank's spec has one."""
        spec = self.live.opened().spec
        if spec.has_model:
            from featurebank.embedder import devices
            from featurebank.embedder.embedding import Embedder

            placement = devices.resolve(self.device, self.precision)
            if self.model_pool is not None:
                self._shared = self.model_pool.take(spec, placement)
                self.live.embedder = self._shared.embedder
                self.reads.embed_batcher.executor = self._shared.executor
            else:
                self.live.embedder = Embedder.from_spec(spec, placement=placement)
            log.info("images are embedded on %s", self.device_report()["description"])

    def _load_models(self) -> None:
        from featurebank.classify.classifier import Classifier

        live = self.live
        try:
            if live.models is None:
                classifier = Classifier(live.opened())
            else:
                classifier = live.models.classifier
                classifier.reload()  # atomic: calls in flight keep their snapshot
            live.models = Models(classifier, classifier.searcher)
            live.load_error = None
        except FailedPrecondition as e:
            live.load_error = str(e)
            log.info("not serving yet: %s", e)
        live.update_gauges()
        if self.on_ready is not None:
            self.on_ready(self.ready)

    def _reload(self) -> tuple[int, int]:
        """Swap to the current generations: (index generation, head generation)."""
        self._load_models()
        if self.live.models is None:
            raise FailedPrecondition(self.live.load_error or "the index could not be loaded")
        return self.live.index_generation(), self.live.head_generation()

    def _on_batch(self, kind: str, size: int) -> None:
        if self.metrics is not None:
            self.metrics.observe_batch(kind, size)

    async def close(self) -> None:
        """Finish queued work, then close the store cleanly."""
        await self.reads.close()
        await asyncio.get_running_loop().run_in_executor(None, self._close_sync)

    def _close_sync(self) -> None:
        self.writer.shutdown(wait=True)
        if self.live.keeper is not None:
            self.live.keeper.close()
        if self._own_compute:
            self.compute.shutdown(wait=True)
        self.embed_pool.shutdown(wait=True)
        store, self.live.store = self.live.store, None
        if store is not None:
            store.close()
        shared, self._shared = self._shared, None
        if shared is not None and self.model_pool is not None:
            self.live.embedder = None
            self.model_pool.give_back(shared)

    # ----------------------------------------------------------------- index upkeep

    def start_rebuild(self, params: RebuildParams) -> Operation:
        return self._keeper().start_rebuild(params)

    def get_operation(self, op_id: str) -> Operation:
        return self._keeper().get_operation(op_id)

    def checkpoint_now(self) -> dict[str, Any] | None:
        """Fold the searcher's segment into a new generation now (None: nothing pending)."""
        return self._keeper().checkpoint_now()

    def _keeper(self) -> IndexKeeper:
        if self.live.keeper is None:
            raise FailedPrecondition("the bank is not open yet")
        return self.live.keeper

