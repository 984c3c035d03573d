"""What the server serves, below the gRPC layer: plain functions over one open bank.

The engine owns the bank's store (the server is its single writer), the live
Classifier and Searcher, the Embedder for image inputs, the dynamic batchers
and the executors that keep Keras, FAISS and LMDB work off the event loop.
Writes go through the group writer (server/writes.py) and only commit to the
store and catch the live searcher up; index files are written off the write
path, by checkpoints and rebuilds (server/indexing.py).
It stays one module (over 400 lines) because the read paths (classify, search,
info) share the Models snapshot and the batchers defined here.

Models are swapped, never mutated while in use: every read takes the current
`Models` snapshot once, so a rebuild that publishes a new generation changes
what the next request sees, not the one in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from featurebank.core.bank import Bank
from featurebank.core.errors import (
    FailedPrecondition,
    FeaturebankError,
    InvalidInput,
    NotFound,
    shown,
)
from featurebank.index.checkpoint import CheckpointPolicy
from featurebank.server.batching import Batcher, isolate
from featurebank.server.indexing import IndexKeeper, Operation, RebuildParams
from featurebank.server.writes import GroupWriter, UpsertRow

if TYPE_CHECKING:
    from featurebank.classify.classifier import Classifier
    from featurebank.index.searcher import Searcher
from featurebank.server.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_K = 1024
DEFAULT_SEARCH_K = 10
DEFAULT_TOP_N = 5


@dataclass(frozen=True)
class Models:
    """One consistent set of serving models; replaced as a whole on reload."""

    classifier: Classifier
    searcher: Searcher


@dataclass(frozen=True)
class ClassifyJob:
    vector: np.ndarray
    mode: str | None
    k: int | None
    top_n: int
    include_neighbors: bool
    exclude_id: int | None = None  # a stored item's own id: it must not vote for itself
    abstain_below: float | None = None  # target precision of the calibrated abstention


@dataclass(frozen=True)
class Classified:
    labels: list[str]
    probs: list[float]
    neighbors: list[tuple[str, str | None, float]]
    mode: str
    index_generation: int
    head_generation: int
    abstained: bool = False


@dataclass(frozen=True)
class SearchJob:
    vector: np.ndarray
    k: int
    labels: tuple[str, ...]
    exclude_id: int | None
    include_metadata: bool


@dataclass(frozen=True)
class Hit:
    key: str
    label: str | None
    score: float
    meta: dict[str, Any] | None


@dataclass(frozen=True)
class Labelling:
    """Suggestions or audit findings, with the generations they were computed on."""

    items: list[Any]
    index_generation: int
    labels_generation: int


class Engine:
    """One bank opened for serving; async methods for the servicer, sync ones run in threads."""

    def __init__(
        self,
        bank: str | Path,
        *,
        max_batch_size: int = 64,
        batch_timeout_ms: float = 2.0,
        metrics: Metrics | None = None,
        search_threads: int = 2,
        device: str = "auto",
        precision: str = "auto",
        checkpoint: CheckpointPolicy | None = None,
        max_queued_rows: int = 100_000,
    ) -> None:
        self.bank = Bank(bank)
        self.device, self.precision = device, precision
        self.metrics = metrics
        self.store: Any = None
        self.models: Models | None = None
        self.embedder: Any = None
        self.load_error: str | None = None
        self.keeper: IndexKeeper | None = None
        self.checkpoint_policy = checkpoint or CheckpointPolicy()
        self.compute = ThreadPoolExecutor(search_threads, thread_name_prefix="fb-search")
        self.embed_pool = ThreadPoolExecutor(1, thread_name_prefix="fb-embed")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="fb-writer")
        self.writes = GroupWriter(
            self.writer, self._commit_upsert, self._after_writes, max_queued_rows
        )
        on_batch = self._on_batch if metrics is not None else None
        self.embed_batcher: Batcher[bytes, np.ndarray] = Batcher(
            "embed", self._embed_batch, self.embed_pool,
            max_batch_size=max_batch_size, timeout_ms=batch_timeout_ms, on_batch=on_batch,
        )
        self.classify_batcher: Batcher[ClassifyJob, Classified] = Batcher(
            "classify", self._classify_batch, self.compute,
            max_batch_size=max_batch_size, timeout_ms=batch_timeout_ms,
            max_inflight=search_threads, on_batch=on_batch,
        )
        self.search_batcher: Batcher[SearchJob, list[Hit]] = Batcher(
            "search", self._search_batch, self.compute,
            max_batch_size=max_batch_size, timeout_ms=batch_timeout_ms,
            max_inflight=search_threads, on_batch=on_batch,
        )
        self.on_ready: Callable[[bool], None] | None = None  # called from any thread

    # ----------------------------------------------------------------- lifecycle

    def open(self) -> None:
        """Open the store as the bank's writer and load whatever models exist (blocking).

        The index served is caught up with everything the store committed before
        this returns (the searcher's segment holds what the last generation lacks),
        so a restarted server never reports SERVING behind its store. A bank without
        any index stays NOT_SERVING until RebuildIndex or its next write builds one.
        """
        from featurebank import store as store_mod

        self.store = store_mod.open(self.bank.root)
        try:
            self.store.acquire_writer()  # the server is the bank's single writer while it runs
        except BaseException:
            self.store.close()
            self.store = None
            raise
        self._open_embedder()
        self.keeper = IndexKeeper(
            self.bank, self.store, self._reload, self._searcher, self.checkpoint_policy
        )
        self._load_models()
        self.keeper.start()

    def _open_embedder(self) -> None:
        """The model that embeds image inputs, when the bank's spec has one."""
        if self.store.spec.has_model:
            from featurebank.embedder import devices
            from featurebank.embedder.embedding import Embedder

            placement = devices.resolve(self.device, self.precision)
            self.embedder = Embedder.from_spec(self.store.spec, placement=placement)
            log.info("images are embedded on %s", self.device_report()["description"])

    def device_report(self) -> dict[str, Any]:
        """Where images are embedded: devices, precision, largest batch, work per device."""
        if self.embedder is None:
            return {"description": "no model: the bank holds vectors made elsewhere"}
        placement = self.embedder.placement
        batch = self.embed_batcher.max_batch_size
        return {
            "description": f"{placement.describe()}; batches of up to {batch} images",
            "kind": placement.kind,
            "devices": list(placement.devices),
            "precision": placement.precision,
            "batch_size": batch,
            "work_by_device": self.embedder.work_by_device(),
        }

    @property
    def ready(self) -> bool:
        return self.models is not None

    @property
    def dim(self) -> int:
        return int(self.store.spec.dim)

    def _load_models(self) -> None:
        from featurebank.classify.classifier import Classifier

        try:
            if self.models is None:
                classifier = Classifier(self.store)
            else:
                classifier = self.models.classifier
                classifier.reload()  # atomic: calls in flight keep their snapshot
            self.models = Models(classifier, classifier.searcher)
            self.load_error = None
        except FailedPrecondition as e:
            self.load_error = str(e)
            log.info("not serving yet: %s", e)
        self._update_gauges()
        if self.on_ready is not None:
            self.on_ready(self.ready)

    def _reload(self) -> tuple[int, int]:
        """Swap to the current generations: (index generation, head generation)."""
        self._load_models()
        if self.models is None:
            raise FailedPrecondition(self.load_error or "the index could not be loaded")
        clf = self.models.classifier
        return int(clf.index_generation), int(clf.head_generation or 0)

    def _searcher(self) -> Searcher | None:
        m = self.models
        return m.searcher if m is not None else None

    def _update_gauges(self) -> None:
        if self.metrics is None or self.store is None:
            return
        m = self.models
        self.metrics.set_sizes(
            bank_items=int(self.store.count),
            index_items=int(m.searcher.ntotal) if m else 0,
            store_generation=int(self.store.generation),
            index_generation=int(m.classifier.index_generation) if m else 0,
            head_generation=m.classifier.head_generation if m else None,
        )

    def _on_batch(self, kind: str, size: int) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.labels(kind).observe(size)

    async def close(self) -> None:
        """Finish queued work, then close the store cleanly."""
        for b in (self.embed_batcher, self.classify_batcher, self.search_batcher):
            await b.close()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._close_sync)

    def _close_sync(self) -> None:
        self.writer.shutdown(wait=True)
        if self.keeper is not None:
            self.keeper.close()
        self.compute.shutdown(wait=True)
        self.embed_pool.shutdown(wait=True)
        if self.store is not None:
            self.store.close()
            self.store = None

    def _models(self) -> Models:
        m = self.models
        if m is None:
            raise FailedPrecondition(
                self.load_error or f"no index yet in {self.bank.root}: run RebuildIndex first"
            )
        return m

    async def _run(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    # ----------------------------------------------------------------- reads

    async def embed_each(self, images: Sequence[bytes]) -> list[np.ndarray | BaseException]:
        """Vectors of images, batched with concurrent calls; a bad image gets its own error."""
        if self.embedder is None:
            raise FailedPrecondition(
                f"this bank holds vectors made elsewhere ({self.store.spec.describe()}) and "
                "has no model to embed images: send vectors or keys"
            )
        return list(
            await asyncio.gather(
                *(self.embed_batcher.submit(b) for b in images), return_exceptions=True
            )
        )

    def _embed_batch(self, images: list[bytes]) -> list[np.ndarray | BaseException]:
        def run(batch: list[bytes]) -> list[np.ndarray]:
            size = self.embed_batcher.max_batch_size
            vectors = np.asarray(self.embedder.embed_images(batch, size), dtype=np.float32)
            return list(vectors)

        return isolate(run, images)

    async def vectors_of_keys(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Stored vectors and ids of `keys` (NotFound names an unknown key)."""

        def lookup() -> tuple[np.ndarray, np.ndarray]:
            items = self.store.get_by_keys(list(keys))
            return np.asarray(items.vectors, dtype=np.float32), np.asarray(items.ids)

        return await self._run(self.compute, lookup)

    async def classify(self, jobs: Sequence[ClassifyJob]) -> list[Classified]:
        """One call's results, all from one index and head generation."""
        self._models()  # fail fast with FAILED_PRECONDITION when nothing is loaded
        while True:
            results = await self.classify_batcher.submit_many(jobs)
            if len({(r.index_generation, r.head_generation) for r in results}) <= 1:
                return results
            # a swap landed between the batches this call was split into: answer it again

    def _classify_batch(self, jobs: list[ClassifyJob]) -> list[Classified | BaseException]:
        models = self._models()
        clf = models.classifier
        out: list[Classified | BaseException | None] = [None] * len(jobs)
        groups: dict[tuple[str | None, int | None, bool, bool, float | None], list[int]] = (
            defaultdict(list)
        )
        for i, job in enumerate(jobs):
            key = (
                job.mode, job.k, job.include_neighbors, job.exclude_id is not None,
                job.abstain_below,
            )
            groups[key].append(i)
        for (mode, k, neighbors, exclude, abstain_below), idx in groups.items():
            try:
                vectors = np.stack([jobs[i].vector for i in idx])
                top_n = max(jobs[i].top_n for i in idx)
                ex = np.array([jobs[i].exclude_id for i in idx], dtype=np.int64) if exclude else None
                generations = (clf.index_generation, clf.head_generation)
                while True:  # the generations reported are the ones the answer came from
                    preds = clf.classify(
                        vectors, mode=mode, k=k, top_n=top_n, include_neighbors=neighbors,
                        exclude_ids=ex, abstain_below=abstain_below,
                    )
                    seen, generations = generations, (clf.index_generation, clf.head_generation)
                    if seen == generations:  # generations only grow: no swap in between
                        break
                index_gen, head_gen = int(generations[0]), generations[1]
                used = mode or str(clf.default_mode)
                for i, pred in zip(idx, preds, strict=True):
                    n = jobs[i].top_n
                    out[i] = Classified(
                        labels=list(pred.labels[:n]),
                        probs=[float(p) for p in pred.probs[:n]],
                        neighbors=[(nb.key, nb.label, float(nb.score)) for nb in pred.neighbors],
                        mode=used,
                        index_generation=index_gen,
                        head_generation=0 if used == "knn" or head_gen is None else int(head_gen),
                        abstained=pred.abstained,
                    )
            except Exception as e:  # noqa: BLE001 - whole group shares the error
                for i in idx:
                    out[i] = e
        return [o if o is not None else RuntimeError("not classified") for o in out]

    async def search(self, jobs: Sequence[SearchJob]) -> list[list[Hit]]:
        self._models()
        return await self.search_batcher.submit_many(jobs)

    def _search_batch(self, jobs: list[SearchJob]) -> list[list[Hit] | BaseException]:
        searcher = self._models().searcher
        out: list[list[Hit] | BaseException | None] = [None] * len(jobs)
        groups: dict[tuple[int, tuple[str, ...], bool], list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[(job.k, job.labels, job.exclude_id is not None)].append(i)
        for (k, labels, exclude), idx in groups.items():
            try:
                vectors = np.stack([jobs[i].vector for i in idx])
                ex = np.array([jobs[i].exclude_id for i in idx], dtype=np.int64) if exclude else None
                k = min(k, max(1, int(searcher.ntotal) - (1 if exclude else 0)))
                res = searcher.search(
                    vectors, k, labels=list(labels) if labels else None, exclude_ids=ex
                )
                keys, labs = res.keys, res.labels
                for row, i in enumerate(idx):
                    job = jobs[i]
                    hits = [
                        Hit(keys[row][col], labs[row][col], float(res.scores[row, col]), None)
                        for col in range(res.ids.shape[1])
                        if int(res.ids[row, col]) >= 0
                    ]
                    if job.include_metadata and hits:
                        metas = self.store.get_by_keys([h.key for h in hits]).meta
                        hits = [
                            Hit(h.key, h.label, h.score, dict(m))
                            for h, m in zip(hits, metas, strict=True)
                        ]
                    out[i] = hits
            except Exception as e:  # noqa: BLE001
                for i in idx:
                    out[i] = e
        return [o if o is not None else RuntimeError("not searched") for o in out]

    async def info(self) -> dict[str, Any]:
        return await self._run(self.compute, self._info)

    def _info(self) -> dict[str, Any]:
        store = self.store
        m = self.models
        _, codes, vocab = store.label_table()
        info: dict[str, Any] = {
            "bank": str(self.bank.root),
            "spec": store.spec,
            "count": int(store.count),
            "labelled": int(np.count_nonzero(np.asarray(codes) >= 0)),
            "store_generation": int(store.generation),
            "labels_generation": int(store.labels_generation),
            "labels": list(vocab),
            "index": {},
            "head": {},
            "default_mode": None,
            "device": self.device_report(),
        }
        if m is not None:
            info["index"] = {
                "generation": int(m.classifier.index_generation),
                "ntotal": int(m.searcher.ntotal),
                "manifest": dict(m.searcher.manifest),
                "pending_items": int(m.searcher.segment.size + m.searcher.stale_count),
                "checkpoint_error": self.keeper.checkpointer.last_error if self.keeper else None,
            }
            info["default_mode"] = str(m.classifier.default_mode)
            head = m.classifier.head
            if head is not None:
                info["head"] = {
                    "generation": int(head.generation),
                    "stale": bool(m.classifier.head_stale),
                    "manifest": dict(head.manifest),
                }
        return info

    # ----------------------------------------------------------------- labelling

    async def suggest(self, n: int, strategy: str, label: str | None) -> Labelling:
        return await self._run(self.compute, self._suggest, n, strategy, label)

    def _suggest(self, n: int, strategy: str, label: str | None) -> Labelling:
        from featurebank.classify.suggest import suggest

        clf = self._models().classifier
        labels_gen = int(self.store.labels_generation)
        out = suggest(clf, n=n, strategy=strategy, label=label)
        return Labelling(out, int(clf.index_generation), labels_gen)

    async def audit(self, n: int) -> Labelling:
        return await self._run(self.compute, self._audit, n)

    def _audit(self, n: int) -> Labelling:
        from featurebank.classify.audit import audit

        clf = self._models().classifier
        labels_gen = int(self.store.labels_generation)
        return Labelling(audit(clf, n=n), int(clf.index_generation), labels_gen)

    async def thumbnails(self, keys: Sequence[str]) -> list[bytes | None]:
        return await self._run(self.compute, self.store.thumbnails, list(keys))

    async def report(self) -> dict[str, Any]:
        return await self._run(self.compute, self._report)

    def _report(self) -> dict[str, Any]:
        from featurebank.classify.report import latest_report

        found = latest_report(self.bank.reports_dir)
        if found is None:
            raise NotFound(
                f"no evaluation report in {self.bank.reports_dir}: run `featurebank eval` first"
            )
        return found

    # ----------------------------------------------------------------- writes

    async def upsert(self, rows: Sequence[UpsertRow], deadline: float | None = None) -> dict[str, int]:
        """Commit rows (grouped with concurrent Upserts); see server/writes.py for the contract.

        `deadline` is a time.monotonic() value: a call whose commit has not started by
        then is not committed (DeadlineExceeded).
        """
        if not rows:
            raise InvalidInput("Upsert got no items")
        return await asyncio.wrap_future(self.writes.submit(list(rows), deadline))

    def _commit_upsert(self, rows: list[UpsertRow]) -> tuple[set[str], int]:
        keys = [r.key for r in rows]
        store = self.store
        present = set(keys) - set(store.missing(keys))
        store.put_batch(  # one commit: replaced items are never missing in between
            keys,
            np.stack([r.vector for r in rows]).astype(np.float32),
            labels=[r.label for r in rows],
            splits=[r.split for r in rows],
            meta=[r.meta for r in rows],
            replace=True,
        )
        return present, int(store.generation)

    def _after_writes(self) -> int:
        """Make committed writes searchable: catch the searcher up (or build the first index)."""
        if self._searcher() is None:
            assert self.keeper is not None
            self.keeper.ensure_index()
        self._catch_up()
        return self._index_generation()

    async def set_labels(self, mapping: dict[str, str | None]) -> dict[str, int]:
        return await self._run(self.writer, self._set_labels, mapping)

    def _set_labels(self, mapping: dict[str, str | None]) -> dict[str, int]:
        missing = self.store.missing(list(mapping))
        if missing:
            raise NotFound(_unknown_keys(missing))
        updated = int(self.store.set_labels(mapping))
        self._catch_up()  # labels only: no index is touched, no build is waited for
        return {"updated": updated, "store_generation": int(self.store.generation)}

    async def delete(self, keys: Sequence[str], ignore_missing: bool) -> dict[str, int]:
        return await self._run(self.writer, self._delete, list(keys), ignore_missing)

    def _delete(self, keys: list[str], ignore_missing: bool) -> dict[str, int]:
        missing = self.store.missing(keys)
        if missing and not ignore_missing:
            raise NotFound(_unknown_keys(missing))
        gone = set(missing)
        present = [k for k in keys if k not in gone]
        deleted = int(self.store.delete(present)) if present else 0
        if deleted:
            self._catch_up()
        return {"deleted": deleted, "store_generation": int(self.store.generation)}

    def _catch_up(self) -> None:
        searcher = self._searcher()
        if searcher is not None:
            searcher.catch_up()
        self._update_gauges()

    def _index_generation(self) -> int:
        m = self.models
        return int(m.classifier.index_generation) if m else 0

    # ----------------------------------------------------------------- index upkeep

    def start_rebuild(self, params: RebuildParams) -> Operation:
        return self._keeper().start_rebuild(params)

    def get_operation(self, op_id: str) -> Operation:
        return self._keeper().get_operation(op_id)

    def checkpoint_now(self) -> dict[str, Any] | None:
        """Fold the searcher's segment into a new generation now (None: nothing pending)."""
        return self._keeper().checkpoint_now()

    def _keeper(self) -> IndexKeeper:
        if self.keeper is None:
            raise FailedPrecondition("the bank is not open yet")
        return self.keeper


def _unknown_keys(keys: Sequence[str]) -> str:
    listed = ", ".join(shown(k) for k in keys[:5])
    more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
    return f"unknown key{'s' if len(keys) > 1 else ''} {listed}{more}"


def image_meta(image: bytes, uri: str) -> dict[str, Any]:
    """Source metadata the store keeps for an image item."""
    meta: dict[str, Any] = {"sha256": hashlib.sha256(image).hexdigest(), "size": len(image)}
    if uri:
        meta["uri"] = uri
    return meta


__all__ = [
    "MAX_K",
    "Classified",
    "ClassifyJob",
    "Engine",
    "FeaturebankError",
    "Hit",
    "Labelling",
    "Operation",
    "RebuildParams",
    "SearchJob",
    "UpsertRow",
    "image_meta",
]
