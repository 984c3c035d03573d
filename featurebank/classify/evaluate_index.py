"""Measuring the live index: recall@k against exact search, queries/s, kNN accuracy on val.

Why leave-one-out: after a build every bank vector is in the index, so each
query is searched without its own item (for the approximate and the exact
search alike), which is what a new, similar vector would see.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from featurebank.classify.knn import Voter
from featurebank.core.errors import FailedPrecondition, InvalidInput
from featurebank.core.vocabulary import VOTE_WEIGHTS
from featurebank.index.build import faiss_metric
from featurebank.index.searcher import Searcher, drop_excluded
from featurebank.index.tuning import exact_search, recall_at_k
from featurebank.store import BankLike

BATCH = 1000


def evaluate(
    bank: BankLike,
    k: int = 10,
    queries: int = 1000,
    knn_k: int = 20,
    temperature: float = 0.07,
    split: str = "val",
    seed: int = 0,
) -> dict[str, Any]:
    """Recall@k (vs exact), queries/s in batches of 1,000, and kNN accuracy on `split`."""
    if queries <= 0:
        raise InvalidInput(f"queries must be positive, got {queries}")
    with Searcher.load(bank) as searcher:
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
        report: dict[str, Any] = {
            "generation": searcher.generation,
            "factory": searcher.manifest.get("factory"),
            "params": searcher.manifest.get("params"),
            "ntotal": searcher.ntotal,
            "k": k,
            "queries": int(len(q)),
            f"recall_at_{k}": recall_at_k(found, truth),
            "qps": len(q) / max(secs, 1e-9),
            "latency_ms": 1000 * secs / max(len(q), 1),
            "knn": knn_accuracy(searcher, knn_k, temperature, split),
        }
        return report


def exact_leave_one_out(
    base: np.ndarray, base_ids: np.ndarray, queries: np.ndarray, qids: np.ndarray, k: int,
    metric_name: str,
) -> np.ndarray:
    """Exact k nearest ids of each query, its own item (`qids`) left out."""
    ids, dist = exact_search(base, base_ids, queries, k + 1, faiss_metric(metric_name))
    return drop_excluded(ids, dist, qids, k)[0]


def knn_accuracy(
    searcher: Searcher, k: int, temperature: float, split: str
) -> dict[str, Any]:
    """Leave-one-out kNN accuracy of each vote weighting on the labelled `split` items."""
    items = searcher.store.to_numpy(split=split, labelled_only=True)
    if len(items) == 0:
        return {"split": split, "items": 0, "accuracy": None}
    k = min(k, max(searcher.ntotal - 1, 1))
    result = searcher.search(
        items.vectors, k, exclude_ids=items.ids.astype(np.int64), voters_only=True
    )
    vocab = result.vocabulary
    truth = np.array([vocab.index(t) if t in vocab else -1 for t in items.labels])
    accuracy = {}
    for weights in VOTE_WEIGHTS:
        probs, _ = Voter(k, temperature, weights, searcher.metric).of(result)
        voted = probs.max(axis=1) > 0  # a row with no labelled neighbour predicts nothing
        accuracy[weights] = float((voted & (probs.argmax(axis=1) == truth)).mean())
    return {"split": split, "items": len(items), "k": k, "accuracy": accuracy}
