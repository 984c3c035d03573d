"""The classification modes as one table: what each needs, how it scores, how it is calibrated.

Why a table: the classifier, abstention and evaluation all ask the same questions of a
mode (does it search neighbours, does it need a head, where do its calibration scores
come from); each answer lives in the mode's row, so adding a mode is one row here (and
its name in `core.vocabulary.MODES`), never a new branch in the classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from featurebank.classify.abstain import confidence_and_correct
from featurebank.classify.cross_validation import hybrid
from featurebank.core.errors import FailedPrecondition
from featurebank.core.vocabulary import HELD_OUT_SPLIT, MODES, check_choice

if TYPE_CHECKING:
    from featurebank.classify.knn import Voter
    from featurebank.classify.published_heads import LoadedHead
    from featurebank.index.searcher import Searcher
    from featurebank.store import Store

Scores = tuple[np.ndarray, list[str]]
"""Probabilities (n, C) and the labels of their columns."""

Calibration = tuple[np.ndarray, np.ndarray]
"""(top probability, correct) of items the mode did not learn from."""


@dataclass
class Evidence:
    """What one call's modes score from: the queries, the neighbours' vote, the live head.

    The head's probabilities are computed on first use and shared by the modes that
    mix them (head, hybrid), so asking for several modes costs one head pass.
    """

    x: np.ndarray
    head: LoadedHead | None
    votes: Scores | None  # the kNN vote, when the call searched
    hybrid_a: float | None = None  # overrides the head's mixing weight
    _head_probs: np.ndarray | None = field(default=None, repr=False)

    def trained_head(self) -> LoadedHead:
        assert self.head is not None  # Mode.check ran first
        return self.head

    def vote(self) -> Scores:
        assert self.votes is not None  # Mode.votes made the call search
        return self.votes

    def head_probs(self) -> np.ndarray:
        if self._head_probs is None:
            self._head_probs = self.trained_head().head.predict_proba(self.x)
        return self._head_probs


@dataclass(frozen=True)
class Calibrating:
    """What calibrating a mode's abstention may read: the live snapshot and the store."""

    mode: str
    store: Store
    searcher: Searcher
    head: LoadedHead | None
    head_generation: int | None
    voter: Voter


def _knn(e: Evidence) -> Scores:
    return e.vote()


def _head(e: Evidence) -> Scores:
    return e.head_probs(), e.trained_head().vocabulary


def _hybrid(e: Evidence) -> Scores:
    head = e.trained_head()
    knn_p, knn_vocab = e.vote()
    hv = head.vocabulary
    union = sorted(set(hv) | set(knn_vocab))
    a = float(head.hybrid["a"]) if e.hybrid_a is None else e.hybrid_a
    mixed = hybrid(align_columns(knn_p, knn_vocab, union), align_columns(e.head_probs(), hv, union), a)
    return mixed, union


def _stacked(e: Evidence) -> Scores:
    head = e.trained_head()
    assert head.stacked is not None  # Mode.check ran first
    knn_p, knn_vocab = e.vote()
    hv = head.vocabulary
    return head.stacked.predict_proba(e.x, align_columns(knn_p, knn_vocab, hv)), hv


def leave_one_out(c: Calibrating) -> Calibration:
    """kNN's votes over the labelled items, each voted on by the others (live index and labels)."""
    items = c.store.to_numpy(labelled_only=True)
    keep = np.flatnonzero(np.asarray(items.splits) != HELD_OUT_SPLIT)
    if len(keep) == 0 or c.searcher.ntotal < 2:
        raise FailedPrecondition(
            f"no labelled items in {c.store.bank.root} to calibrate abstention on"
        )
    k = max(1, min(c.voter.k, int(c.searcher.ntotal) - 1))
    result = c.searcher.search(
        items.vectors[keep], k, exclude_ids=items.ids[keep].astype(np.int64), voters_only=True
    )
    probs, vocab = c.voter.of(result)
    code = {label: i for i, label in enumerate(vocab)}
    y = np.array([code.get(str(items.labels[i]), -1) for i in keep], dtype=np.int64)
    return confidence_and_correct(y, probs)


def out_of_fold(c: Calibrating) -> Calibration:
    """The head generation's out-of-fold scores for the mode, recorded when it was trained."""
    assert c.head is not None  # Mode.check ran first
    if c.mode not in c.head.calibration:
        raise FailedPrecondition(
            f"head generation {c.head_generation} has no cross-validated scores for "
            f"{c.mode!r} to calibrate abstention on (knn, head and hybrid have; retrain the "
            "head if it predates them)"
        )
    return c.head.calibration[c.mode]


@dataclass(frozen=True)
class Mode:
    """One way of turning a query into class probabilities.

    `votes`: it scores from the neighbours' vote (the call searches); `head`: it needs a
    trained head; `stacked`: it needs the head generation's stacked head; `score` turns
    the call's Evidence into probabilities; `calibrate` gives the scores its abstention
    threshold is calibrated on, None when it has none.
    """

    name: str
    votes: bool
    head: bool
    stacked: bool
    score: Callable[[Evidence], Scores]
    calibrate: Callable[[Calibrating], Calibration] | None

    def check(self, head: LoadedHead | None, head_generation: int | None, root: object) -> None:
        """FailedPrecondition when the live snapshot lacks what this mode needs."""
        if self.head and head is None:
            raise FailedPrecondition(
                f"mode {self.name!r} needs a trained head in {root}: "
                "run `featurebank head train` first"
            )
        if self.stacked and head is not None and head.stacked is None:
            raise FailedPrecondition(f"head generation {head_generation} has no stacked head")

    def calibration(self, c: Calibrating) -> Calibration:
        """The scores to calibrate on; FailedPrecondition for a mode that has none."""
        if self.calibrate is None:
            raise FailedPrecondition(
                f"head generation {c.head_generation} has no cross-validated scores for "
                f"{self.name!r} to calibrate abstention on (knn, head and hybrid have them; "
                "abstain with one of those)"
            )
        return self.calibrate(c)


MODE_TABLE: dict[str, Mode] = {
    "knn": Mode("knn", votes=True, head=False, stacked=False, score=_knn, calibrate=leave_one_out),
    "head": Mode("head", votes=False, head=True, stacked=False, score=_head, calibrate=out_of_fold),
    "hybrid": Mode("hybrid", votes=True, head=True, stacked=False, score=_hybrid,
                   calibrate=out_of_fold),
    "stacked": Mode("stacked", votes=True, head=True, stacked=True, score=_stacked,
                    calibrate=None),
}
assert tuple(MODE_TABLE) == MODES, "one row per mode of core.vocabulary.MODES"


def mode(name: str) -> Mode:
    """The Mode called `name`; InvalidInput naming the known ones otherwise."""
    return MODE_TABLE[check_choice(name, MODES, "mode")]


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
