"""Building a bank's index on a Ray cluster: faiss's recipe for indexes past one core's patience.

1. train the index (transform, coarse quantiser, codes) on a sample, in the driver;
2. add shards of the vectors in parallel Ray tasks, each into a copy of the trained empty
   index (serialised once, shared through Ray's object store);
3. merge the filled copies in shard order (`stored_ids.merge`): inverted lists are moved list
   by list (carrying their store ids), flat codes appended behind their concatenated id maps,
   so the result is the index one process would have built by adding the same vectors in
   the same order (byte for byte for Flat, IVF-Flat, IVF-PQ and OPQ);
4. compute the exact ground truth of the held-out tuning queries in parallel over the same
   shards (top-k per shard, merged), tune nprobe on it as the local build does, add the
   held-out vectors, and publish the generation with the local build's own code
   (`build.prepare` / `build.publish_build`).

Graph indexes (HNSW) cannot be built in pieces and are refused; `factory="auto"` chooses
among the mergeable ones (`selection.choose_factory(..., sharded=True)`). The driver still
reads the store and holds the merged index, so the bank must fit in the driver's memory;
docs/scale.md says how far that goes and what comes next (on-disk inverted lists).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import faiss
import numpy as np

from featurebank.core.errors import InvalidInput
from featurebank.core.memory import release_free_memory
from featurebank.embedder import ray_cluster
from featurebank.index import build, rerank, selection, stored_ids, transforms
from featurebank.index.families import family_of, has_refine
from featurebank.index.tuning import Tuned
from featurebank.store import BankLike, borrowed

log = logging.getLogger(__name__)

MIN_SHARD_ROWS = 1000  # below this a task costs more than the adding it saves


def build_index_ray(
    bank: BankLike,
    *,
    train_sample: int | None = None,
    shards: int | None = None,
    address: str | None = None,
    progress: bool = False,
    verbose: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """`build.build_index` with the adding and the ground truth done in Ray tasks.

    Starts from the live generation's IndexParams, like the local build.
    """
    started = time.perf_counter()
    if shards is not None and shards < 1:
        raise InvalidInput(f"--shards must be at least 1, got {shards}")
    if train_sample is not None and train_sample < 1:
        raise InvalidInput(f"--train-sample must be at least 1, got {train_sample}")
    with borrowed(bank) as st:
        params = build.live_params(st.bank).override(**overrides)
        transforms.parse(params.resolved_transform)
        try:
            prep = build.prepare(st.bank, st, params, sharded=True)
            with ray_cluster.session(address, verbose) as ray:
                index, tuned, info = build_sharded(
                    ray, prep.xt, prep.ids, prep.choice.factory, params.metric, params.k,
                    params.target_recall, train_sample, shards, progress,
                )  # fmt: skip
            return build.publish_build(
                st.bank, st, params, prep, index, tuned, started, extra={"engine": "ray", **info}
            )
        finally:
            release_free_memory()  # as the local build: the temporaries' heap need not stay


def check_mergeable(index: faiss.Index, factory: str) -> None:
    """Refuse indexes that cannot be built in shards and merged (graphs, re-ranking)."""
    if has_refine(index) or not family_of(index).mergeable:
        raise InvalidInput(
            f"factory {factory!r} cannot be built in shards and merged (graph indexes such as "
            "HNSW, and re-ranking, are built in one process): use an IVF or Flat factory, "
            "or --engine local"
        )


def build_sharded(
    ray: Any,
    vectors: np.ndarray,
    ids: np.ndarray,
    factory: str,
    metric: str,
    k: int,
    target_recall: float,
    train_sample: int | None = None,
    shards: int | None = None,
    progress: bool = False,
) -> tuple[faiss.Index, Tuned, dict[str, Any]]:
    """Train, add in shards, merge, tune: the index `build.build_arrays` would build."""
    ids = np.asarray(ids, dtype=np.int64)
    count = vectors.shape[0]
    template = build.make_index(factory, vectors.shape[1], metric)
    check_mergeable(template, factory)
    ivf = faiss.try_extract_index_ivf(template)
    if train_sample is None:
        train_sample = selection.train_size_for(int(ivf.nlist) if ivf else 1, count)
    t = time.perf_counter()
    build.train(template, vectors, train_sample)
    train_s = time.perf_counter() - t
    rest, held = build.tuning_split(count, k)
    n_shards = shards or _default_shards(ray, rest.size)
    parts = [p for p in np.array_split(rest, min(n_shards, max(rest.size, 1))) if p.size]
    t = time.perf_counter()
    blob = ray.put(faiss.serialize_index(template))
    vec_refs = [ray.put(np.ascontiguousarray(vectors[p])) for p in parts]
    id_refs = [ray.put(ids[p]) for p in parts]
    add = ray.remote(num_cpus=1)(add_shard)
    filled = [add.remote(blob, v, i) for v, i in zip(vec_refs, id_refs, strict=True)]
    truth_refs = []
    if held.size:
        queries = ray.put(np.ascontiguousarray(vectors[held]))
        exact = ray.remote(num_cpus=1)(exact_shard)
        metric_type = build.faiss_metric(metric)
        truth_refs = [exact.remote(v, i, queries, k, metric_type)
                      for v, i in zip(vec_refs, id_refs, strict=True)]  # fmt: skip
    _wait(ray, filled + truth_refs, progress)
    add_s = time.perf_counter() - t
    t = time.perf_counter()
    index = faiss.deserialize_index(ray.get(filled[0]))
    for ref in filled[1:]:
        stored_ids.merge(index, faiss.deserialize_index(ray.get(ref)))
    merge_s = time.perf_counter() - t
    truth = None
    if truth_refs:
        larger_first = build.faiss_metric(metric) == faiss.METRIC_INNER_PRODUCT
        truth = merge_topk([ray.get(r) for r in truth_refs], k, larger_first)
    from_store = rerank.for_tuning(factory, ids, vectors)
    tuned = build.tune_held_out(index, vectors, ids, held, truth, k, target_recall, from_store)
    info = {"shards": len(parts), "train_sample": min(train_sample, count),
            "seconds_training": round(train_s, 3), "seconds_adding": round(add_s, 3),
            "seconds_merging": round(merge_s, 3)}  # fmt: skip
    log.info("sharded build: %s", info)
    return index, tuned, info


def _default_shards(ray: Any, rows: int) -> int:
    cpus, _ = ray_cluster.resources(ray)
    return max(1, min(int(cpus) or 1, math.ceil(rows / MIN_SHARD_ROWS)))


def _wait(ray: Any, refs: list[Any], progress: bool) -> None:
    """Wait for every task, showing tasks done / total."""
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=len(refs), desc="index tasks", unit="task", file=sys.stderr)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        if bar is not None:
            bar.update(len(done))
    if bar is not None:
        bar.close()


def add_shard(blob: np.ndarray, vectors: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """A Ray task: the trained empty index, filled with one shard, serialised back."""
    faiss.omp_set_num_threads(1)
    index = faiss.deserialize_index(blob)
    index.add_with_ids(vectors, ids)
    return faiss.serialize_index(index)


def exact_shard(
    base: np.ndarray, base_ids: np.ndarray, queries: np.ndarray, k: int, metric_type: int
) -> tuple[np.ndarray, np.ndarray]:
    """A Ray task: exact top-k of the queries within one shard (ids, distances)."""
    from featurebank.index.tuning import exact_search

    faiss.omp_set_num_threads(1)
    return exact_search(base, base_ids, queries, k, metric_type)


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int, larger_first: bool) -> np.ndarray:
    """The global top-k ids from per-shard top-k lists (ties keep shard order)."""
    ids = np.concatenate([p[0] for p in parts], axis=1)
    dist = np.concatenate([p[1] for p in parts], axis=1)
    order = np.argsort(-dist if larger_first else dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, axis=1)


__all__ = ["build_index_ray", "build_sharded", "merge_topk"]
