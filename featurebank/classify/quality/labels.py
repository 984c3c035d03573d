"""Wrong labels: which items, how many per class, and which classes are swapped.

The evidence is out of fold: every labelled item's kNN vote over the other items
(leave-one-out, as in `classify.audit`), so an item's own label never votes for itself.
Each neighbour's vote is weighted by how far its own label is trusted: its own vote's
probability of the label it carries, found in `TRUST_ROUNDS` rounds from the plain
vote. Why: a wrong label votes for its wrong class around it, and where labels are
swapped between two classes the wrong ones cluster and shield each other; on the
shipped backbone's digits with 5-20 % of labels flipped, this raised the list's top-N
recall from 0.917-0.990 to 0.983-1.000 (benchmarks/quality_bench.py). A class with
fewer voters than k has its doubt scaled by voters / k: among k neighbours a right label
of a class with 5 voters is outvoted anyway, and distrusting it doubted every held-out
item near it (the demo bank, 5 voters a class: 19 of its right labels listed, not 6).

How many (a confident joint, as in Northcutt et al., "Confident Learning"): class j's
threshold is the mean probability of j over the items labelled j; an item counts
towards (given i, true j) for the most probable class whose probability reaches its
threshold. Each row is rescaled to the number of items labelled i, and the
off-diagonal mass is the estimated number of wrong labels (per class: its row; per
swapped pair: both cells).

The list: the items the vote relabels, least probable label first (ties: the larger
margin of the best other label), cut at the estimated count by default; with a
precision P, at the longest head of the list whose estimated precision (the mean of
1 - p(given label) over it) is at least P.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from featurebank.classify.audit import EVIDENCE, Finding
from featurebank.classify.knn import Voter, neighbour_weights, tally
from featurebank.classify.quality.graph import Graph

SWAPS = 5  # class pairs listed
TRUST_ROUNDS = 8  # rounds of re-weighting each neighbour by the trust in its own label
TRUST_FLOOR = 1e-3  # the least trust: a row among distrusted neighbours still gets a vote
TRUST_SETTLED = 1e-4  # no trust moved more than this in a round: the rounds stop early


@dataclass(frozen=True)
class ClassCount:
    label: str
    items: int
    wrong: float  # estimated wrong labels among the items labelled `label`


@dataclass(frozen=True)
class Swap:
    a: str
    b: str
    count: float  # estimated items labelled a that are b, plus b that are a


@dataclass
class LabelErrors:
    estimated_wrong: float
    classes: list[ClassCount]
    swaps: list[Swap]
    findings: list[Finding]  # cut as asked, most confident first
    selected: int  # findings the cut keeps (the list may be shortened further for display)
    candidates: int  # items the vote relabels, before the cut (kept ones left out)
    cut: str  # what chose the cut: "estimate" or "precision P"
    estimated_precision: float  # of the list as cut
    kept: int = 0  # findings left out because a person kept the label


def trusted_vote(voter: Voter, graph: Graph) -> np.ndarray:
    """Every row's out-of-fold vote (n, classes) over the pass's voters graph, each
    neighbour weighted by the trust in its own label (module docstring)."""
    k = min(voter.k, graph.codes.shape[1])
    codes, at = graph.codes[:, :k], np.maximum(graph.pos[:, :k], 0)
    weights = neighbour_weights(graph.scores[:, :k], voter.weights, voter.temperature,
                                voter.metric)
    w = np.where((codes >= 0) & np.isfinite(weights), weights, 0.0).astype(np.float32)
    w_agree = np.where(codes == graph.own[:, None], w, 0.0).astype(np.float32)  # for its own label
    # how far a row's own vote can speak against it: fully once its class has k voters
    # (then a right label's neighbours are mostly its class); a class of 5 voters among
    # k = 20 neighbours would otherwise have every label of it doubted
    voters = np.bincount(graph.own[graph.own >= 0], minlength=len(graph.vocabulary))
    weight = np.minimum(1.0, voters / k)[np.maximum(graph.own, 0)].astype(np.float32)
    trust = np.ones(len(graph.own), np.float32)  # of each row's own label
    t = np.empty(at.shape, np.float32)  # the neighbours' trust, one buffer for every round
    for _ in range(TRUST_ROUNDS):
        np.take(trust, at, out=t)
        total = np.einsum("ij,ij->i", w, t)
        with np.errstate(invalid="ignore", divide="ignore"):
            p_own = np.where(total > 0, np.einsum("ij,ij->i", w_agree, t) / total, 0.0)
        believed = 1.0 - weight * (1.0 - p_own)
        settled = np.abs(believed - trust).max(initial=0.0) < TRUST_SETTLED
        trust = np.maximum(believed, TRUST_FLOOR).astype(np.float32)
        if settled:
            break
    np.take(trust, at, out=t)
    return tally(codes, np.multiply(w, t, out=t), len(graph.vocabulary))


def suspicion_order(p: np.ndarray, y: np.ndarray, keys: Sequence[str]) -> np.ndarray:
    """Rows most likely wrong first: the least p(given label), ties by the larger margin
    of the best other label, then by key."""
    rows = np.arange(len(p))
    p_given = np.where(y >= 0, p[rows, np.maximum(y, 0)], 0.0)
    other = p.copy()
    other[rows, np.maximum(y, 0)] = -1.0
    margin = other.max(axis=1, initial=0.0) - p_given
    return np.lexsort((np.array(keys, dtype=str), -margin, p_given))


def confident_joint(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(C, C) estimated counts of (given, true), rows summing to each class's items."""
    c = p.shape[1]
    counts = np.bincount(y, minlength=c).astype(np.float64)
    thresholds = np.array(
        [p[y == j, j].mean() if counts[j] else np.inf for j in range(c)], np.float64
    )
    # each row's likeliest class among those at or above their threshold: its best class
    # where that one is (nearly every row), else searched among the others
    true = p.argmax(axis=1)
    keep = p[np.arange(len(p)), true] >= thresholds[true]
    rest = np.flatnonzero(~keep)
    if rest.size:
        above = p[rest] >= thresholds[None, :]
        true[rest] = np.where(above, p[rest], -1.0).argmax(axis=1)
        keep[rest] = above.any(axis=1)
    joint = np.zeros((c, c), np.float64)
    np.add.at(joint, (y[keep], true[keep]), 1.0)
    rows = joint.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = np.where(rows > 0, joint * counts[:, None] / rows, 0.0)
    return scaled


def find(
    p: np.ndarray,
    graph: Graph,
    rows: np.ndarray,
    keys: Sequence[str],
    labels: Sequence[str],
    precision: float | None = None,
    kept: set[tuple[str, str | None]] | None = None,
    limit: int | None = None,
) -> LabelErrors:
    """Label findings of the labelled `rows` of the voters graph (`p`, `keys`, `labels`:
    theirs, `p` their `trusted_vote` rows) with their evidence (the first `limit` of the
    cut list), the per-class estimate and the swapped pairs."""
    vocab = graph.vocabulary
    col = {lab: j for j, lab in enumerate(vocab)}
    y = np.array([col.get(lab, -1) for lab in labels], np.int64)
    scored = np.flatnonzero(y >= 0)
    joint = (
        confident_joint(p[scored], y[scored])
        if scored.size and p.shape[1]
        else np.zeros((len(vocab), len(vocab)))
    )
    off = joint - np.diag(np.diag(joint))
    counts = np.bincount(y[scored], minlength=len(vocab))
    classes = [
        ClassCount(vocab[j], int(counts[j]), float(off[j].sum())) for j in range(len(vocab))
    ]
    pair = off + off.T
    iu, ju = np.triu_indices(len(vocab), 1)
    order = np.argsort(-pair[iu, ju], kind="stable")[:SWAPS]
    swaps = [
        Swap(vocab[iu[o]], vocab[ju[o]], float(pair[iu[o], ju[o]]))
        for o in order
        if pair[iu[o], ju[o]] >= 0.5
    ]
    doubt, best, p_best, p_given = _doubted(p, y, keys)
    n_found = len(doubt)
    if kept:
        mine = np.array([(keys[r], labels[r]) in kept for r in doubt.tolist()], bool)
        doubt, best, p_best, p_given = doubt[~mine], best[~mine], p_best[~mine], p_given[~mine]
    estimate = float(off.sum())
    if precision is None:
        # labels a person kept are right: the estimate's remainder is still to be found
        n_cut, how = max(0, int(round(estimate)) - (n_found - len(doubt))), "estimate"
    else:
        n_cut, how = _precision_cut(p_given, precision), f"precision {precision:g}"
    n_cut = min(n_cut, len(doubt))
    est_precision = float(np.mean(1.0 - p_given[:n_cut])) if n_cut else 1.0
    listed = [
        Finding(
            key=keys[r], label=labels[r], suggested=vocab[int(best[j])],
            confidence=float(p_best[j] - p_given[j]), p_label=float(p_given[j]),
            p_suggested=float(p_best[j]), neighbors=graph.evidence(int(rows[r]), EVIDENCE),
        )
        for j, r in enumerate(doubt[: n_cut if limit is None else min(n_cut, limit)].tolist())
    ]
    return LabelErrors(
        estimate, classes, swaps, listed, n_cut, len(doubt), how, est_precision,
        n_found - len(doubt),
    )


def _doubted(
    p: np.ndarray, y: np.ndarray, keys: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rows the vote relabels, most suspect first (`suspicion_order`), their best class,
    p(best), p(given))."""
    if not p.size:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0), np.zeros(0)
    best = p.argmax(axis=1)
    p_best = p[np.arange(len(p)), best].astype(np.float64)
    p_given = np.where(y >= 0, p[np.arange(len(p)), np.maximum(y, 0)], 0.0).astype(np.float64)
    doubt = np.flatnonzero((p_best > 0) & (best != y))
    doubt = doubt[suspicion_order(p[doubt], y[doubt], [keys[r] for r in doubt.tolist()])]
    return doubt, best[doubt], p_best[doubt], p_given[doubt]


def _precision_cut(p_given: np.ndarray, precision: float) -> int:
    """The longest head of the list whose mean estimated chance of being wrong >= precision."""
    if not len(p_given):
        return 0
    wrong = 1.0 - p_given
    running = np.cumsum(wrong) / np.arange(1, len(wrong) + 1)
    ok = np.flatnonzero(running >= precision)
    return int(ok[-1]) + 1 if ok.size else 0
