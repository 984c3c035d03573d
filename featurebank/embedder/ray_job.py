"""The batch embedding job on a Ray cluster: shards through an actor pool, then a commit.

The driver plans as the local job does (spec check, keys already stored skipped), cuts
the sorted source into content-addressed shards (`shards.plan_shards`) and feeds the
shards still to do to a Ray Data actor pool (`map_batches` with `ActorPoolStrategy`):
each actor loads the model once and, one shard per call, runs the local job's mapper and
model (`shards.embed_shard`) and writes the shard's Parquet file and done marker itself.
Ray's own `write_parquet` is not used: it names files with a per-run id, so a rerun would
duplicate rows. When every shard is done, the driver commits the staging folder into the
store (`commit.commit_shards`).

Failures: a worker that dies mid-shard is restarted by Ray and the shard's task retried
(no done marker was written, so nothing partial is ever committed); a rerun of the whole
command skips finished shards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from featurebank import store as store_mod
from featurebank.core.errors import InvalidInput
from featurebank.core.params import EmbedParams
from featurebank.core.spec import Spec
from featurebank.embedder import job_report, pipeline, ray_cluster, shards, sources
from featurebank.embedder.commit import commit_shards, staged_spec
from featurebank.embedder.embedding import spec_for
from featurebank.embedder.pipeline import EmbedFailed, with_known_dim
from featurebank.embedder.stages import Model, load_model

log = logging.getLogger(__name__)

ERRORS_PER_SHARD = 10  # failures a worker reports back (all are in the shard file)


class ShardEmbedder:
    """The Ray actor: the model built once, then one shard per call, written to staging."""

    def __init__(
        self,
        source: str,
        kind: str,
        params: EmbedParams,
        spec: dict[str, Any],
        model: Callable[[Spec], Model],
        staging: str,
        batch_size: int,
        verbose: bool,
    ) -> None:
        if not verbose:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")  # not all of a GPU's memory
        # File records carry their own paths; only array sources are opened (memory-mapped).
        self.source = (
            sources.open_source(source, params.labels)
            if kind == "arrays"
            else sources.Source(source, [])
        )
        self.model = model(Spec.from_dict(spec))
        self.staging = Path(staging)
        self.batch_size = batch_size
        self.params = params

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        columns = ("shard", "rows", "failed", "errors", "reading", "inferring", "writing",
                   "already_done", "started", "ended")  # fmt: skip
        out: dict[str, list[Any]] = {k: [] for k in columns}
        for sid, text in zip(batch["shard"], batch["records"], strict=True):
            sid = str(sid)
            started = time.time()
            marker = shards.read_marker(self.staging, sid)
            already_done = marker is not None  # a retried call whose first try wrote it
            if marker is None:
                records = shards.records_from_rows(str(text))
                shard = shards.Shard(sid, tuple(records))
                rows = shards.embed_shard(
                    self.source, records, self.model, self.batch_size, self.params.max_pixels,
                    thumbnails=self.params.thumbnails,
                )  # fmt: skip
                t = time.perf_counter()
                marker = shards.write_shard(self.staging, shard, rows, self.model.spec)
                errors = [
                    {"key": k, "reason": e}
                    for k, e in zip(rows.keys, rows.errors, strict=True)
                    if e is not None
                ][:ERRORS_PER_SHARD]
                times = (rows.timings.reading, rows.timings.inferring, time.perf_counter() - t)
            else:
                errors, times = [], (0.0, 0.0, 0.0)
            for name, value in zip(
                out,
                (
                    sid,
                    marker["rows"],
                    marker["failed"],
                    json.dumps(errors),
                    *times,
                    already_done,
                    started,
                    time.time(),
                ),
                strict=True,
            ):
                out[name].append(value)
        return out


def run(
    source: str,
    bank: str,
    spec: Spec | None = None,
    *,
    batch_size: int = 64,
    staging: str | None = None,
    shard_size: int = shards.DEFAULT_SHARD_SIZE,
    address: str | None = None,
    workers: tuple[int, int] = (1, 1),
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    fail_on_error: bool = False,
    progress: bool = True,
    verbose: bool = False,
    model: Callable[[Spec], Model] = load_model,
    commit: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Embed what `bank` is missing of `source` on Ray, commit it; returns the summary.

    `options` are `EmbedParams` fields, each left out kept from the bank's last embed job
    (as the local job does). `spec` and `model` stand in for the extractor the options
    describe (a model built inside each actor; it must be picklable); then the options'
    extractor is neither built nor recorded. `commit=False` leaves the finished shards in
    staging for `featurebank store commit`.
    """
    if batch_size < 1:
        raise InvalidInput(f"batch size must be at least 1, got {batch_size}")
    t0 = time.perf_counter()
    with pipeline.opened(bank) as (b, st), contextlib.ExitStack() as stack:
        params = job_report.recorded(b).override(**options)
        chosen = spec is None
        spec = with_known_dim(spec_for(params) if spec is None else spec)
        src = sources.open_source(source, params.labels, params.follow_links)
        try:
            p = pipeline.plan(src, st, spec)
            kind = src.kind
        finally:
            src.close()
        stage = Path(staging) if staging else b.root / "staging"
        missing = {r.key for r in p.todo}
        all_shards = shards.plan_shards(src.records, spec, shard_size, params.thumbnails)
        todo = [s for s in all_shards if any(r.key in missing for r in s.records)]
        finished = {s.id for s in todo if shards.read_marker(stage, s.id) is not None}
        done_before = [s for s in todo if s.id in finished]
        to_run = [s for s in todo if s.id not in finished]
        summary: dict[str, Any] = {
            "engine": "ray",
            "source": src.description,
            "bank": str(bank),
            "staging": str(stage),
            "total": len(src.records),
            "skipped": p.skipped,
            "ignored": src.ignored,
            "shards": {"total": len(all_shards), "stored": len(all_shards) - len(todo),
                       "done_before": len(done_before), "run": len(to_run)},
        }  # fmt: skip
        t_start = time.perf_counter()
        results = _Results()
        summary["device"] = "Ray not started: no shard left to embed"
        if to_run:
            with ray_cluster.session(address, verbose) as ray:
                cpus, gpus = ray_cluster.resources(ray)
                summary["device"] = (
                    f"Ray cluster ({address or 'local'}): {cpus:g} CPUs, {gpus:g} GPUs"
                )
                results = _run_shards(ray, to_run, missing, source, kind, params, spec, model,
                                      stage, batch_size, workers, cpus_per_worker,
                                      gpus_per_worker, progress, verbose)  # fmt: skip
        run_s = time.perf_counter() - t_start
        done = summary["shards"]["done_before"] + len(results.shards)
        summary["shards"].update(done=done, found_done_on_retry=results.already_done)
        if commit and done:
            if st is None:  # the bank's first commit: its store is made for the shards' spec
                st = stack.enter_context(store_mod.create(b, staged_spec(stage), exist_ok=True))
            summary["commit"] = commit_shards(st, stage, progress=False)
            if chosen:
                job_report.remember(b, params)
        embedded = summary.get("commit", {}).get("added", 0)
        summary.update(
            embedded=embedded,
            failed=results.failed,
            errors=results.errors[:50],
            images_per_s=round(results.rows / run_s, 2) if results.rows and run_s > 0 else 0.0,
            seconds_total=round(time.perf_counter() - t0, 3),
            seconds_embedding=round(run_s, 3),
            # the pool's own rate, start-up of the cluster and the actors excluded
            pool_images_per_s=round(results.rows / results.working_seconds, 2)
            if results.rows and results.working_seconds > 0
            else 0.0,
            seconds_working=round(results.working_seconds, 3),
            shards_at_once=results.most_at_once,
            seconds_reading=round(results.reading, 3),
            seconds_inferring=round(results.inferring, 3),
            seconds_writing=round(results.writing, 3),
        )
        if st is not None:
            summary["spec"] = st.spec.describe()
    log.info("embed summary: %s", summary)
    if fail_on_error and summary["failed"]:
        raise EmbedFailed(
            f"{summary['failed']} of {summary['total']} inputs could not be embedded "
            f"(see `featurebank store info`); first: {summary['errors'][0]}",
            summary,
        )
    return summary


class _Results:
    """What the workers reported, summed as shards finish."""

    def __init__(self) -> None:
        self.shards: list[str] = []
        self.rows = self.failed = self.already_done = 0
        self.reading = self.inferring = self.writing = 0.0
        self.errors: list[dict[str, str]] = []
        self.first_start = float("inf")
        self.last_end = 0.0
        self.spans: list[tuple[float, float]] = []  # (started, ended) of each shard

    @property
    def most_at_once(self) -> int:
        """The most shards in progress at one instant: how much of the pool really worked."""
        events = sorted([(s, 1) for s, _ in self.spans] + [(e, -1) for _, e in self.spans])
        running = most = 0
        for _, step in events:  # an end sorts before a start at the same instant
            running += step
            most = max(most, running)
        return most

    @property
    def working_seconds(self) -> float:
        """Wall time from the first shard started to the last one finished (workers' clocks)."""
        return max(self.last_end - self.first_start, 0.0)

    def add(self, row: dict[str, Any]) -> None:
        self.shards.append(str(row["shard"]))
        self.rows += int(row["rows"])
        self.failed += int(row["failed"])
        self.already_done += int(bool(row["already_done"]))
        self.reading += float(row["reading"])
        self.inferring += float(row["inferring"])
        self.writing += float(row["writing"])
        self.errors.extend(json.loads(row["errors"]))
        self.first_start = min(self.first_start, float(row["started"]))
        self.last_end = max(self.last_end, float(row["ended"]))
        self.spans.append((float(row["started"]), float(row["ended"])))


def _run_shards(
    ray: Any,
    to_run: list[shards.Shard],
    missing: set[str],
    source: str,
    kind: str,
    params: EmbedParams,
    spec: Spec,
    model: Callable[[Spec], Model],
    stage: Path,
    batch_size: int,
    workers: tuple[int, int],
    cpus_per_worker: float,
    gpus_per_worker: float,
    progress: bool,
    verbose: bool,
) -> _Results:
    import ray.data

    lo, hi = ray_cluster.fit_workers(ray, workers, cpus_per_worker, gpus_per_worker)
    stage.mkdir(parents=True, exist_ok=True)
    # A shard keeps the id of all its records but embeds only those not stored yet.
    parts = [[r for r in s.records if r.key in missing] for s in to_run]
    items = [{"shard": s.id, "records": shards.records_to_rows(part)}
             for s, part in zip(to_run, parts, strict=True)]  # fmt: skip
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        ShardEmbedder,
        batch_size=1,  # one shard per call: the shard is the unit of retry
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker or None,
        fn_constructor_kwargs={
            "source": str(source), "kind": kind, "params": params, "spec": spec.to_dict(),
            "model": model, "staging": str(stage), "batch_size": batch_size,
            "verbose": verbose,
        },
    )  # fmt: skip
    # Ray Data's actor pools restart a dead actor and retry its call without limit by
    # default (max_restarts=-1, max_task_retries=-1): a killed worker's shard is redone.
    total_rows = sum(len(part) for part in parts)
    bar = _bar(total_rows, progress)
    results = _Results()
    t = time.perf_counter()
    for row in ds.iter_rows():
        results.add(row)
        done = len(results.shards)
        rate = results.rows / max(time.perf_counter() - t, 1e-9)
        log.info("shard %s done: %d/%d shards, %.1f images/s, ETA %.0fs, %d failed",
                 row["shard"], done, len(to_run), rate,
                 (total_rows - results.rows) / max(rate, 1e-9), results.failed)  # fmt: skip
        if bar is not None:
            bar.set_postfix(shards=f"{done}/{len(to_run)}", failed=results.failed, refresh=False)
            bar.update(int(row["rows"]))
    if bar is not None:
        bar.close()
    return results


def _bar(total: int, progress: bool) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True)
