"""One classifier over a bank: kNN, head, hybrid of both, or the stacked head.

Why one object: the server, `featurebank eval` and library users all want "the
bank's current answer" without knowing which generation of index and head is
live. `reload()` swaps both to the current generations at once; a call takes the
snapshot once and answers wholly from it, and its Predictions say which
generations those were, so answers never mix generations.

The modes themselves are rows of `classify.modes.MODE_TABLE`; this module checks a
call's inputs once, takes the snapshot and asks the table.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from featurebank import store as store_mod
from featurebank.classify.abstain import abstained, calibrate_threshold, check_precision, decide
from featurebank.classify.knn import DEFAULT_K, DEFAULT_T, Voter
from featurebank.classify.modes import Calibrating, Evidence, Mode
from featurebank.classify.modes import mode as mode_named
from featurebank.classify.published_heads import LoadedHead, is_stale, load_head
from featurebank.core.bank import candidates, load_newest_intact
from featurebank.core.errors import DamagedFile, FailedPrecondition, InvalidInput
from featurebank.core.vocabulary import MODES, UNKNOWN
from featurebank.index.transforms import as_vectors
from featurebank.store import BankLike, Store

if TYPE_CHECKING:
    from featurebank.index.filters import Node
    from featurebank.index.searcher import Searcher, SearchResult


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Neighbor:
    key: str
    label: str | None
    score: float


@dataclass(frozen=True)
class Prediction:
    """One row's answer: top labels (most probable first) with their probabilities, the mode
    and the generations it came from, and optionally the neighbours.

    `abstained` is set when an abstention precision was asked for and the top probability
    is under its calibrated threshold: the answer is then "unknown" (`label`), and the
    ranked labels stay for whoever wants to see what was doubted. `head_generation` is
    None when the mode used no head (knn).
    """

    labels: list[str]
    probs: list[float]
    mode: str
    index_generation: int
    head_generation: int | None
    neighbors: list[Neighbor] = field(default_factory=list)
    abstained: bool = False

    @property
    def label(self) -> str:
        """The answer: the top label, or "unknown" when abstaining or nothing voted."""
        return UNKNOWN if self.abstained or not self.labels else self.labels[0]

    def top(self, n: int) -> Prediction:
        """The same answer with only the `n` most probable labels."""
        return replace(self, labels=self.labels[:n], probs=self.probs[:n])


@dataclass(frozen=True)
class _Snapshot:
    searcher: Searcher
    head: LoadedHead | None
    index_generation: int
    head_generation: int | None
    head_damaged: str | None = None  # why the live head generation is not the one served


class Classifier:
    """Classify vectors of a bank's spec by its live index and head generations.

    `mode` fixes the default mode; None means hybrid when a head exists, else knn.
    `abstain_below` (a target precision in (0, 1]) makes "unknown" the answer whenever
    the top probability is under the threshold calibrated for that precision; each call
    may set its own. Raises FailedPrecondition when the bank has no index yet.
    """

    def __init__(
        self,
        bank: BankLike,
        mode: str | None = None,
        abstain_below: float | None = None,
        exact_fallback: bool = False,
    ) -> None:
        """`exact_fallback`: when no index generation is intact, search exactly from the
        store (what a server does) instead of raising DamagedFile."""
        self.exact_fallback = exact_fallback
        self._mode = None if mode is None else mode_named(mode).name
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
        order, damaged = candidates(self.bank.indexes_dir)
        if not order and not damaged:
            raise FailedPrecondition(
                f"no index yet in {self.bank.root}: run `featurebank index build` first"
            )
        index_gen = order[0] if order and not damaged else None  # None: the searcher falls back
        # a searcher that fell back is replaced: what it fell back from may be repaired now
        if old is not None and old.index_generation == index_gen and not old.searcher.damaged:
            searcher = old.searcher
            # labels, deletions and new items; a new index generation always gets its own
            # Searcher, so the searcher of a snapshot in use never changes generation
            searcher.catch_up()
        else:
            from featurebank.index.searcher import Searcher

            searcher = Searcher.load(self.store, exact_fallback=self.exact_fallback)
        head_order, head_damage = candidates(self.bank.heads_dir)
        head_gen = head_order[0] if head_order and not head_damage else None
        head_damaged = None
        if old is not None and head_gen is not None and old.head_generation == head_gen:
            head, head_damaged = old.head, old.head_damaged
        else:
            try:
                found = load_newest_intact(
                    self.bank.heads_dir, lambda n: load_head(self.bank, n), "head"
                )
            except DamagedFile as e:  # classify by the neighbours alone until a repair
                log.warning("%s; classifying without a head", e)
                found, head_damaged = None, f"{e}; classifying by the neighbours alone"
            head = found[1] if found is not None else None
            head_gen = head.generation if head is not None else None
            if found is not None and found[2]:
                head_damaged = f"{'; '.join(found[2])}; serving head generation {head_gen}"
            if head is not None and int(head.manifest.get("dim", searcher.dim)) != searcher.dim:
                log.warning(
                    "head generation %s expects dimension %s, index has %d: head ignored",
                    head_gen,
                    head.manifest.get("dim"),
                    searcher.dim,
                )
                head, head_gen = None, None
        return _Snapshot(searcher, head, int(searcher.generation), head_gen, head_damaged)

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
    def index_damaged(self) -> str | None:
        """Why the live index generation is not the one searched, and what is instead (an
        older generation, or exact search from the store); None when it is intact."""
        searcher = self._snap.searcher
        if not searcher.damaged:
            return None
        served = ("exact search from the store (no index generation is intact)"
                  if searcher.manifest.get("exact_from_store")
                  else f"index generation {searcher.generation}")  # fmt: skip
        return f"{'; '.join(searcher.damaged)}; serving {served}"

    @property
    def head_damaged(self) -> str | None:
        """Why the live head generation is not the one used (an older one, or none)."""
        return self._snap.head_damaged

    @property
    def head(self) -> LoadedHead | None:
        return self._snap.head

    @property
    def default_mode(self) -> str:
        return self._default_mode(self._snap)

    @property
    def head_stale(self) -> bool:
        """True when labels changed after the live head was trained."""
        head = self._snap.head
        if head is None:
            return False
        return is_stale(head.manifest, int(self.store.labels_generation))

    def voter(self, k: int | None = None) -> Voter:
        """How neighbours vote: the head's cross-validated k and T when a head exists, else
        the defaults; `k` overrides the number of neighbours."""
        return _voter(self._snap, k)

    # ------------------------------------------------------------------ public entries
    # Each checks its inputs once, takes the snapshot once and answers from it alone.

    def classify(
        self,
        vectors: np.ndarray,
        mode: str | None = None,
        k: int | None = None,
        top_n: int = 5,
        include_neighbors: bool = False,
        exclude_ids: np.ndarray | None = None,
        abstain_below: float | None = None,
        where: Node | None = None,
    ) -> list[Prediction]:
        """Top-`top_n` labels with probabilities per row (labels with zero probability omitted).

        With `abstain_below` (or the classifier's own) a row whose top probability is
        under the threshold calibrated for that precision is marked `abstained`.
        `where` (a parsed filter): only labelled items passing it vote (the head is unchanged).
        """
        if top_n < 1:
            raise InvalidInput(f"top_n must be at least 1, got {top_n}")
        precision = self._precision(abstain_below)
        snap, (m,), x = self._start(vectors, (mode,))
        threshold = None if precision is None else self._threshold(snap, m, k, precision)
        probs, vocabs, result = self._score(
            snap, x, (m,), k, exclude_ids, include_neighbors, where=where
        )
        p, vocab = probs[m.name], vocabs[m.name]
        doubt = abstained(p, threshold) if threshold is not None else np.zeros(len(p), bool)
        head_generation = snap.head_generation if m.head else None
        order = np.argsort(-p, axis=1, kind="stable")[:, :top_n]
        out: list[Prediction] = []
        for r in range(len(p)):
            top = [int(c) for c in order[r] if p[r, c] > 0]
            nbs = _neighbors(result, r) if include_neighbors and result is not None else []
            out.append(
                Prediction(
                    [vocab[c] for c in top],
                    [float(p[r, c]) for c in top],
                    m.name,
                    snap.index_generation,
                    head_generation,
                    nbs,
                    abstained=bool(doubt[r]),
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
        precision = self._precision(abstain_below)
        snap, (m,), x = self._start(vectors, (mode,))
        threshold = None if precision is None else self._threshold(snap, m, k, precision)
        probs, vocabs, _ = self._score(snap, x, (m,), k, exclude_ids)
        return decide(probs[m.name], vocabs[m.name], threshold)

    def predict_proba(
        self,
        vectors: np.ndarray,
        mode: str | None = None,
        k: int | None = None,
        exclude_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[str]]:
        """(probs (n, C), vocabulary) in one mode; `exclude_ids` leaves each row's own item out."""
        snap, (m,), x = self._start(vectors, (mode,))
        probs, vocabs, _ = self._score(snap, x, (m,), k, exclude_ids)
        return probs[m.name], vocabs[m.name]

    def predict_modes(
        self,
        vectors: np.ndarray,
        modes: Sequence[str] = MODES,
        k: int | None = None,
        exclude_ids: np.ndarray | None = None,
        want_neighbors: bool = False,
        hybrid_a: float | None = None,
        where: Node | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, list[str]], SearchResult | None]:
        """Probabilities of several modes from one search (what eval and reports use)."""
        snap, ms, x = self._start(vectors, modes)
        return self._score(snap, x, ms, k, exclude_ids, want_neighbors, hybrid_a)

    def abstain_threshold(
        self, precision: float, mode: str | None = None, k: int | None = None
    ) -> float:
        """The lowest top probability at which `mode`'s answers reach `precision`.

        Calibrated on scores of items the classifier did not learn from, as the mode's
        row of the mode table says: kNN's leave-one-out votes over the labelled items
        (computed here, for the live index and labels), the head's and hybrid's
        out-of-fold probabilities (recorded when the head was trained). The stacked
        head has none: FailedPrecondition.
        """
        check_precision(precision)
        snap = self._snap
        ms = self._modes(snap, (mode,))
        self._needs(snap, ms)
        return self._threshold(snap, ms[0], k, precision)

    # ------------------------------------------------------------------ below the entries

    def _precision(self, abstain_below: float | None) -> float | None:
        if abstain_below is not None:
            return check_precision(abstain_below)
        return self.abstain_below

    def _default_mode(self, snap: _Snapshot) -> str:
        if self._mode is not None:
            return self._mode
        return "hybrid" if snap.head is not None else "knn"

    def _modes(self, snap: _Snapshot, names: Sequence[str | None]) -> list[Mode]:
        """The modes called `names` (None: the default); InvalidInput for an unknown one."""
        return [mode_named(n if n is not None else self._default_mode(snap)) for n in names]

    def _needs(self, snap: _Snapshot, ms: Sequence[Mode]) -> None:
        """FailedPrecondition when `snap` lacks what one of the modes needs."""
        for m in ms:
            m.check(snap.head, snap.head_generation, self.bank.root)

    def _start(
        self, vectors: np.ndarray, names: Sequence[str | None]
    ) -> tuple[_Snapshot, list[Mode], np.ndarray]:
        """The snapshot, the modes and the checked vectors of one call: bad input is
        InvalidInput before the snapshot is asked for what a mode needs."""
        snap = self._snap  # one snapshot for the whole call
        ms = self._modes(snap, names)
        x = as_vectors(vectors, snap.searcher.dim)
        self._needs(snap, ms)
        return snap, ms, x

    def _threshold(self, snap: _Snapshot, m: Mode, k: int | None, precision: float) -> float:
        voter = _voter(snap, k)
        key: tuple[object, ...] = (
            m.name, snap.index_generation, snap.head_generation,
            int(self.store.labels_generation), voter, precision,
        )
        if key not in self._thresholds:
            conf, ok = m.calibration(
                Calibrating(m.name, self.store, snap.searcher, snap.head, snap.head_generation, voter)
            )
            self._thresholds[key] = calibrate_threshold(conf, ok, precision, smooth=True)
        return self._thresholds[key]

    def _score(
        self,
        snap: _Snapshot,
        x: np.ndarray,
        ms: Sequence[Mode],
        k: int | None,
        exclude_ids: np.ndarray | None,
        want_neighbors: bool = False,
        hybrid_a: float | None = None,
        where: Node | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, list[str]], SearchResult | None]:
        """Each mode's probabilities from one search of `snap` (inputs already checked)."""
        searcher = snap.searcher
        voter = _voter(snap, k)
        result = None
        votes = None
        if want_neighbors or any(m.votes for m in ms):
            kk = max(1, min(voter.k, int(searcher.ntotal) - (0 if exclude_ids is None else 1)))
            ex = None if exclude_ids is None else np.asarray(exclude_ids, dtype=np.int64)
            result = searcher.search(x, kk, exclude_ids=ex, voters_only=True, where=where)
            votes = voter.of(result)
        evidence = Evidence(x, snap.head, votes, hybrid_a)
        scored = {m.name: m.score(evidence) for m in ms}
        return (
            {name: s[0] for name, s in scored.items()},
            {name: s[1] for name, s in scored.items()},
            result,
        )


def _voter(snap: _Snapshot, k: int | None) -> Voter:
    head = snap.head
    tuned_k, t = (
        (int(head.hybrid["k"]), float(head.hybrid["temperature"]))
        if head is not None
        else (DEFAULT_K, DEFAULT_T)
    )
    kk = k if k is not None else tuned_k
    if kk < 1:
        raise InvalidInput(f"k must be at least 1, got {kk}")
    return Voter(kk, t, "softmax", snap.searcher.metric)


def _neighbors(result: SearchResult, r: int) -> list[Neighbor]:
    return [
        Neighbor(str(key), label, float(score))
        for key, label, score, i in zip(
            result.keys[r], result.labels[r], result.scores[r], result.ids[r], strict=True
        )
        if i >= 0
    ]
