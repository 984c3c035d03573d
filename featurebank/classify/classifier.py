"""One classifier over a bank: kNN, head, hybrid of both, or the stacked head.

Why one object: the server, `featurebank eval` and library users all want "the
bank's current answer" without knowing which generation of index and head is
live. `reload()` swaps both to the current generations at once; a call in flight
keeps the snapshot it started with, so answers never mix generations.

(Just over 400 lines: the one path to every mode's probabilities, abstention included.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from featurebank import store as store_mod
from featurebank.classify.abstain import (
    abstained,
    calibrate_threshold,
    check_precision,
    confidence_and_correct,
    decide,
)
from featurebank.classify.cross_validation import hybrid
from featurebank.classify.knn import DEFAULT_K, DEFAULT_T, Voter
from featurebank.classify.published_heads import LoadedHead, is_stale, load_head
from featurebank.core.bank import current_generation
from featurebank.core.errors import FailedPrecondition, InvalidInput
from featurebank.core.vocabulary import HELD_OUT_SPLIT, MODES, UNKNOWN, check_choice
from featurebank.index.transforms import as_vectors
from featurebank.store import BankLike, Store

if TYPE_CHECKING:
    from featurebank.index.searcher import Searcher, SearchResult


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Neighbor:
    key: str
    label: str | None
    score: float


@dataclass
class Prediction:
    """Top labels (most probable first) with their probabilities, and optionally neighbours.

    `abstained` is set when an abstention precision was asked for and the top probability
    is under its calibrated threshold: the answer is then "unknown" (`label`), and the
    ranked labels stay for whoever wants to see what was doubted.
    """

    labels: list[str]
    probs: list[float]
    neighbors: list[Neighbor] = field(default_factory=list)
    abstained: bool = False

    @property
    def label(self) -> str:
        """The answer: the top label, or "unknown" when abstaining or nothing voted."""
        return UNKNOWN if self.abstained or not self.labels else self.labels[0]


@dataclass(frozen=True)
class _Snapshot:
    searcher: Searcher
    head: LoadedHead | None
    index_generation: int
    head_generation: int | None


def check_mode(mode: str | None) -> str | None:
    return None if mode is None else check_choice(mode, MODES, "mode")


class Classifier:
    """Classify vectors of a bank's spec by its live index and head generations.

    `mode` fixes the default mode; None means hybrid when a head exists, else knn.
    `abstain_below` (a target precision in (0, 1]) makes "unknown" the answer whenever
    the top probability is under the threshold calibrated for that precision; each call
    may set its own. Raises FailedPrecondition when the bank has no index yet.
    """

    def __init__(
        self, bank: BankLike, mode: str | None = None, abstain_below: float | None = None
    ) -> None:
        self._mode = check_mode(mode)
        self.abstain_below = None if abstain_below is None else check_precision(abstain_below)
        self._thresholds: dict[tuple[object, ...], float] = {}
        self._own_store = not isinstance(bank, Store)
        self.store: Store = bank if isinstance(bank, Store) else store_mod.open(bank, readonly=True)
        self.bank = self.store.bank
        self._lock = threading.Lock()
        try:
            self._snap = self._load(None)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ state

    def _load(self, old: _Snapshot | None) -> _Snapshot:
        index_gen = current_generation(self.bank.indexes_dir)
        if index_gen is None:
            raise FailedPrecondition(
                f"no index yet in {self.bank.root}: run `featurebank index build` first"
            )
        if old is not None and old.index_generation == index_gen:
            searcher = old.searcher
            searcher.refresh()  # picks up label changes
        else:
            from featurebank.index.searcher import Searcher

            searcher = Searcher.load(self.store)
        head_gen = current_generation(self.bank.heads_dir)
        if old is not None and old.head_generation == head_gen:
            head = old.head
        else:
            head = load_head(self.bank, head_gen) if head_gen is not None else None
            if head is not None and int(head.manifest.get("dim", searcher.dim)) != searcher.dim:
                log.warning(
                    "head generation %s expects dimension %s, index has %d: head ignored",
                    head_gen,
                    head.manifest.get("dim"),
                    searcher.dim,
                )
                head, head_gen = None, None
        return _Snapshot(searcher, head, int(searcher.generation), head_gen)

    def reload(self) -> None:
        """Swap to the current index and head generations (thread-safe, all at once)."""
        with self._lock:
            self._snap = self._load(self._snap)

    def close(self) -> None:
        if self._own_store and getattr(self, "store", None) is not None:
            self.store.close()

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def searcher(self) -> Searcher:
        return self._snap.searcher

    @property
    def index_generation(self) -> int:
        return self._snap.index_generation

    @property
    def head_generation(self) -> int | None:
        return self._snap.head_generation

    @property
    def head(self) -> LoadedHead | None:
        return self._snap.head

    @property
    def default_mode(self) -> str:
        if self._mode is not None:
            return self._mode
        return "hybrid" if self._snap.head is not None else "knn"

    @property
    def head_stale(self) -> bool:
        """True when labels changed after the live head was trained."""
        head = self._snap.head
        if head is None:
            return False
        return is_stale(head.manifest, int(self.store.labels_generation))

    # ------------------------------------------------------------------ inference

    def predict_proba(
        self,
        vectors: np.ndarray,
        mode: str | None = None,
        k: int | None = None,
        exclude_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[str]]:
        """(probs (n, C), vocabulary) in one mode; `exclude_ids` leaves each row's own item out."""
        mode = check_mode(mode) or self.default_mode
        probs, vocab, _ = self.predict_modes(vectors, (mode,), k=k, exclude_ids=exclude_ids)
        return probs[mode], vocab[mode]

    def classify(
        self,
        vectors: np.ndarray,
        mode: str | None = None,
        k: int | None = None,
        top_n: int = 5,
        include_neighbors: bool = False,
        exclude_ids: np.ndarray | None = None,
        abstain_below: float | None = None,
    ) -> list[Prediction]:
        """Top-`top_n` labels with probabilities per row (labels with zero probability omitted).

        With `abstain_below` (or the classifier's own) a row whose top probability is
        under the threshold calibrated for that precision is marked `abstained`.
        """
        if top_n < 1:
            raise InvalidInput(f"top_n must be at least 1, got {top_n}")
        mode = check_mode(mode) or self.default_mode
        threshold = self._threshold_for(mode, k, abstain_below)
        probs, vocabs, result = self.predict_modes(
            vectors, (mode,), k=k, exclude_ids=exclude_ids, want_neighbors=include_neighbors
        )
        p, vocab = probs[mode], vocabs[mode]
        doubt = abstained(p, threshold) if threshold is not None else np.zeros(len(p), bool)
        out: list[Prediction] = []
        order = np.argsort(-p, axis=1, kind="stable")[:, :top_n]
        for r in range(len(p)):
            top = [int(c) for c in order[r] if p[r, c] > 0]
            nbs: list[Neighbor] = []
            if include_neighbors and result is not None:
                nbs = [
                    Neighbor(str(key), label, float(score))
                    for key, label, score, i in zip(
                        result.keys[r],
                        result.labels[r],
                        result.scores[r],
                        result.ids[r],
                        strict=True,
                    )
                    if i >= 0
                ]
            out.append(
                Prediction(
                    [vocab[c] for c in top],
                    [float(p[r, c]) for c in top],
                    nbs,
                    abstained=bool(doubt[r]) and threshold is not None,
                )
            )
        return out

    def predict(
        self,
        vectors: np.ndarray,
        mode: str | None = None,
        k: int | None = None,
        exclude_ids: np.ndarray | None = None,
        abstain_below: float | None = None,
    ) -> list[str]:
        """One label per row: the arg-max, or "unknown" when abstaining or nothing voted."""
        mode = check_mode(mode) or self.default_mode
        threshold = self._threshold_for(mode, k, abstain_below)
        p, vocab = self.predict_proba(vectors, mode, k=k, exclude_ids=exclude_ids)
        return decide(p, vocab, threshold)

    def voter(self, k: int | None = None) -> Voter:
        """How neighbours vote: the head's cross-validated k and T when a head exists, else
        the defaults; `k` overrides the number of neighbours."""
        head = self._snap.head
        tuned_k, t = (
            (int(head.hybrid["k"]), float(head.hybrid["temperature"]))
            if head is not None
            else (DEFAULT_K, DEFAULT_T)
        )
        kk = k if k is not None else tuned_k
        if kk < 1:
            raise InvalidInput(f"k must be at least 1, got {kk}")
        return Voter(kk, t, "softmax", self._snap.searcher.metric)

    # ------------------------------------------------------------------ abstention

    def _threshold_for(
        self, mode: str, k: int | None, abstain_below: float | None
    ) -> float | None:
        precision = abstain_below if abstain_below is not None else self.abstain_below
        return None if precision is None else self.abstain_threshold(precision, mode, k)

    def abstain_threshold(
        self, precision: float, mode: str | None = None, k: int | None = None
    ) -> float:
        """The lowest top probability at which `mode`'s answers reach `precision`.

        Calibrated on scores of items the classifier did not learn from: kNN's
        leave-one-out votes over the labelled items (computed here, for the live index
        and labels), the head's and hybrid's out-of-fold probabilities (recorded when
        the head was trained). The stacked head has none: FailedPrecondition.
        """
        check_precision(precision)
        mode = check_mode(mode) or self.default_mode
        snap = self._snap
        if mode == "knn":
            voter = self.voter(k)
            key: tuple[object, ...] = (
                "knn", snap.index_generation, int(self.store.labels_generation), voter, precision
            )
            if key not in self._thresholds:
                conf, ok = self._knn_leave_one_out(voter)
                self._thresholds[key] = calibrate_threshold(conf, ok, precision, smooth=True)
            return self._thresholds[key]
        head = snap.head
        if head is None:
            raise FailedPrecondition(f"mode {mode!r} needs a trained head in {self.bank.root}")
        if mode not in head.calibration:
            raise FailedPrecondition(
                f"head generation {snap.head_generation} has no cross-validated scores for "
                f"{mode!r} to calibrate abstention on (knn, head and hybrid have; retrain the "
                "head if it predates them)"
            )
        conf, ok = head.calibration[mode]
        return calibrate_threshold(conf, ok, precision, smooth=True)

    def _knn_leave_one_out(self, voter: Voter) -> tuple[np.ndarray, np.ndarray]:
        """(top probability, correct) of each voting item, voted on by the others."""
        searcher = self._snap.searcher
        items = self.store.to_numpy(labelled_only=True)
        keep = np.flatnonzero(np.asarray(items.splits) != HELD_OUT_SPLIT)
        if len(keep) == 0 or searcher.ntotal < 2:
            raise FailedPrecondition(
                f"no labelled items in {self.bank.root} to calibrate abstention on"
            )
        k = max(1, min(voter.k, int(searcher.ntotal) - 1))
        result = searcher.search(
            items.vectors[keep], k, exclude_ids=items.ids[keep].astype(np.int64), voters_only=True
        )
        probs, vocab = voter.of(result)
        code = {label: i for i, label in enumerate(vocab)}
        y = np.array([code.get(str(items.labels[i]), -1) for i in keep], dtype=np.int64)
        return confidence_and_correct(y, probs)

    def predict_modes(
        self,
        vectors: np.ndarray,
        modes: Sequence[str] = MODES,
        k: int | None = None,
        exclude_ids: np.ndarray | None = None,
        want_neighbors: bool = False,
        hybrid_a: float | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, list[str]], SearchResult | None]:
        """Probabilities of several modes from one search (what eval and reports use)."""
        snap = self._snap  # one snapshot for the whole call
        searcher, head = snap.searcher, snap.head
        x = as_vectors(vectors, searcher.dim)
        for m in modes:
            check_mode(m)
            if m != "knn" and head is None:
                raise FailedPrecondition(
                    f"mode {m!r} needs a trained head in {self.bank.root}: "
                    "run `featurebank head train` first"
                )
            if m == "stacked" and head is not None and head.stacked is None:
                raise FailedPrecondition(
                    f"head generation {snap.head_generation} has no stacked head"
                )
        voter = self.voter(k)
        need_knn = want_neighbors or any(m != "head" for m in modes)
        result = None
        knn_p = None
        knn_vocab: list[str] = []
        if need_knn:
            kk = max(1, min(voter.k, int(searcher.ntotal) - (0 if exclude_ids is None else 1)))
            ex = None if exclude_ids is None else np.asarray(exclude_ids, dtype=np.int64)
            result = searcher.search(x, kk, exclude_ids=ex, voters_only=True)
            knn_p, knn_vocab = voter.of(result)
        probs: dict[str, np.ndarray] = {}
        vocabs: dict[str, list[str]] = {}
        if "knn" in modes:
            assert knn_p is not None
            probs["knn"], vocabs["knn"] = knn_p, knn_vocab
        if head is not None and any(m != "knn" for m in modes):
            hv = head.vocabulary
            p_head = head.head.predict_proba(x)
            if "head" in modes:
                probs["head"], vocabs["head"] = p_head, hv
            if "hybrid" in modes:
                assert knn_p is not None
                union = sorted(set(hv) | set(knn_vocab))
                a = float(head.hybrid["a"]) if hybrid_a is None else hybrid_a
                probs["hybrid"] = hybrid(
                    align_columns(knn_p, knn_vocab, union), align_columns(p_head, hv, union), a
                )
                vocabs["hybrid"] = union
            if "stacked" in modes:
                assert knn_p is not None and head.stacked is not None
                extra = align_columns(knn_p, knn_vocab, hv)
                probs["stacked"] = head.stacked.predict_proba(x, extra)
                vocabs["stacked"] = hv
        return probs, vocabs, result


def align_columns(p: np.ndarray, vocab: Sequence[str], target: Sequence[str]) -> np.ndarray:
    """Columns of p (over vocab) rearranged to `target`; labels not in vocab get 0."""
    if list(vocab) == list(target):
        return p
    pos = {label: i for i, label in enumerate(vocab)}
    out = np.zeros((p.shape[0], len(target)), dtype=np.float32)
    for j, label in enumerate(target):
        i = pos.get(label)
        if i is not None:
            out[:, j] = p[:, i]
    return out

