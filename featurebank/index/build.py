"""Building and updating a bank's index generations.

Why generations: a build writes everything (index file, fitted transform,
manifest) into a staging folder beside the generations and only then publishes
it (rename + atomic CURRENT switch, see featurebank/core/bank.py). A build killed at any
point leaves CURRENT on the previous good generation, and searchers switch to a
new generation whenever they refresh.

FAISS ids are store item ids (kept in an IVF's lists or an IndexIDMap2, see
index/stored_ids.py), so relabelling never touches the index and a fold
(index/fold.py) can add and remove items by id. An `ondisk` build writes the IVF's
lists to a file beside the index that searchers memory-map.

The build is split into steps (`prepare`, `build_arrays` or its pieces `train` /
`tuning_split` / `tune_held_out`, `publish_build`) because the Ray builder
(`ray_build`) runs the same steps with the adding spread over tasks; they stay in one
module (over 400 lines) so that both builders visibly share one manifest and one
publishing path.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from featurebank.core.bank import Bank, load_newest_intact, publish_files
from featurebank.core.errors import (
    DamagedFile,
    FailedPrecondition,
    InvalidInput,
    RecallBelowTarget,
    shown,
)
from featurebank.core.memory import release_free_memory
from featurebank.core.params import IndexParams
from featurebank.core.vocabulary import metric as metric_named
from featurebank.index import coarse, rerank, selection, stored_ids, transforms
from featurebank.index.families import family_of
from featurebank.index.tuning import Tuned, exact_search, timed_search, tune
from featurebank.index.views import INDEX_FILE, MANIFEST_FILE, read_manifest
from featurebank.store import BankLike, Store, borrowed

log = logging.getLogger(__name__)

FORMAT = 1
HOLDOUT = 1000  # held-out tuning queries (at most 10% of the bank)
TRAIN_MAX = selection.TRAIN_MAX  # vectors used to train IVF/PQ/OPQ
ADD_BATCH = 65_536


def faiss_metric(name: str) -> int:
    """The FAISS metric constant an index for metric `name` is built with."""
    return faiss.METRIC_L2 if metric_named(name).faiss_kind == "l2" else faiss.METRIC_INNER_PRODUCT


def faiss_reason(e: Exception) -> str:
    """The readable tail of a faiss C++ exception ('Error in ... at file.cpp:12: reason')."""
    text = str(e).strip().splitlines()[-1] if str(e).strip() else "rejected"
    return text.split(" at ", 1)[-1].split(": ", 1)[-1]


# faiss parses factory strings with std::regex, whose recursion overflows the stack on
# long input (a 30,000-character string kills the process); real ones are short.
MAX_FACTORY_CHARS = 256


def make_index(factory: str, dim: int, metric: str) -> faiss.Index:
    """faiss.index_factory in the layout that holds store ids; bad strings -> InvalidInput."""
    if len(factory) > MAX_FACTORY_CHARS:
        raise InvalidInput(
            f"faiss factory string {shown(factory)} is longer than {MAX_FACTORY_CHARS} characters"
        )
    try:
        index = stored_ids.make(rerank.split(factory)[0], dim, faiss_metric(metric))
    except RuntimeError as e:
        raise InvalidInput(
            f"unknown or invalid faiss factory string {shown(factory)} for dimension {dim}: "
            f"{faiss_reason(e)}"
        ) from e
    return index


def add_batches(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, progress: bool) -> None:
    """Add vectors: graphs in one call, other indexes in chunks (progress, small peak memory).

    An HNSW graph must get its vectors in one `add`: faiss inserts each call's
    vectors level by level, highest first, and a graph grown chunk by chunk from
    class-ordered data (what a class-folder embed produces) leaves later clusters
    badly linked; recall then plateaus far below target at any efSearch
    (tests/test_index_recall.py measures both ways).
    """
    step = max(len(ids), 1) if family_of(index).graph else ADD_BATCH
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ids), desc="indexing", unit="vec", file=None)
    try:
        for i in range(0, len(ids), step):
            index.add_with_ids(vectors[i : i + step], ids[i : i + step])
            if bar is not None:
                bar.update(min(step, len(ids) - i))
    finally:
        if bar is not None:
            bar.close()


def training_sample(vectors: np.ndarray, size: int = TRAIN_MAX) -> np.ndarray:
    """At most `size` vectors, drawn the same way by every builder (same sample, same index)."""
    if vectors.shape[0] <= size:
        return vectors
    pick = np.random.default_rng(1).choice(vectors.shape[0], size, replace=False)
    return vectors[np.sort(pick)]


def train(index: faiss.Index, vectors: np.ndarray, sample_size: int = TRAIN_MAX) -> None:
    if index.is_trained:
        return
    sample = training_sample(vectors, sample_size)
    try:
        coarse.train_lists(index, sample)  # many lists: in two levels (index/coarse.py)
        index.train(sample)
    except RuntimeError as e:
        raise InvalidInput(
            f"could not train the index on {sample.shape[0]} vectors: {faiss_reason(e)}"
        ) from e


def spectrum(vectors: np.ndarray, sample: int = 20_000) -> np.ndarray:
    """Variance along each principal axis (of a sample), for the PCA rule of selection."""
    if vectors.shape[0] > sample:
        pick = np.random.default_rng(3).choice(vectors.shape[0], sample, replace=False)
        vectors = vectors[np.sort(pick)]
    x = vectors.astype(np.float64)
    x -= x.mean(axis=0)
    return np.linalg.eigvalsh(x.T @ x / max(x.shape[0] - 1, 1))[::-1]


def split_holdout(count: int, wanted: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (indexed first, held out for tuning): at most 10% of the bank is held out."""
    n_hold = min(wanted, count // 10)
    order = np.random.default_rng(2).permutation(count)
    held = np.sort(order[:n_hold])
    rest = np.sort(order[n_hold:])
    return rest, held


def build_arrays(
    vectors: np.ndarray,
    ids: np.ndarray,
    factory: str,
    metric: str,
    k: int,
    target_recall: float,
    progress: bool = False,
    train_sample: int = TRAIN_MAX,
) -> tuple[faiss.Index, Tuned]:
    """Build and tune an index over already-transformed vectors (no store, no files)."""
    ids = np.asarray(ids, dtype=np.int64)
    index = make_index(factory, vectors.shape[1], metric)
    train(index, vectors, train_sample)
    rest, held = tuning_split(vectors.shape[0], k)
    base = vectors[rest]  # one copy for adding and for the ground truth (a bank's worth)
    add_batches(index, base, ids[rest], progress)
    truth = None
    if held.size:
        truth, _ = exact_search(base, ids[rest], vectors[held], k, faiss_metric(metric))
    del base
    from_store = rerank.for_tuning(factory, ids, vectors)
    tuned = tune_held_out(index, vectors, ids, held, truth, k, target_recall, from_store)
    return index, tuned


def tuning_split(count: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`split_holdout` for tuning at k: nothing held out when too few would be left indexed."""
    rest, held = split_holdout(count, HOLDOUT)
    if held.size and k > rest.size:
        rest, held = np.arange(count), held[:0]
    return rest, held


def tune_held_out(
    index: faiss.Index,
    vectors: np.ndarray,
    ids: np.ndarray,
    held: np.ndarray,
    truth: np.ndarray | None,
    k: int,
    target_recall: float,
    from_store: rerank.VectorsOf | None = None,
) -> Tuned:
    """Tune on the held-out vectors against `truth`, then add them; with none held out
    (a tiny bank), only time searches for the record. `from_store`: the vectors the
    candidates are re-ranked on (a factory ending in RStore)."""
    if held.size and truth is not None:
        queries = vectors[held]
        tuned = tune(index, queries, truth, k, target_recall, from_store)
        add_batches(index, queries, ids[held], progress=False)
        return tuned
    queries = vectors[: min(vectors.shape[0], HOLDOUT)]
    _, secs = timed_search(index, queries, min(k, vectors.shape[0]))
    n = max(queries.shape[0], 1)
    return Tuned({}, float("nan"), 1000 * secs / n, n / max(secs, 1e-9), False)


def check_recall(tuned: Tuned, params: IndexParams, what: str) -> None:
    """Refuse an index measured below its target, unless the params allow it (then warn)."""
    if tuned.reached or math.isnan(tuned.recall):  # reached, or too small to measure
        return
    message = (
        f"index {what} reached recall@{params.k} {tuned.recall:.3f} at its best setting, "
        f"below the target {params.target_recall}"
    )
    if params.allow_below_target:
        log.warning("%s (published: allow_below_target is set)", message)
        return
    raise RecallBelowTarget(
        f"{message}: not published; choose another factory or a larger memory budget, "
        "lower the target, or allow it explicitly (--allow-below-target)"
    )


@contextmanager
def omp_threads(threads: int | None) -> Any:
    if threads is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def live_params(bank: Bank) -> IndexParams:
    """The params the live generation was built with (the defaults when there is none)."""
    try:
        found = load_newest_intact(
            bank.indexes_dir, lambda n: read_manifest(bank.indexes_dir / str(n)), "index"
        )
    except DamagedFile as e:
        log.warning("%s: building with the default params", e)
        found = None
    return IndexParams() if found is None else IndexParams.from_manifest(found[1])


def build_index(
    bank: BankLike, *, progress: bool = False, threads: int | None = None, **overrides: Any
) -> dict[str, Any]:
    """Build an index over the whole store, tune it, publish it as the next generation.

    Starts from the live generation's IndexParams; only the fields named in `overrides`
    (factory, metric, transform, memory_budget, target_recall, k, allow_below_target;
    None keeps the live value) change. An index measured below its target recall is not
    published (RecallBelowTarget) unless the params allow it.
    """
    with borrowed(bank) as st:
        params = live_params(st.bank).override(**overrides)
        transforms.parse(params.resolved_transform)
        try:
            with omp_threads(threads):
                return _build(st.bank, st, params, progress)
        finally:
            release_free_memory()  # the build's temporaries are gone; their heap need not stay


@dataclass
class Prepared:
    """A bank's vectors ready to index: transformed, with the factory chosen for them."""

    xt: np.ndarray
    ids: np.ndarray
    fitted: transforms.Transform
    choice: selection.Choice
    store_generation: int


def prepare(bank: Bank, store: Store, params: IndexParams, sharded: bool = False) -> Prepared:
    """Read the store, fit and apply the transform, choose the factory (`sharded`: only
    indexes that can be built in shards and merged, see selection.choose_factory)."""
    factory, metric, transform, k = params.factory, params.metric, params.resolved_transform, params.k
    dim = int(store.spec.dim)
    transforms.check_fits(transform, dim)
    store_generation = int(store.generation)  # read first: a fold re-adds nothing twice
    items = store.to_numpy()
    count = len(items)
    if count == 0:
        raise FailedPrecondition(f"the store in {bank.root} is empty: add vectors first")
    if k > count:
        raise InvalidInput(f"k={k} is more than the {count} items in the bank")
    vectors = transforms.as_vectors(items.vectors, dim, f"store vectors in {bank.root}")
    fitted = transforms.fit(transform, vectors, normalize_output=metric_named(metric).unit_vectors)
    xt = fitted.apply(vectors)
    del vectors
    if factory == "auto":
        pca_dim = None
        if count > selection.FLAT_MAX_COUNT and not sharded:
            pca_dim = selection.pca_dim_for(spectrum(xt), fitted.out_dim)
        choice = selection.choose_factory(
            count, fitted.out_dim, params.memory_budget, k, pca_dim, metric, sharded=sharded,
            ondisk=params.ondisk,
        )
    else:
        choice = selection.Choice(factory, "given by the user", 0)
        if params.ondisk and not stored_ids.in_lists(make_index(factory, fitted.out_dim, metric)):
            raise InvalidInput(
                f"--ondisk keeps inverted lists on disk, and factory {shown(factory)} has none "
                "(or re-ranks by position): use an IVF factory such as IVF4096,Flat or IVF4096,PQ32"
            )
    log.info("building %s over %d x %d (%s)", choice.factory, count, fitted.out_dim, choice.reason)
    return Prepared(xt, items.ids, fitted, choice, store_generation)


def publish_build(
    bank: Bank,
    store: Store,
    params: IndexParams,
    prepared: Prepared,
    index: faiss.Index,
    tuned: Tuned,
    started: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the manifest and publish the index as the bank's next generation (unless it
    was measured below its target recall and the params do not allow that)."""
    count = len(prepared.ids)
    check_recall(tuned, params, f"{prepared.choice.factory} over {count} vectors")
    manifest = {
        "format": FORMAT,
        "index_params": params.to_dict(),
        "factory": prepared.choice.factory,
        "requested_factory": params.factory,
        "selection": prepared.choice.to_dict(),
        "metric": params.metric,
        "dim": int(store.spec.dim),
        "index_dim": prepared.fitted.out_dim,
        "transform": prepared.fitted.to_dict(),
        "transform_source": params.transform_source,
        "store_generation": prepared.store_generation,
        "ntotal": int(index.ntotal),
        "k": params.k,
        "target_recall": params.target_recall,
        **tuned.manifest_fields(),
        "threads": faiss.omp_get_max_threads(),
        "spec": store.spec.to_dict(),
        "built_at": time.time(),
        "build_seconds": 0.0,
        "unremoved_deleted": 0,
        "memory_budget": params.memory_budget,
        "ondisk": params.ondisk,
        **(extra or {}),
    }
    manifest["build_seconds"] = round(time.perf_counter() - started, 3)
    gen = write_generation(bank, index, manifest, fitted_save=prepared.fitted.save)
    log.info("published index generation %d in %.1fs", gen, manifest["build_seconds"])
    return {**manifest, "generation": gen}


def _build(bank: Bank, store: Store, params: IndexParams, progress: bool) -> dict[str, Any]:
    started = time.perf_counter()
    prep = prepare(bank, store, params)
    index, tuned = build_arrays(prep.xt, prep.ids, prep.choice.factory, params.metric, params.k,
                               params.target_recall, progress)  # fmt: skip
    return publish_build(bank, store, params, prep, index, tuned, started)


def write_generation(
    bank: Bank, index: faiss.Index, manifest: dict[str, Any], fitted_save: Any = None,
    transform_from: Path | None = None,
) -> int:
    """Write index + transform + manifest into staging, then publish atomically.

    An on-disk index (the manifest's `ondisk`) gets its lists copied into staging's own
    file: a published generation's files are never written again.
    """

    def write(staging: Path) -> None:
        if manifest.get("ondisk"):
            stored_ids.write_ids(index, staging)  # read from memory, before the lists move
            stored_ids.move_lists(index, staging / stored_ids.ONDISK_FILE)
        faiss.write_index(index, str(staging / INDEX_FILE))
        if fitted_save is not None:
            fitted_save(staging)
        elif transform_from is not None:
            shutil.copyfile(transform_from / transforms.FILE_NAME, staging / transforms.FILE_NAME)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=float))

    return publish_files(bank.indexes_dir, write, "index", keep=2)
