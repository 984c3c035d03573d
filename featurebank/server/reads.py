"""The server's reads: embedding images, classifying and searching, in dynamic batches.

Why batches: Keras and FAISS are much faster per item on a batch, so concurrent calls
are queued and run together on executor threads (server/batching.py), off the event
loop. A batch holds items of many calls; items asking the same of the classifier or the
searcher (mode, k, ...) are answered together, and every item gets its own result.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from featurebank.core.errors import FailedPrecondition
from featurebank.index.filters import Node
from featurebank.server import hits as selection
from featurebank.server.batching import Batcher, isolate, run_in
from featurebank.server.live import Live

if TYPE_CHECKING:
    from featurebank.classify.classifier import Prediction
    from featurebank.server.shared_batches import SharedBatches

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ClassifyOptions:
    """What one Classify call asks, as the edge checks left it (None: the classifier's default)."""

    mode: str | None
    k: int | None
    top_n: int
    include_neighbors: bool
    abstain_below: float | None  # target precision of the calibrated abstention
    where: Node | None = None  # only labelled items passing this filter vote


@dataclass(frozen=True)
class ClassifyJob:
    vector: np.ndarray
    options: ClassifyOptions
    exclude_id: int | None = None  # a stored item's own id: it must not vote for itself


@dataclass(frozen=True)
class SearchJob:
    vector: np.ndarray
    k: int
    labels: tuple[str, ...]
    exclude_id: int | None
    include_metadata: bool
    where: Node | None = None
    score_threshold: float | None = None
    group_by: str | None = None  # label or meta.NAME
    group_size: int = 1


@dataclass(frozen=True)
class Hit:
    key: str
    label: str | None
    score: float
    meta: dict[str, Any] | None


@dataclass(frozen=True)
class Found:
    """One Search answer and the index generation it came from."""

    hits: list[Hit]
    index_generation: int


class Reads:
    """Embed, Classify and Search over the live models, batched with concurrent calls."""

    def __init__(
        self,
        live: Live,
        compute: ThreadPoolExecutor,
        embed_pool: ThreadPoolExecutor,
        *,
        max_batch_size: int,
        batch_timeout_ms: float,
        search_threads: int,
        on_batch: Callable[[str, int], None] | None,
        shared: SharedBatches | None = None,
    ) -> None:
        self.live = live
        self.shared = shared  # the server's batchers, shared with its other banks
        self.compute = compute
        self.embed_batcher: Batcher[bytes, np.ndarray] = Batcher(
            "embed", self._embed_batch, embed_pool,
            max_batch_size=max_batch_size, timeout_ms=batch_timeout_ms, on_batch=on_batch,
        )
        self.classify_batcher: Batcher[ClassifyJob, Prediction] = Batcher(
            "classify", self._classify_batch, compute,
            max_batch_size=max_batch_size, timeout_ms=batch_timeout_ms,
            max_inflight=search_threads, on_batch=on_batch,
        )
        self.search_batcher: Batcher[SearchJob, Found] = Batcher(
            "search", self._search_batch, compute,
            max_batch_size=max_batch_size, timeout_ms=batch_timeout_ms,
            max_inflight=search_threads, on_batch=on_batch,
        )

    async def close(self) -> None:
        """Stop batching; batches already running finish."""
        for b in (self.embed_batcher, self.classify_batcher, self.search_batcher):
            await b.close()

    def device_report(self) -> dict[str, Any]:
        """Where images are embedded: devices, precision, largest batch, work per device."""
        embedder = self.live.embedder
        if embedder is None:
            return {"description": "no model: the bank holds vectors made elsewhere"}
        placement = embedder.placement
        batch = self.embed_batcher.max_batch_size
        return {
            "description": f"{placement.describe()}; batches of up to {batch} images",
            "kind": placement.kind,
            "devices": list(placement.devices),
            "precision": placement.precision,
            "batch_size": batch,
            "work_by_device": embedder.work_by_device(),
        }

    # ------------------------------------------------------------------ inputs

    async def embed_each(self, images: Sequence[bytes]) -> list[np.ndarray | BaseException]:
        """Vectors of images, batched with concurrent calls; a bad image gets its own error."""
        if self.live.embedder is None:
            raise FailedPrecondition(
                f"this bank holds vectors made elsewhere ({self.live.opened().spec.describe()}) "
                "and has no model to embed images: send vectors or keys"
            )
        return list(
            await asyncio.gather(
                *(self.embed_batcher.submit(b) for b in images), return_exceptions=True
            )
        )

    def _embed_batch(self, images: list[bytes]) -> list[np.ndarray | BaseException]:
        embedder = self.live.embedder
        assert embedder is not None  # embed_each checked

        def run(batch: list[bytes]) -> list[np.ndarray]:
            size = self.embed_batcher.max_batch_size
            return list(np.asarray(embedder.embed_images(batch, size), dtype=np.float32))

        return isolate(run, images)

    async def vectors_of_keys(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Stored vectors and ids of `keys` (NotFound names an unknown key)."""

        def lookup() -> tuple[np.ndarray, np.ndarray]:
            items = self.live.opened().get_by_keys(list(keys))
            return np.asarray(items.vectors, dtype=np.float32), np.asarray(items.ids)

        return await run_in(self.compute, lookup)

    async def thumbnails(self, keys: Sequence[str]) -> list[bytes | None]:
        return await run_in(self.compute, self.live.opened().thumbnails, list(keys))

    # ------------------------------------------------------------------ classify

    async def classify(self, jobs: Sequence[ClassifyJob]) -> list[Prediction]:
        """One call's answers, all from one index and head generation.

        A call may be split over batches; when a swap lands between them, the call
        is answered again (generations only grow, so this ends).
        """
        self.live.current()  # fail fast with FAILED_PRECONDITION when nothing is loaded
        while True:
            if self.shared is not None:
                results = await self.shared.classify.submit_many([(self, j) for j in jobs])
            else:
                results = await self.classify_batcher.submit_many(jobs)
            if len({(r.index_generation, r.head_generation) for r in results}) <= 1:
                return results

    def _classify_batch(self, jobs: list[ClassifyJob]) -> list[Prediction | BaseException]:
        clf = self.live.current().classifier

        def key(job: ClassifyJob) -> Hashable:
            o = job.options
            return o.mode, o.k, o.include_neighbors, o.abstain_below, job.exclude_id is not None, o.where

        def answer(group: list[ClassifyJob]) -> list[Prediction]:
            o = group[0].options
            preds = clf.classify(
                np.stack([j.vector for j in group]), mode=o.mode, k=o.k,
                top_n=max(j.options.top_n for j in group), include_neighbors=o.include_neighbors,
                exclude_ids=_exclude_ids(group), abstain_below=o.abstain_below, where=o.where,
            )  # one classifier call: one snapshot, its generations in every Prediction
            return [p.top(j.options.top_n) for j, p in zip(group, preds, strict=True)]

        return _grouped(jobs, key, answer)

    # ------------------------------------------------------------------ search

    async def search(self, jobs: Sequence[SearchJob]) -> list[Found]:
        self.live.current()
        if self.shared is not None:
            return await self.shared.search.submit_many([(self, j) for j in jobs])
        return await self.search_batcher.submit_many(jobs)

    def _search_batch(self, jobs: list[SearchJob]) -> list[Found | BaseException]:
        searcher = self.live.current().searcher
        generation = int(searcher.generation)  # a Searcher keeps its generation
        store = self.live.opened()

        def key(job: SearchJob) -> Hashable:
            return (job.k, job.labels, job.exclude_id is not None, job.where, job.group_by,
                    job.group_size)

        def answer(group: list[SearchJob]) -> list[Found]:
            return [Found(hits, generation) for hits in search_jobs(searcher, store, group)]

        return _grouped(jobs, key, answer)


def search_jobs(searcher: Any, store: Any, group: list[SearchJob]) -> list[list[Hit]]:
    """Hits of search jobs asking the same (k, labels, filter, groups), one search for all;
    grouped searches fetch more neighbours until every group is full or none are left."""
    job0 = group[0]
    ex = _exclude_ids(group)
    available = max(1, int(searcher.ntotal) - (1 if ex is not None else 0))
    want = selection.candidates_for(job0, available)
    vectors = np.stack([j.vector for j in group])
    most = min(available, selection.MAX_CANDIDATES)
    while True:
        rows = _hits(searcher, store, vectors, want, group, ex)
        done = [selection.select_hits(r, j) for r, j in zip(rows, group, strict=True)]
        short = any(len(d) < j.k and len(r) == want for d, r, j in zip(done, rows, group, strict=True))
        if job0.group_by is None or not short or want >= most:
            return done
        want = min(most, want * 4)


def _hits(
    searcher: Any, store: Any, vectors: np.ndarray, k: int, group: list[SearchJob],
    ex: np.ndarray | None,
) -> list[list[Hit]]:
    """Each job's neighbours, best first, with metadata when asked for or grouped by."""
    job0 = group[0]
    res = searcher.search(
        vectors, k, labels=list(job0.labels) if job0.labels else None, exclude_ids=ex,
        where=job0.where,
    )
    keys, labs = res.keys, res.labels
    out = []
    for row, job in enumerate(group):
        hits = [
            Hit(keys[row][col], labs[row][col], float(res.scores[row, col]), None)
            for col in range(res.ids.shape[1])
            if int(res.ids[row, col]) >= 0
        ]
        need_meta = job.include_metadata or (job.group_by or "").startswith("meta.")
        if need_meta and hits:
            found = res.ids[row][res.ids[row] >= 0].astype(np.uint64)
            metas = store.get(found).meta
            hits = [Hit(h.key, h.label, h.score, dict(m)) for h, m in zip(hits, metas, strict=True)]
        out.append(hits)
    return out


def _exclude_ids(group: Sequence[ClassifyJob | SearchJob]) -> np.ndarray | None:
    """Each job's own item id, when the group's jobs have one (all or none do)."""
    if group[0].exclude_id is None:
        return None
    return np.array([j.exclude_id for j in group], dtype=np.int64)


def _grouped(
    jobs: list[T], key: Callable[[T], Hashable], answer: Callable[[list[T]], list[R]]
) -> list[R | BaseException]:
    """Answer jobs group by group (jobs with the same key together), results in job order;
    a group's error is every one of its jobs' error."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        groups[key(job)].append(i)
    out: list[R | BaseException | None] = [None] * len(jobs)
    for idx in groups.values():
        try:
            for i, r in zip(idx, answer([jobs[i] for i in idx]), strict=True):
                out[i] = r
        except Exception as e:  # noqa: BLE001 - the whole group shares the error
            for i in idx:
                out[i] = e
    return [o if o is not None else RuntimeError("not answered") for o in out]

