"""One classifier over a bank: kNN, head, hybrid of both, or the stacked head.

Why one object: the server, `featurebank eval` and library users all want "the
bank's current answer" without knowing which generation of index and head is
live. `reload()` swaps both to the current generations at once; a call in flight
keeps the snapshot it started with, so answers never mix generations.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from featurebank import store as store_mod
from featurebank.classify.heads import DEFAULT_K, DEFAULT_T, LoadedHead, hybrid, is_stale, load_head
from featurebank.classify.knn import vote
from featurebank.core.bank import current_generation
from featurebank.core.errors import FailedPrecondition, InvalidInput
from featurebank.index.transforms import as_vectors
from featurebank.store import BankLike, Store

if TYPE_CHECKING:
    from featurebank.index.searcher import Searcher, SearchResult


log = logging.getLogger(__name__)

MODES = ("knn", "head", "hybrid", "stacked")


@dataclass(frozen=True)
class Neighbor:
    key: str
    label: str | None
    score: float


@dataclass
class Prediction:
    """Top labels (most probable first) with their probabilities, and optionally neighbours."""

    labels: list[str]
    probs: list[float]
    neighbors: list[Neighbor] = field(default_factory=list)


@dataclass(frozen=True)
class _Snapshot:
    searcher: Searcher
    head: LoadedHead | None
    index_generation: int
    head_generation: int | None


def check_mode(mode: str | None) -> str | None:
    if mode is not None and mode not in MODES:
        raise InvalidInput(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    return mode


class Classifier:
    """Classify vectors of a bank's spec by its live index and head generations.

    `mode` fixes the default mode; None means hybrid when a head exists, else knn.
    Raises FailedPrecondition when the bank has no index yet.
    """

    def __init__(self, bank: BankLike, mode: str | None = None) -> None:
        self._mode = check_mode(mode)
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
    ) -> list[Prediction]:
        """Top-`top_n` labels with probabilities per row (labels with zero probability omitted)."""
        if top_n < 1:
            raise InvalidInput(f"top_n must be at least 1, got {top_n}")
        mode = check_mode(mode) or self.default_mode
        probs, vocabs, result = self.predict_modes(
            vectors, (mode,), k=k, exclude_ids=exclude_ids, want_neighbors=include_neighbors
        )
        p, vocab = probs[mode], vocabs[mode]
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
            out.append(Prediction([vocab[c] for c in top], [float(p[r, c]) for c in top], nbs))
        return out

    def knn_params(self, k: int | None = None) -> tuple[int, float]:
        """(k, temperature): the head's tuned values when a head exists, else the defaults."""
        head = self._snap.head
        tuned_k, t = (
            (int(head.hybrid["k"]), float(head.hybrid["temperature"]))
            if head is not None
            else (DEFAULT_K, DEFAULT_T)
        )
        kk = k if k is not None else tuned_k
        if kk < 1:
            raise InvalidInput(f"k must be at least 1, got {kk}")
        return kk, t

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
        kk, temperature = self.knn_params(k)
        need_knn = want_neighbors or any(m != "head" for m in modes)
        result = None
        knn_p = None
        knn_vocab: list[str] = []
        if need_knn:
            kk = max(1, min(kk, int(searcher.ntotal) - (0 if exclude_ids is None else 1)))
            ex = None if exclude_ids is None else np.asarray(exclude_ids, dtype=np.int64)
            result = searcher.search(x, kk, exclude_ids=ex, voters_only=True)
            knn_vocab = list(result.vocabulary)
            knn_p = np.asarray(
                vote(
                    result.label_codes,
                    result.scores,
                    len(knn_vocab),
                    "softmax",
                    temperature,
                    searcher.metric,
                ),
                dtype=np.float32,
            )
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

