"""Measuring the live index: recall@k against exact search and queries/s.

Why leave-one-out: after a build every bank vector is in the index, so each
query is searched without its own item (for the approximate and the exact
search alike), which is what a new, similar vector would see. How well the
neighbours classify is the classifier's to measure (`classify.knn.knn_accuracy`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from featurebank.core.errors import FailedPrecondition, InvalidInput
from featurebank.index.build import faiss_metric
from featurebank.index.searcher import Searcher, drop_excluded
from featurebank.index.tuning import exact_search, recall_at_k

BATCH = 1000


def evaluate(searcher: Searcher, k: int = 10, queries: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Recall@k (vs exact, leave-one-out) and queries/s in batches of 1,000 of the loaded index."""
    if queries <= 0:
        raise InvalidInput(f"queries must be positive, got {queries}")
    view = searcher._view
    live = np.setdiff1d(view.gen.index_ids, view.stale)
    if live.size <= k:
        raise FailedPrecondition(f"the index holds {live.size} live items, k={k} needs more")
    base = searcher.store.to_numpy(ids=live.astype(np.uint64))
    xt = searcher.transform(base.vectors)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(live.size, min(queries, live.size), replace=False))
    q, qids = base.vectors[pick], base.ids[pick].astype(np.int64)
    truth = exact_leave_one_out(xt, base.ids.astype(np.int64), xt[pick], qids, k,
                                searcher.metric)
    found = searcher.search(q, k, exclude_ids=qids).ids
    start = time.perf_counter()
    for i in range(0, len(q), BATCH):
        searcher.search(q[i : i + BATCH], k)
    secs = time.perf_counter() - start
    return {
        "generation": searcher.generation,
        "factory": searcher.manifest.get("factory"),
        "params": searcher.manifest.get("params"),
        "ntotal": searcher.ntotal,
        "k": k,
        "queries": int(len(q)),
        f"recall_at_{k}": recall_at_k(found, truth),
        "qps": len(q) / max(secs, 1e-9),
        "latency_ms": 1000 * secs / max(len(q), 1),
    }


def exact_leave_one_out(
    base: np.ndarray, base_ids: np.ndarray, queries: np.ndarray, qids: np.ndarray, k: int,
    metric_name: str,
) -> np.ndarray:
    """Exact k nearest ids of each query, its own item (`qids`) left out."""
    ids, dist = exact_search(base, base_ids, queries, k + 1, faiss_metric(metric_name))
    return drop_excluded(ids, dist, qids, k)[0]
