"""The batch embedding job: reader -> mapper -> model -> writer, overlapped.

Stages (each a small builder, testable alone, as in clip-retrieval):
- `opened` + `plan`: open the bank's store once for the job (every stage uses that handle),
  list the source, drop keys already stored (resume);
- the mapper: `stages.Loader` (shared with the Ray runner, see `stages`); `build_dataset`
  runs it with tf.data over the remaining records: read + decode + resize in a
  parallel map (Pillow releases the GIL), bad inputs filtered out with their reason
  noted, then batch + prefetch, so decoding runs while the model works;
- the model: `Embedder.forward`, a frozen graph compiled once;
- `Writer`: a background thread committing each batch in one store transaction
  (batches waiting in its queue are merged), so writing overlaps inference.

A job killed at any point loses at most the batches not committed yet; the store's
transactions are atomic and a rerun embeds exactly the keys still missing.

Over 400 lines because the job's plan, its tf.data mapper and its writer thread share
the Timings and progress they report; the decoding stages live in `stages`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from featurebank import store as store_mod
from featurebank.core.bank import Bank
from featurebank.core.errors import FeaturebankError, InvalidInput, NotFound
from featurebank.core.params import EmbedParams
from featurebank.core.spec import Spec
from featurebank.embedder import backbones, devices, job_report, sources
from featurebank.embedder import batch_size as batch_size_mod
from featurebank.embedder.embedding import Embedder, spec_for
from featurebank.embedder.stages import NONFINITE_REASON, Loader, Timings, finite_rows
from featurebank.store import Store

log = logging.getLogger(__name__)

MAX_TXN_ROWS = 8192  # rows merged into one commit when the writer falls behind


class EmbedFailed(InvalidInput):
    """`fail_on_error`: the job finished but some inputs could not be embedded."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass
class Plan:
    """What a job has to do: the source, the records still missing, what to skip."""

    source: sources.Source
    todo: list[sources.Record]
    skipped: int


def with_known_dim(spec: Spec) -> Spec:
    """The spec with its dimension filled in when the family tells it without a model."""
    if backbones.is_model_file(spec.backbone) or spec.dim:
        return spec
    import dataclasses

    return dataclasses.replace(spec, dim=backbones.family(spec.backbone).dim)


def plan(source: sources.Source, store: Store | None, spec: Spec) -> Plan:
    """Check the bank's spec before any model is built, and find what is left to embed.

    `store`: the bank's open store, None when the bank has none yet (everything is left).
    A spec that only the model completes (a .keras model: its dim, layer and size) is
    checked when the job writes; with nothing left to write, the model is built here on
    the CPU, so a re-run with other options is refused either way (the local and the Ray
    job both plan here).
    """
    if store is None:
        return Plan(source, list(source.records), 0)
    if spec.dim:  # known without building the model: refuse a mismatch right away
        store.spec.check_same(spec)
    missing = set(store.missing([r.key for r in source.records]))
    todo = [r for r in source.records if r.key in missing]
    if not todo and not spec.dim:
        store.spec.check_same(Embedder.cached(spec, devices.resolve("cpu")).spec)
    return Plan(source, todo, len(source.records) - len(todo))


@contextlib.contextmanager
def opened(bank: str | os.PathLike[str]) -> Iterator[tuple[Bank, Store | None]]:
    """The bank and its store, opened once for the whole job (None: the bank has no store
    yet). The job's stages all use this one handle, so the store is never opened twice."""
    try:
        store: Store | None = store_mod.open(bank)
    except NotFound:
        store = None
    try:
        yield (store.bank if store is not None else Bank(bank)), store
    finally:
        if store is not None:
            store.close()


# ------------------------------------------------------------------ mapper


def build_dataset(loader: Loader, batch_size: int) -> Any:
    """tf.data: positions -> parallel read/decode/resize -> drop failures -> batch -> prefetch."""
    import tensorflow as tf

    h, w = loader.size

    def load(i: Any) -> tuple[np.ndarray, np.bool_]:
        pixels, ok = loader(int(i))
        return pixels, np.bool_(ok)

    def mapped(i: Any) -> tuple[Any, Any, Any]:
        pixels, ok = tf.numpy_function(load, [i], [tf.uint8, tf.bool], stateful=False)
        pixels.set_shape((h, w, 3))
        ok.set_shape(())
        return pixels, ok, i

    def decoded(pixels: Any, ok: Any, i: Any) -> Any:
        return ok

    def without_flag(pixels: Any, ok: Any, i: Any) -> tuple[Any, Any]:
        return pixels, i

    ds = tf.data.Dataset.range(len(loader.todo))
    ds = ds.map(mapped, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.filter(decoded).map(without_flag)
    ds = ds.batch(batch_size).prefetch(2)
    options = tf.data.Options()
    # Decoding runs on threads of its own (their priority is lowered, see Loader), not on
    # the pool that runs the model's operations.
    options.threading.private_threadpool_size = max(2, os.cpu_count() or 2)
    return ds.with_options(options)


# ------------------------------------------------------------------ writer


@dataclass
class Batch:
    positions: np.ndarray  # positions in `todo` of the embedded rows
    vectors: np.ndarray
    upto: int  # every position below this has been decoded (its failure is known)


class Writer:
    """Commits batches on a background thread; merges what queues up into one transaction."""

    def __init__(
        self,
        store: Store,
        loader: Loader,
        timings: Timings,
        bar: Any,
        queue_size: int = 1,
    ) -> None:
        self.store = store
        self.loader = loader
        self.timings = timings
        self.bar = bar
        self.embedded = 0
        self.failed: list[tuple[str, str]] = []
        self.error: BaseException | None = None
        self._q: queue.Queue[Batch | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._loop, name="store-writer", daemon=True)
        self._thread.start()

    def put(self, batch: Batch) -> None:
        """Hand a batch over (blocks while the writer is busy, which bounds lost work)."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                self._q.put(batch, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self, upto: int | None) -> None:
        """Commit what is queued, record the failures seen so far, stop the thread."""
        while self._thread.is_alive():  # a thread that failed no longer empties its queue
            try:
                self._q.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        self._thread.join()
        if upto is not None and self.error is None:
            self._record_failures(upto)
        if self.error is not None:
            raise self.error

    def _loop(self) -> None:
        try:
            while True:
                first = self._q.get()
                if first is None:
                    return
                group = [first]
                stop = False
                while sum(len(b.positions) for b in group) < MAX_TXN_ROWS:
                    try:
                        nxt = self._q.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    group.append(nxt)
                self._commit(group)
                if stop:
                    return
        except BaseException as e:  # surfaced to the main thread by put()/close()
            self.error = e

    def _commit(self, group: list[Batch]) -> None:
        t = time.perf_counter()
        positions = np.concatenate([b.positions for b in group])
        vectors = np.concatenate([b.vectors for b in group])
        todo, meta = self.loader.todo, self.loader.meta
        recs = [todo[int(p)] for p in positions]
        finite = finite_rows(vectors, self.store.spec.dtype)
        good = np.flatnonzero(finite)
        if len(good):
            self.store.put_batch(
                [recs[j].key for j in good],
                vectors[good],
                labels=[recs[j].label for j in good],
                splits=[recs[j].split for j in good],
                meta=[meta.pop(int(positions[j]), None) for j in good],
                thumbnails=None
                if self.loader.thumbs is None
                else [self.loader.thumbs.pop(int(positions[j]), None) for j in good],
            )
        for j in np.flatnonzero(~finite):
            if self.loader.thumbs is not None:
                self.loader.thumbs.pop(int(positions[j]), None)
            reason = NONFINITE_REASON.format(dtype=self.store.spec.dtype)
            self.store.record_error(recs[j].key, reason)
            self.failed.append((recs[j].key, reason))
        self._record_failures(group[-1].upto)
        self.timings.writing += time.perf_counter() - t
        self.embedded += len(good)
        self.bar.update(len(positions))
        if self.failed:
            self.bar.set_postfix(failed=len(self.failed), refresh=False)

    def _record_failures(self, upto: int) -> None:
        failures = self.loader.failures
        for pos in sorted(p for p in list(failures) if p < upto):
            reason = failures.pop(pos)
            key = self.loader.todo[pos].key
            self.store.record_error(key, reason)
            self.failed.append((key, reason))
            self.bar.update(1)


# ------------------------------------------------------------------ the job


def embed(
    source: str,
    bank: str,
    backbone: str | None = None,
    *,
    batch_size: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    fail_on_error: bool = False,
    progress: bool = True,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    meta: Mapping[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Embed the records of `source` missing from `bank` (created if needed); the summary back.

    `backbone` and `options` are `EmbedParams` fields (the options of `featurebank embed`);
    each one left out keeps what the bank's last embed job used, else its default.
    batch_size None: 64 on the CPU, the largest that fits on GPUs (see `batch_size`).
    on_start gets the device report (devices, precision, batch size) before the first batch.
    meta: user metadata stored on every item added (a manifest's own columns win per row).
    """
    if batch_size is not None and batch_size < 1:
        raise InvalidInput(f"batch size must be at least 1, got {batch_size}")
    placement = devices.resolve(device, precision)  # an absent GPU fails before any work
    t0 = time.perf_counter()
    with opened(bank) as (b, st), contextlib.ExitStack() as stack:
        params = job_report.recorded(b).override(backbone=backbone, **options)
        spec = with_known_dim(spec_for(params))
        src = stack.enter_context(
            contextlib.closing(sources.open_source(source, params.labels, params.follow_links, meta))
        )
        p = plan(src, st, spec)
        summary: dict[str, Any] = {
            "source": src.description,
            "bank": str(bank),
            "device": placement.describe(),
            "total": len(src.records),
            "skipped": p.skipped,
            "ignored": src.ignored,
            "skipped_folders": src.skipped,
        }
        if not p.todo:
            if st is None:
                raise NotFound(f"no store in bank {b.root}: {src.description} has nothing to embed")
            summary.update(spec=st.spec.describe(), embedded=0, failed=0, errors=[])
            return _finish(summary, t0, time.perf_counter(), Timings(), 0, fail_on_error)
        embedder = Embedder.cached(spec, placement)
        if st is None:  # the bank's first job: its store is made for the model's spec
            st = stack.enter_context(store_mod.create(b, embedder.spec, exist_ok=True))
        else:
            st.spec.check_same(embedder.spec)
            st.acquire_writer()
        summary["spec"] = st.spec.describe()
        size, size_from = batch_size_mod.choose(b, embedder, batch_size)
        report = job_report.report(embedder, size, size_from)
        summary.update(report)
        job_report.remember(b, params, report)
        log.info("embedding on %s", report["device"])
        if on_start is not None:
            on_start(report)
        before = embedder.work_by_device()
        timings = Timings()
        t_start = time.perf_counter()
        writer = _embed_all(p, embedder, st, params, size, timings, progress)
        summary.update(
            embedded=writer.embedded,
            failed=len(writer.failed),
            errors=[{"key": k, "reason": r} for k, r in writer.failed[:50]],
            work_by_device=job_report.work_since(before, embedder.work_by_device()),
        )
        return _finish(summary, t0, t_start, timings, writer.embedded, fail_on_error)


def _embed_all(
    p: Plan,
    embedder: Embedder,
    st: Store,
    params: EmbedParams,
    batch_size: int,
    timings: Timings,
    progress: bool,
) -> Writer:
    """Reader (the plan) -> mapper (Loader in tf.data) -> model -> writer (into `st`)."""
    from tqdm import tqdm

    todo = p.todo
    loader = Loader(p.source, todo, embedder.input_size, embedder.spec.resize,
                    params.max_pixels, timings, params.thumbnails)  # fmt: skip
    # The dataset and its iterator live only in `pipe`, so that `_release` drops them.
    pipe: dict[str, Any] = {"ds": build_dataset(loader, batch_size)}
    bar = tqdm(
        total=len(todo), unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True
    )
    writer = Writer(st, loader, timings, bar)
    upto: int | None = None
    try:
        pipe["it"] = iter(pipe["ds"])
        while True:
            t = time.perf_counter()
            try:
                pixels, positions = next(pipe["it"])
            except StopIteration:
                break
            t1 = time.perf_counter()
            timings.waiting += t1 - t
            vectors = embedder.forward_tensor(pixels)
            t2 = time.perf_counter()
            timings.inferring += t2 - t1
            pos = positions.numpy()
            del pixels, positions
            writer.put(Batch(pos, vectors, int(pos[-1])))
        upto = len(todo)
    finally:
        try:
            writer.close(upto)
        finally:
            bar.close()
            _release(pipe)
    return writer


def _release(pipe: dict[str, Any]) -> None:
    """Tear the input pipeline down on a background thread.

    Tearing down the tf.data pipeline sometimes blocked the job for about 5 s after its
    last batch (TF 2.21, AUTOTUNE map; the wait is inside TensorFlow); everything is
    committed by then, so nobody needs to wait for it.
    """
    threading.Thread(target=pipe.clear, name="dataset-teardown", daemon=True).start()


def _finish(
    summary: dict[str, Any],
    t0: float,
    t_start: float,
    timings: Timings,
    embedded: int,
    fail_on_error: bool,
) -> dict[str, Any]:
    end = time.perf_counter()
    run_s = end - t_start
    summary.update(
        images_per_s=round(embedded / run_s, 2) if run_s > 0 and embedded else 0.0,
        seconds_total=round(end - t0, 3),
        seconds_embedding=round(run_s, 3),
        seconds_reading=round(timings.reading, 3),
        seconds_inferring=round(timings.inferring, 3),
        seconds_writing=round(timings.writing, 3),
        seconds_waiting_for_input=round(timings.waiting, 3),
    )
    log.info("embed summary: %s", summary)
    if fail_on_error and summary.get("failed"):
        raise EmbedFailed(
            f"{summary['failed']} of {summary['total']} inputs could not be embedded "
            f"(see `featurebank store info`); first: {summary['errors'][0]}",
            summary,
        )
    return summary


__all__ = ["Batch", "EmbedFailed", "FeaturebankError", "Loader", "Timings", "Writer", "embed"]
