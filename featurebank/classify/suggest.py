"""What to label next: unlabelled items ranked by how much a label would help.

Why these rankings: a label helps most where the bank is unsure, so every
strategy starts from the uncertainty of the classifier's probabilities (the live
mode: hybrid when a head exists, else the neighbours' vote):

- ``margin``: 1 - (p1 - p2), the gap between the two most probable labels;
- ``entropy``: the entropy of the probabilities over the vocabulary, in [0, 1];
- ``diverse``: the most uncertain items (by margin) spread over the feature space.
  Uncertain items crowd into the same confusing regions, so a batch picked by
  margin alone spends many labels on one question. ``diverse`` keeps the
  ``DIVERSE_POOL`` x n most uncertain candidates, splits them into n k-means
  clusters (in the index's transformed space) and takes the most uncertain item
  of each cluster (Zhdanov's weighted diverse mini-batch).

An item with no labelled neighbour and no head has all-zero probabilities and
counts as fully uncertain. Unlabelled items never vote, so no item votes for itself.

Cold start: a bank with no label at all has no uncertainty to rank by, so `suggest`
covers the feature space instead (`cold_start_pick`): n k-means clusters over the
unlabelled items (in the index's transformed space), and of each the item nearest its
centre (the most typical one), largest cluster first. The first round of labels then
spans the classes instead of landing wherever the storage order puts them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from featurebank.core.errors import FailedPrecondition, InvalidInput
from featurebank.core.vocabulary import SUGGEST_STRATEGIES, check_choice
from featurebank.index import filters

if TYPE_CHECKING:
    from featurebank.classify.classifier import Classifier

log = logging.getLogger(__name__)

DIVERSE_POOL = 10
BATCH = 4096
TOP_LABELS = 3


@dataclass(frozen=True)
class Suggestion:
    """One unlabelled item worth labelling: its score and the bank's current guesses."""

    key: str
    score: float  # uncertainty, higher = a label helps more
    labels: list[str]  # most probable labels first
    probs: list[float]


def margin_uncertainty(probs: np.ndarray) -> np.ndarray:
    """1 - (p1 - p2) per row: 1 when the two best labels tie (or nothing is known)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[1] == 0:
        return np.ones(p.shape[0])
    if p.shape[1] == 1:
        return 1.0 - p[:, 0]
    top2 = -np.partition(-p, 1, axis=1)[:, :2]
    return 1.0 - (top2[:, 0] - top2[:, 1])


def entropy_uncertainty(probs: np.ndarray) -> np.ndarray:
    """Entropy of each row over the vocabulary, divided by log C (rows of zeros count as 1)."""
    p = np.asarray(probs, dtype=np.float64)
    n, c = p.shape
    if c < 2:
        return margin_uncertainty(p)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1) / np.log(c)
    h[p.sum(axis=1) <= 0] = 1.0
    return np.clip(h, 0.0, 1.0)


def diverse_pick(
    vectors: np.ndarray, uncertainty: np.ndarray, n: int, pool: int = DIVERSE_POOL, seed: int = 0
) -> np.ndarray:
    """Positions of `n` uncertain rows from distinct k-means clusters, most uncertain first.

    The `pool * n` most uncertain rows are clustered into n groups; each group gives its
    most uncertain row.
    """
    u = np.asarray(uncertainty, dtype=np.float64)
    if n <= 0 or u.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-u, kind="stable")
    if u.size <= n:
        return order
    cand = order[: min(u.size, pool * n)]
    x = np.ascontiguousarray(vectors[cand], dtype=np.float32)
    import faiss

    km = faiss.Kmeans(x.shape[1], n, niter=20, seed=seed, verbose=False, min_points_per_centroid=1)
    km.train(x)
    _, assign = km.index.search(x, 1)
    assign = assign.ravel()
    picked: list[int] = []
    seen: set[int] = set()
    for pos in range(len(cand)):  # cand is in decreasing uncertainty: first of a cluster wins
        c = int(assign[pos])
        if c not in seen:
            seen.add(c)
            picked.append(int(cand[pos]))
    if len(picked) < n:  # empty clusters: fill with the most uncertain rows left
        taken = set(picked)
        picked.extend(int(i) for i in cand if int(i) not in taken)
    chosen = np.array(picked[:n], dtype=np.int64)
    return chosen[np.argsort(-u[chosen], kind="stable")]


def cold_start_pick(vectors: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(positions, cluster share) of the item nearest each of n k-means centres, largest first."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if n <= 0 or len(x) == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    if len(x) <= n:
        return np.arange(len(x), dtype=np.int64), np.full(len(x), 1.0 / len(x))
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    # k-means++ starts: a random start often splits a big cluster and merges two small ones
    with threadpool_limits(1):
        km = KMeans(n, n_init=3, random_state=seed).fit(x)
    sizes = np.bincount(km.labels_, minlength=n)
    nearest = np.array([
        int(members[np.argmin(((x[members] - km.cluster_centers_[c]) ** 2).sum(axis=1))])
        if (members := np.flatnonzero(km.labels_ == c)).size else -1
        for c in range(n)
    ])
    picked: list[int] = []
    shares: list[float] = []
    for c in np.argsort(-sizes, kind="stable").tolist():
        i = int(nearest[c])
        if sizes[c] > 0 and i >= 0 and i not in picked:
            picked.append(i)
            shares.append(float(sizes[c]) / len(x))
    return np.array(picked, np.int64), np.array(shares)


def _cold_start(classifier: Classifier, ids: np.ndarray, n: int, seed: int) -> list[Suggestion]:
    store = classifier.store
    items = store.to_numpy(ids=ids)
    picks, shares = cold_start_pick(classifier.searcher.transform(items.vectors), n, seed)
    out = [Suggestion(items.keys[i], float(sh), [], []) for i, sh in zip(picks, shares, strict=True)]
    log.info("no labels yet: suggested %d cluster representatives of %d items", len(out), len(ids))
    return out


def suggest(
    classifier: Classifier,
    n: int = 100,
    strategy: str = "margin",
    label: str | None = None,
    mode: str | None = None,
    seed: int = 0,
    where: filters.Node | None = None,
) -> list[Suggestion]:
    """The `n` unlabelled items whose label would help most, best first.

    `label` keeps only items with that label among their two most probable (the edge of
    that class). With no label in the bank yet, the representatives of n clusters (cold
    start; their score is the share of the bank their cluster holds). `where`: only
    items passing this filter are suggested. Raises FailedPrecondition when every item
    is labelled.
    """
    check_choice(strategy, SUGGEST_STRATEGIES, "strategy")
    if n < 1:
        raise InvalidInput(f"n must be at least 1, got {n}")
    store = classifier.store
    ids, codes, vocab = store.label_table()
    if label is not None and label not in vocab:
        listed = ", ".join(vocab) if vocab else "none yet"
        raise InvalidInput(f"unknown label {label!r}: the bank's labels are {listed}")
    unlabelled = ids[codes < 0]
    if unlabelled.size == 0:
        raise FailedPrecondition(f"every item of bank {classifier.bank.root} is labelled")
    if where is not None:
        passing = classifier.searcher.matching_ids(where)
        unlabelled = unlabelled[np.isin(unlabelled.astype(np.int64), passing)]
        if unlabelled.size == 0:
            return []
    if not vocab:
        return _cold_start(classifier, unlabelled, n, seed)
    scores: list[np.ndarray] = []
    keep: list[np.ndarray] = []
    tops: list[np.ndarray] = []
    top_p: list[np.ndarray] = []
    vocab_out: list[str] = []
    measure = entropy_uncertainty if strategy == "entropy" else margin_uncertainty
    for start in range(0, unlabelled.size, BATCH):
        chunk = unlabelled[start : start + BATCH]
        items = store.to_numpy(ids=chunk)
        probs, vocab_out = classifier.predict_proba(items.vectors, mode=mode)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :TOP_LABELS]
        mask = np.ones(len(chunk), dtype=bool)
        if label is not None:
            col = vocab_out.index(label) if label in vocab_out else -1
            mask = (order[:, :2] == col).any(axis=1) & (col >= 0)
        scores.append(measure(probs)[mask])
        keep.append(np.asarray(items.ids)[mask])
        tops.append(order[mask])
        top_p.append(np.take_along_axis(probs, order, axis=1)[mask])
    u = np.concatenate(scores)
    cand_ids = np.concatenate(keep)
    if strategy == "diverse":
        vectors = classifier.searcher.transform(store.to_numpy(ids=cand_ids).vectors)
        picks = diverse_pick(vectors, u, min(n, u.size), seed=seed)
    else:
        picks = np.argsort(-u, kind="stable")[:n]
    order_all, p_all = np.concatenate(tops), np.concatenate(top_p)
    keys = store.get(cand_ids[picks]).keys if picks.size else []
    out = []
    for key, i in zip(keys, picks.tolist(), strict=True):
        known = [j for j, p in enumerate(p_all[i]) if p > 0]
        out.append(
            Suggestion(
                key=key,
                score=float(u[i]),
                labels=[vocab_out[int(order_all[i, j])] for j in known],
                probs=[float(p_all[i, j]) for j in known],
            )
        )
    log.info("suggested %d of %d unlabelled items by %s", len(out), unlabelled.size, strategy)
    return out
