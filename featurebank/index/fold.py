"""Folding the store's changes into the live index generation, keeping its recall.

A fold adds the items committed since the generation (in one `add`, see
`build.add_batches`), removes deleted ones where the index can (Flat) and
filters them otherwise, and publishes the result as the next generation. It is
what a checkpoint runs (index/checkpoint.py) and what `featurebank index
update` runs.

Why a fold is measured: appending a large batch onto an HNSW graph can leave
the new region badly linked (recall collapses while the build's measurement
still says 0.99). So, like the build, a fold holds back a sample of the new
items, re-tunes the search parameters on them against exact search over the
whole index, and only then adds them. A fold measured below the target is
replaced by a full rebuild (one `add` of everything, measured the same way);
if even that is below target it is refused with RecallBelowTarget, unless the
index params allow it. Folds of fewer than MIN_MEASURED new items keep the last
measurement: a handful of insertions cannot restructure a graph.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from featurebank.core.bank import Bank, current_dir
from featurebank.core.errors import FeaturebankError, NotFound
from featurebank.core.params import IndexParams
from featurebank.index import rerank, stored_ids, transforms
from featurebank.index.build import (
    HOLDOUT,
    _build,
    add_batches,
    check_recall,
    faiss_metric,
    write_generation,
)
from featurebank.index.families import family_of
from featurebank.index.tuning import Tuned, exact_search, tune
from featurebank.index.views import INDEX_FILE, index_ids, read_manifest
from featurebank.store import BankLike, Changes, Store, borrowed

log = logging.getLogger(__name__)

MIN_MEASURED = 40  # new items needed to hold some back and measure the fold
RETRIES = 3  # re-reads when an item is deleted while the fold reads it


def removable(index: faiss.Index) -> bool:
    """Whether ids can be removed in place: a plain Flat under the IDMap, or an IVF in
    memory holding store ids in its lists.

    HNSW cannot remove at all, IndexIDMap2 renumbers its positions on removal while
    inverted lists keep the old ones, and on-disk lists are read-only, so those are
    filtered at search time.
    """
    if stored_ids.in_lists(index):
        return stored_ids.lists_in_memory(index)
    inner = stored_ids.searching(index)
    return type(inner) in (faiss.IndexFlat, faiss.IndexFlatL2, faiss.IndexFlatIP)


def _as_ids(values: Iterable[int] | np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


def update_index(
    bank: BankLike,
    progress: bool = False,
    rebuild_fraction: float = 0.2,
) -> dict[str, Any]:
    """Bring the live index up to the store: add new items, remove (or filter) deleted ones.

    The transform is not refitted. When more than `rebuild_fraction` of the
    index is deleted-but-unremovable (HNSW), or the fold measures below the
    target recall, the index is rebuilt instead (RecallBelowTarget if that is
    below target too and the params do not allow it).
    """
    with borrowed(bank) as st:
        for attempt in range(RETRIES):
            try:
                return _update(st.bank, st, progress, rebuild_fraction)
            except NotFound:  # an added item was deleted while being read: read again
                if attempt == RETRIES - 1:
                    raise
        raise AssertionError("unreachable")


def _rebuild_like(bank: Bank, store: Store, manifest: dict[str, Any], why: str) -> dict[str, Any]:
    log.info("rebuilding the index: %s", why)
    out = _build(bank, store, IndexParams.from_manifest(manifest), progress=False)
    return {**out, "rebuilt": why}


def _update(bank: Bank, store: Store, progress: bool, rebuild_fraction: float) -> dict[str, Any]:
    started = time.perf_counter()
    directory = current_dir(bank.indexes_dir, "index")
    manifest = read_manifest(directory)
    if int(manifest["dim"]) != int(store.spec.dim):
        return _rebuild_like(bank, store, manifest, "the store's dimension changed")
    try:
        changes = store.changes_since(int(manifest["store_generation"]))
    except FeaturebankError as e:  # change log compacted past our generation
        return _rebuild_like(bank, store, manifest, f"no change log since the index: {e}")
    deleted = _as_ids(changes.deleted)
    added = np.setdiff1d(_as_ids(changes.added), deleted)
    if added.size == 0 and deleted.size == 0:
        log.info("index generation %s already covers the store's items", directory.name)
        return {**manifest, "generation": int(directory.name), "unchanged": True,
                "added": 0, "removed": 0}
    index = stored_ids.read(directory / INDEX_FILE)
    with stored_ids.adding(index, directory / INDEX_FILE) as adder:
        return _fold(bank, store, directory, manifest, changes, index, adder, deleted, added,
                     progress, rebuild_fraction, started)  # fmt: skip


def _fold(
    bank: Bank,
    store: Store,
    directory: Path,
    manifest: dict[str, Any],
    changes: Changes,
    index: faiss.Index,
    adder: faiss.Index,
    deleted: np.ndarray,
    added: np.ndarray,
    progress: bool,
    rebuild_fraction: float,
    started: float,
) -> dict[str, Any]:
    """Remove (or count) the deleted items, add the new ones measured, publish.

    `adder` takes the additions that `index` then searches (itself, but for on-disk lists:
    stored_ids.adding)."""
    present = index_ids(index, directory)
    deleted = deleted[np.isin(deleted, present)]
    added = added[~np.isin(added, present)]
    removed, unremoved = 0, int(manifest.get("unremoved_deleted", 0))
    if deleted.size and removable(index):
        removed = int(index.remove_ids(faiss.IDSelectorBatch(deleted)))
    elif deleted.size:  # searchers filter these ids out instead
        unremoved += int(deleted.size)
    if unremoved > rebuild_fraction * max(index.ntotal, 1):
        return _rebuild_like(bank, store, manifest, f"{unremoved} deleted items still indexed")
    fitted = transforms.Transform.load(directory)
    tuned: Tuned | None = None
    construction = family_of(index).appending(adder) if added.size else {}
    if added.size:
        items = store.get(added.astype(np.uint64))
        vectors = transforms.as_vectors(items.vectors, fitted.in_dim, "added store vectors")
        xt, ids = fitted.apply(vectors), _as_ids(items.ids)
        kept = np.setdiff1d(present, deleted) if removed else present  # held by the index now
        tuned = _add_measured(index, adder, kept, store, fitted, manifest, xt, ids, progress)
    params = IndexParams.from_manifest(manifest)
    if tuned is not None and not tuned.reached and not math.isnan(tuned.recall):
        if not params.allow_below_target:
            return _rebuild_like(
                bank, store, manifest,
                f"the fold measured recall@{params.k} {tuned.recall:.3f} "
                f"below the target {params.target_recall}",
            )
        check_recall(tuned, params, f"generation {directory.name} + {added.size} items")
    measured = {} if tuned is None else tuned.manifest_fields()
    manifest = {
        **manifest,
        **measured,
        "store_generation": int(changes.generation),
        "ntotal": int(index.ntotal),
        "unremoved_deleted": unremoved,
        "updated_from": int(directory.name),
        "updated_at": time.time(),
        "update_seconds": round(time.perf_counter() - started, 3),
        "last_update": {"added": int(added.size), "removed": removed,
                        "filtered": int(deleted.size) - removed,
                        "measured": tuned is not None, **construction},
    }
    gen = write_generation(bank, index, manifest, transform_from=directory)
    log.info("index generation %d: +%d items, -%d removed", gen, added.size, removed)
    return {**manifest, "generation": gen, "added": int(added.size), "removed": removed}


def _add_measured(
    index: faiss.Index,
    adder: faiss.Index,
    indexed: np.ndarray,
    store: Store,
    fitted: transforms.Transform,
    manifest: dict[str, Any],
    xt: np.ndarray,
    ids: np.ndarray,
    progress: bool,
) -> Tuned | None:
    """Add the new items, holding a sample back to re-tune on (None: too few to measure);
    `indexed`: the ids the index held before."""
    n_hold = min(HOLDOUT, ids.size // 2) if ids.size >= MIN_MEASURED else 0
    if n_hold == 0:
        add_batches(adder, xt, ids, progress)
        stored_ids.sync_ntotal(index)
        return None
    pick = np.random.default_rng(int(ids[-1])).permutation(ids.size)
    held, rest = np.sort(pick[:n_hold]), np.sort(pick[n_hold:])
    add_batches(adder, xt[rest], ids[rest], progress)
    stored_ids.sync_ntotal(index)
    k = int(manifest["k"])
    base_ids, base = _indexed_vectors(store, fitted, np.union1d(indexed, ids[rest]))
    truth, _ = exact_search(base, base_ids, xt[held], k, faiss_metric(manifest["metric"]))
    from_store = rerank.for_tuning(str(manifest["factory"]), base_ids, base)
    tuned = tune(index, xt[held], truth, k, float(manifest["target_recall"]), from_store)
    add_batches(adder, xt[held], ids[held], progress=False)
    stored_ids.sync_ntotal(index)
    return tuned


def _indexed_vectors(
    store: Store, fitted: transforms.Transform, indexed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, transformed vectors) of the live items the index holds: the exact search's base."""
    items = store.to_numpy()
    ids = np.asarray(items.ids, dtype=np.int64)
    keep = np.isin(ids, indexed)
    vectors = transforms.as_vectors(items.vectors[keep], fitted.in_dim, "store vectors")
    return ids[keep], fitted.apply(vectors)
