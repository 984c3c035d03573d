"""Nearest-neighbour classification: the one place neighbours turn into class probabilities.

Why these weights: ``uniform`` and ``distance`` (1/d) match scikit-learn's
KNeighborsClassifier exactly, so results can be checked against it;
``softmax`` (exp(similarity / T), T = 0.07) is what DINO's kNN evaluation
uses and is usually best for normalised embeddings, since close neighbours
dominate without a hard cut-off.

`Voter` (k, T, weights, metric) is what the classifier, head training and both
evaluations share (`knn_accuracy` measures it leave-one-out); `Neighbours` finds the labelled neighbours that head training
votes with, from the live index or, before one is built, by exact search.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from featurebank.core.errors import InvalidInput
from featurebank.core.vocabulary import VOTE_WEIGHTS, check_choice, metric
from featurebank.index.transforms import l2_normalize

if TYPE_CHECKING:
    from featurebank.index.searcher import Searcher, SearchResult

DEFAULT_K = 20
DEFAULT_T = 0.07


def neighbour_weights(
    scores: np.ndarray, weights: str, temperature: float, metric_name: str
) -> np.ndarray:
    """Per-neighbour vote weights, (n, k) float64."""
    s = np.asarray(scores, dtype=np.float64)
    check_choice(weights, VOTE_WEIGHTS, "vote weights")
    if weights == "uniform":
        return np.ones_like(s)
    if weights == "distance":
        # Exactly scikit-learn's rule: 1/d, and rows with an exact match count only those.
        d = metric(metric_name).distances(s)
        with np.errstate(divide="ignore"):
            w = 1.0 / d
        inf_mask = np.isinf(w)
        inf_row = inf_mask.any(axis=1)
        w[inf_row] = inf_mask[inf_row]
        return w
    if temperature <= 0:
        raise InvalidInput(f"temperature must be positive, got {temperature}")
    finite = np.where(np.isfinite(s), s, -np.inf)
    top = np.max(finite, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return np.exp((finite - top) / temperature)  # shift cancels after normalising


def vote(
    label_codes: np.ndarray,
    scores: np.ndarray,
    n_classes: int,
    weights: str = "softmax",
    temperature: float = DEFAULT_T,
    metric_name: str = "cosine",
) -> np.ndarray:
    """Class probabilities (n, n_classes) from neighbours' label codes (-1 = none) and scores.

    Rows with no labelled neighbour get all zeros. `metric_name` says how scores map
    back to distances for ``distance`` weights (l2: score = -distance).
    """
    codes = np.asarray(label_codes)
    if codes.shape != np.shape(scores):
        raise InvalidInput(f"label codes {codes.shape} and scores {np.shape(scores)} differ")
    if n_classes <= 0 or codes.shape[0] == 0:
        return np.zeros((codes.shape[0], max(n_classes, 0)), dtype=np.float64)
    w = neighbour_weights(np.asarray(scores), weights, temperature, metric_name)
    return tally(codes, w, n_classes)


def tally(codes: np.ndarray, w: np.ndarray, n_classes: int) -> np.ndarray:
    """Each row's neighbour weights summed per class and normalised, (n, n_classes)
    float64 (codes -1 or weights not finite count for nothing; rows without a vote: zeros)."""
    n = codes.shape[0]
    valid = (codes >= 0) & (codes < n_classes) & np.isfinite(w)
    # every cell counted, the invalid ones with weight 0 (no masked copies of the arrays)
    flat = (np.arange(n, dtype=np.intp)[:, None] * n_classes + np.where(valid, codes, 0)).ravel()
    counted = np.bincount(flat, weights=np.where(valid, w, 0).ravel(), minlength=n * n_classes)
    sums = counted.astype(np.float64, copy=False).reshape(n, n_classes)  # int64 if none votes
    total = sums.sum(axis=1, keepdims=True)
    sums /= np.where(total > 0, total, 1.0)  # in place: rows without a vote stay all zeros
    return sums


@dataclass(frozen=True)
class Voter:
    """How the first k neighbours vote: weighting, softmax temperature, metric of the scores."""

    k: int = DEFAULT_K
    temperature: float = DEFAULT_T
    weights: str = "softmax"
    metric: str = "cosine"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise InvalidInput(f"k must be a positive integer, got {self.k!r}")
        if self.temperature <= 0:
            raise InvalidInput(f"temperature must be positive, got {self.temperature}")
        check_choice(self.weights, VOTE_WEIGHTS, "vote weights")

    def probs(self, codes: np.ndarray, scores: np.ndarray, n_classes: int) -> np.ndarray:
        """(n, n_classes) float32 from the first k columns of neighbour codes and scores."""
        k = min(self.k, codes.shape[1]) if codes.ndim == 2 else self.k
        p = vote(codes[:, :k], scores[:, :k], n_classes, self.weights, self.temperature, self.metric)
        return np.asarray(p, dtype=np.float32)

    def of(self, result: SearchResult) -> tuple[np.ndarray, list[str]]:
        """(probs, vocabulary) of a Searcher's result, over the labels it reports."""
        vocabulary = list(result.vocabulary)
        return self.probs(result.label_codes, result.scores, len(vocabulary)), vocabulary


class Neighbours:
    """Labelled neighbours of query vectors over a fixed vocabulary, searched once at the
    largest k so that every (k, T) choice is a re-weighting of the same search.

    From the live index when there is one; before an index is built, exactly (the index
    layer's brute-force search on L2-normalised vectors, the default cosine metric).
    Codes are indices into `vocabulary` (-1 = unlabelled or a label outside it).
    """

    def __init__(
        self,
        vocabulary: Sequence[str],
        searcher: Searcher | None = None,
        bank_ids: np.ndarray | None = None,
        bank_vectors: np.ndarray | None = None,
        bank_codes: np.ndarray | None = None,
    ) -> None:
        if searcher is None and (bank_ids is None or bank_vectors is None or bank_codes is None):
            raise InvalidInput("neighbours need a searcher or the bank's ids, vectors and codes")
        self.vocabulary = list(vocabulary)
        self._code = {label: i for i, label in enumerate(self.vocabulary)}
        self.searcher = searcher
        self.metric = searcher.metric if searcher is not None else "cosine"
        self._ids = bank_ids
        self._codes = bank_codes
        self._unit = None if bank_vectors is None else _unit(bank_vectors)

    @property
    def ntotal(self) -> int:
        if self.searcher is not None:
            return int(self.searcher.ntotal)
        return 0 if self._ids is None else len(self._ids)

    def search(
        self, vectors: np.ndarray, k: int, exclude_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, codes (n, k) int64, scores (n, k) float32); `exclude_ids` drops each row's own item."""
        k = max(1, min(k, self.ntotal - (1 if exclude_ids is not None else 0)))
        if self.searcher is not None:
            res = self.searcher.search(vectors, k, exclude_ids=exclude_ids, voters_only=True)
            remap = np.array(
                [self._code.get(label, -1) for label in res.vocabulary] + [-1], dtype=np.int64
            )
            codes = np.asarray(res.label_codes, dtype=np.int64)
            codes = remap[np.where(codes < 0, len(remap) - 1, codes)]
            return np.asarray(res.ids, np.int64), codes, np.asarray(res.scores, dtype=np.float32)
        return self._exact(vectors, k, exclude_ids)

    def _exact(
        self, vectors: np.ndarray, k: int, exclude_ids: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import faiss

        from featurebank.index.searcher import drop_excluded
        from featurebank.index.tuning import exact_search

        assert self._unit is not None and self._ids is not None and self._codes is not None
        extra = 0 if exclude_ids is None else 1
        ids, sims = exact_search(
            self._unit, self._ids, _unit(vectors), k + extra, faiss.METRIC_INNER_PRODUCT
        )
        if exclude_ids is not None:
            ids, sims = drop_excluded(ids, sims, np.asarray(exclude_ids, np.int64), k)
        position = {int(i): p for p, i in enumerate(self._ids.tolist())}
        codes = np.array(
            [[self._codes[position[i]] if i >= 0 else -1 for i in row] for row in ids.tolist()],
            dtype=np.int64,
        ).reshape(ids.shape)
        scores = np.where(ids >= 0, sims, -np.inf).astype(np.float32)
        return ids, codes, scores


def _unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(l2_normalize(np.asarray(x, dtype=np.float32)))


def knn_accuracy(searcher: Searcher, k: int, temperature: float, split: str) -> dict[str, Any]:
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
