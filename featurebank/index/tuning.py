"""Tuning search parameters (efSearch, nprobe) for a target recall@k at the lowest latency.

Why held-out queries: a vector that is in the index finds itself at distance 0
and sits next to its own graph links, so tuning on indexed vectors overstates
recall. The builder holds a sample of the bank back from the index, tunes on it
against exact search over what was indexed, and only then adds the sample.

Why a lower bound: the tuning queries are a sample, and the lowest setting whose
*mean* recall on them meets the target misses it on fresh queries about half the
time (the choice stops where the sample happened to be kind). A setting counts as
reaching the target only when the lower confidence bound of its recall (normal, over
per-query recall, one-sided 95%) does; the manifest publishes that bound.

Latency grows with efSearch/nprobe and recall (almost always) does too, so the
lowest value reaching the target is the fastest one; a bisection over the grid
finds it in a few searches.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import faiss
import numpy as np

from featurebank.index.families import STORE_FACTOR, set_params, tunable
from featurebank.index.rerank import Reranked, VectorsOf

log = logging.getLogger(__name__)

CONFIDENCE = 0.95  # the published lower bound holds with this confidence (one-sided)
CONFIDENCE_Z = 1.6449  # the normal quantile of CONFIDENCE
# A setting short of the target whose recall is within this of the smaller one tried
# before it ends the search along the main knob: its largest values (nprobe = nlist, all
# lists) cost the most and, on codes too coarse for the target, gain nothing. At 10M with
# 131,072 lists each such point scanned every code for every held-out query.
PLATEAU = 0.002


@dataclass
class Tuned:
    """What the tuner chose and measured (goes into the manifest)."""

    params: dict[str, int]
    recall: float
    latency_ms: float  # per query, in batches, with the build's thread count
    qps: float
    reached: bool  # the recall's lower confidence bound met the target
    trace: list[dict[str, float]] = field(default_factory=list)
    recall_lower_bound: float = float("nan")
    queries: int = 0  # tuning queries the recall was measured on

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def manifest_fields(self) -> dict[str, object]:
        """What a build or fold publishes of this measurement (one set of keys for both)."""
        return {
            "params": self.params, "recall_at_k": self.recall,
            "recall_lower_bound": self.recall_lower_bound, "recall_confidence": CONFIDENCE,
            "target_reached": self.reached, "latency_ms": self.latency_ms, "qps": self.qps,
            "tuning": self.trace, "tuning_queries": self.queries,
        }


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the true k nearest neighbours found (ids; -1 never counts)."""
    if truth.size == 0:
        return 1.0
    hits = 0
    for f, t in zip(found, truth, strict=True):
        hits += np.intersect1d(f[f >= 0], t[t >= 0]).size
    return hits / max(int((truth >= 0).sum()), 1)


def recall_per_query(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Each query's share of its true k nearest neighbours found (ids; -1 never counts)."""
    out = np.ones(truth.shape[0])
    for i, (f, t) in enumerate(zip(found, truth, strict=True)):
        t = t[t >= 0]
        if t.size:
            out[i] = np.intersect1d(f[f >= 0], t).size / t.size
    return out


def recall_bound(per_query: np.ndarray, z: float = CONFIDENCE_Z) -> float:
    """Lower confidence bound of the mean recall (normal, over per-query recall)."""
    n = per_query.size
    if n == 0:
        return 1.0
    if n == 1:
        return float(per_query[0])
    return float(per_query.mean() - z * per_query.std(ddof=1) / np.sqrt(n))


def exact_search(
    base: np.ndarray, base_ids: np.ndarray, queries: np.ndarray, k: int, metric_type: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth: brute-force k nearest ids (base_ids space) and raw faiss distances
    (searched in place: an index would copy the whole base first)."""
    base, queries = (np.ascontiguousarray(a, np.float32) for a in (base, queries))
    dist, pos = faiss.knn(queries, base, min(k, base.shape[0]), metric=metric_type)
    ids = np.where(pos >= 0, base_ids[np.maximum(pos, 0)], -1).astype(np.int64)
    return ids, dist


def timed_search(
    index: faiss.Index | Reranked, queries: np.ndarray, k: int, batch: int = 1000
) -> tuple[np.ndarray, float]:
    """Search in batches (as a server would) and return ids and seconds taken."""
    out = np.empty((queries.shape[0], k), dtype=np.int64)
    start = time.perf_counter()
    for i in range(0, queries.shape[0], batch):
        _, out[i : i + batch] = index.search(queries[i : i + batch], k)
    return out, time.perf_counter() - start


def tune(
    index: faiss.Index,
    queries: np.ndarray,
    truth: np.ndarray,
    k: int,
    target_recall: float,
    vectors_of: VectorsOf | None = None,
) -> Tuned:
    """Fastest setting whose recall's lower confidence bound on `queries` (held out of
    `index`) reaches `target_recall`.

    The main knob (efSearch/nprobe) is bisected for each value of the secondary
    one (re-ranking factor), and the fastest of those winners is kept. `vectors_of`:
    the candidates are re-ranked on these exact vectors (index/rerank.py), and the
    re-ranking factor is tuned with the re-ranking timed.
    """
    grid = tunable(index, k, from_store=vectors_of is not None)
    searched = index if vectors_of is None else Reranked(index, vectors_of)
    n = max(queries.shape[0], 1)
    trace: list[dict[str, float]] = []

    def apply(params: dict[str, int]) -> None:
        set_params(index, params)
        if isinstance(searched, Reranked):
            searched.factor = params.get(STORE_FACTOR, 1)

    def measure(params: dict[str, int]) -> Tuned:
        apply(params)
        found, secs = timed_search(searched, queries, k)
        recall = recall_at_k(found, truth)
        bound = recall_bound(recall_per_query(found, truth))
        trace.append({**params, "recall": recall, "recall_lower_bound": bound,
                      "latency_ms": 1000 * secs / n})
        log.debug("tuning %s: recall@%d %.4f (>= %.4f) in %.3fs", params, k, recall, bound, secs)
        return Tuned(params, recall, 1000 * secs / n, n / max(secs, 1e-9),
                     bound >= target_recall, trace, bound, queries.shape[0])

    if not grid:
        return measure({})
    names = list(grid)
    main, values = names[0], grid[names[0]]
    extra = [{names[1]: v} for v in grid[names[1]]] if len(names) > 1 else [{}]
    winners: list[Tuned] = []
    fallback: Tuned | None = None
    for base in extra:
        lo, hi, best, short = 0, len(values) - 1, None, None
        while lo <= hi:  # bisection: recall is (near) monotone in the parameter
            mid = (lo + hi) // 2
            m = measure({**base, main: values[mid]})
            if m.reached:
                best, hi = m, mid - 1
                continue
            if best is None and short is not None and m.recall < short.recall + PLATEAU:
                short = m if m.recall > short.recall else short
                break  # more of the main knob no longer helps (codes too coarse for it)
            short, lo = m, mid + 1
        if best is not None:
            winners.append(best)
        elif short is not None and (fallback is None or short.recall > fallback.recall):
            fallback = short
    if winners:  # re-time each winner once more (machines are noisy) and keep the fastest
        for w in winners:
            apply(w.params)
            _, again = timed_search(searched, queries, k)
            w.latency_ms = min(w.latency_ms, 1000 * again / n)
            w.qps = 1000 / max(w.latency_ms, 1e-9)
        chosen = min(winners, key=lambda w: w.latency_ms)
    else:
        assert fallback is not None
        chosen = fallback
        log.warning("target recall@%d %.3f not reached: %s gives %.4f (lower bound %.4f)",
                    k, target_recall, chosen.params, chosen.recall, chosen.recall_lower_bound)
    apply(chosen.params)
    return chosen
