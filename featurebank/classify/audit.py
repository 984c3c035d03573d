"""Which labels look wrong: labelled items the bank disagrees with, with the evidence.

Why leave-one-out: an item's own label would otherwise vote for itself and hide
every mistake, so each labelled item is classified without itself (its
neighbours' vote excludes it, as in `knn.knn_accuracy`). The head, when
one exists, was trained on the item's label, so its probability pulls towards the
stored label: the hybrid's disagreement is conservative and flags fewer items
than the neighbours alone would.

A finding is ranked by its confidence, p(suggested) - p(stored label): how much
more the bank believes in another label than in the one it holds.

`precision`: cut the list where the out-of-fold evidence says the findings kept are
wrong labels at that rate, as abstention cuts answers. The evidence is the probability
the out-of-fold predictions recorded with the live head generation put off an item's
stored label (1 - p(label), out of fold: an estimate of the chance the label is wrong);
for an item the head has not seen, the leave-one-out vote's. The list keeps the longest
run of findings, best first, whose mean estimate reaches `precision`. Nothing retrains.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from featurebank.classify.abstain import check_precision
from featurebank.classify.classifier import Neighbor
from featurebank.classify.modes import align_columns
from featurebank.core.errors import FailedPrecondition, InvalidInput
from featurebank.index import filters

if TYPE_CHECKING:
    from featurebank.classify.classifier import Classifier

log = logging.getLogger(__name__)

BATCH = 4096
EVIDENCE = 5  # neighbours shown per finding


@dataclass(frozen=True)
class Finding:
    """A labelled item whose stored label the bank doubts."""

    key: str
    label: str  # the stored label
    suggested: str  # the bank's label for it, leaving the item itself out
    confidence: float  # p(suggested) - p(label), in (0, 1]
    p_label: float
    p_suggested: float
    head_p_label: float | None = None  # the live head's view, None without a head
    head_p_suggested: float | None = None
    neighbors: list[Neighbor] = field(default_factory=list)


def audit(
    classifier: Classifier,
    n: int = 100,
    mode: str | None = None,
    split: str | None = None,
    min_confidence: float = 0.0,
    precision: float | None = None,
    where: filters.Node | None = None,
) -> list[Finding]:
    """The `n` labelled items (of `split`, or all; passing `where`, or all) the bank most
    confidently relabels, cut where the out-of-fold estimate of the list's precision falls
    under `precision`. Every labelled item still votes, whatever `where` leaves out."""
    if precision is not None:
        check_precision(precision)
    if n < 1:
        raise InvalidInput(f"n must be at least 1, got {n}")
    if not 0.0 <= min_confidence < 1.0:
        raise InvalidInput(f"min_confidence must be in [0, 1), got {min_confidence}")
    store = classifier.store
    ids, codes, vocab = store.label_table()
    labelled = ids[codes >= 0]
    if split is not None:
        labelled = np.intersect1d(labelled, store.ids_in_split(split))
    if labelled.size == 0:
        raise FailedPrecondition(
            f"bank {classifier.bank.root} has no labelled items"
            + (f" in split {split!r}" if split else "")
        )
    if where is not None:
        passing = classifier.searcher.matching_ids(where)
        labelled = labelled[np.isin(labelled.astype(np.int64), passing)]
        if labelled.size == 0:
            return []
    mode = mode or classifier.default_mode
    modes = (mode,) if mode in ("knn", "head") or classifier.head is None else (mode, "head")
    found: list[Finding] = []
    for start in range(0, labelled.size, BATCH):
        items = store.to_numpy(ids=labelled[start : start + BATCH])
        item_ids = np.asarray(items.ids, dtype=np.int64)
        probs, vocabs, result = classifier.predict_modes(
            items.vectors, modes, exclude_ids=item_ids, want_neighbors=True
        )
        p, pv = probs[mode], vocabs[mode]
        head_p = None
        if "head" in probs:
            head_p = align_columns(probs["head"], vocabs["head"], pv)
        col = {lab: j for j, lab in enumerate(pv)}
        best = p.argmax(axis=1)
        for r, given in enumerate(items.labels):
            assert given is not None
            b = int(best[r])
            if p[r, b] <= 0 or pv[b] == given:
                continue
            g = col.get(given)
            p_given = float(p[r, g]) if g is not None else 0.0
            confidence = float(p[r, b]) - p_given
            if confidence <= min_confidence:
                continue
            evidence = []
            if result is not None:
                evidence = [
                    Neighbor(str(key), lab, float(score))
                    for key, lab, score, i in zip(
                        result.keys[r], result.labels[r], result.scores[r], result.ids[r],
                        strict=True,
                    )
                    if i >= 0
                ][:EVIDENCE]
            found.append(
                Finding(
                    key=items.keys[r],
                    label=given,
                    suggested=pv[b],
                    confidence=confidence,
                    p_label=p_given,
                    p_suggested=float(p[r, b]),
                    head_p_label=None if head_p is None or g is None else float(head_p[r, g]),
                    head_p_suggested=None if head_p is None else float(head_p[r, b]),
                    neighbors=evidence,
                )
            )
    found.sort(key=lambda f: (-f.confidence, f.key))
    log.info("audit: %d of %d labelled items disagree with the bank", len(found), labelled.size)
    found = found[:n]
    if precision is not None:
        found = found[: _cut(found, wrong_label_estimates(classifier, found, mode), precision)]
    return found


def wrong_label_estimates(classifier: Classifier, found: list[Finding], mode: str) -> np.ndarray:
    """Each finding's chance that its stored label is wrong, from out-of-fold evidence."""
    est = np.array([1.0 - f.p_label for f in found], np.float64)
    head = classifier.head
    oof = head.out_of_fold if head is not None else None
    if oof is None or not found:
        return est
    p = oof.get(mode if mode in oof else "hybrid")
    if p is None:
        return est
    row = {int(i): r for r, i in enumerate(oof["ids"].tolist())}
    col = {label: j for j, label in enumerate(head.vocabulary)}  # type: ignore[union-attr]
    ids = classifier.store.get_by_keys([f.key for f in found]).ids
    for i, (f, item) in enumerate(zip(found, ids, strict=True)):
        r, c = row.get(int(item)), col.get(f.label)
        if r is not None and c is not None and bool(oof["scored"][r]):
            est[i] = 1.0 - float(p[r, c])
    return est


def _cut(found: list[Finding], estimate: np.ndarray, precision: float) -> int:
    """Length of the longest prefix whose mean estimate reaches `precision`."""
    if not len(found):
        return 0
    mean = np.cumsum(estimate) / np.arange(1, len(estimate) + 1)
    meets = np.flatnonzero(mean >= precision - 1e-12)
    return int(meets[-1]) + 1 if meets.size else 0
