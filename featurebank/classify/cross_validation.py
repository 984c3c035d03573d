"""Choosing k, T, the hybrid weight a and the head's settings by cross-validation over every label.

Why not one validation split: with few labels per class a 20 % split holds a
handful of items, and whatever a, k and T it picks are noise, frozen into the head.
Here every labelled item scores every choice once, out of sample:

- kNN side, leave-one-out: the neighbours of all items are searched once (each
  without itself) at the largest k; every (k, T) is a re-weighting of that search.
- Head side, stratified k-fold: each fold's items are predicted by a head trained
  on the other folds; what the head's trainer chooses on them (the linear probe's L2
  strength and input, classify/linear_probe.py; the hidden-layer head's epochs,
  classify/hidden_layer_head.py) is used by the head trained on everything, and its
  out-of-fold probabilities are what a, the guard and abstention are calibrated on.
- a: minimises the out-of-fold log-loss of a * p_knn + (1 - a) * p_head, then shrinks
  towards 0.5 in proportion to how little evidence there is (items whose class has
  another labelled item, the only ones cross-validation can score).
- the guard: when either single mode is clearly more accurate out of fold than the
  hybrid (McNemar's test at two standard deviations), the hybrid becomes that mode
  (a = 1 for knn, 0 for head) and the manifest says which; with no item to score it
  on (a single label per class) the hybrid is the head. Measured on
  benchmarks/classify_quality.py: a strict "any lead" guard and a lightly shrunk a
  (n / (n + 20)) followed noise in a few dozen labels and cost up to a point of
  accuracy; the strong shrinkage and the clear-lead guard did not.
- label noise: with `denoise`, an item's weight in the head's loss is how far its
  leave-one-out neighbours agree with its label (1 when they vote for it, down to
  `MIN_WEIGHT` when they prefer another), computed in each fold from that fold's
  training items only. A wrong label is usually outvoted by its neighbours; the
  head, which would otherwise fit it, gives it less weight.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from featurebank.classify import metrics
from featurebank.classify.knn import DEFAULT_K, DEFAULT_T, Voter

if TYPE_CHECKING:
    from featurebank.classify.head_model import Head
    from featurebank.classify.linear_probe import OutOfFold

log = logging.getLogger(__name__)

K_GRID = (5, 10, 20, 50)
T_GRID = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.2, 0.5, 1.0)
A_GRID = tuple(round(float(a), 2) for a in np.linspace(0.0, 1.0, 21))
DEFAULT_A = 0.5
SHRINK_ITEMS = 100  # with n scored items, a moves n / (n + 100) of the way from 0.5 to its optimum
GUARD_SIGMAS = 2.0  # how clearly a single mode must beat the hybrid to replace it
MIN_WEIGHT = 0.2  # the least an item whose neighbours outvote its label counts in the head's loss


class Trainer(Protocol):
    """Fits one kind of head: chooses its settings out of fold, then fits on every item."""

    def out_of_fold(
        self,
        x: np.ndarray,
        y: np.ndarray,
        n_classes: int,
        folds: np.ndarray,
        fold_weights: dict[int, np.ndarray | None],
    ) -> OutOfFold: ...

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        n_classes: int,
        sample_weight: np.ndarray | None = None,
        extra: np.ndarray | None = None,
    ) -> Head: ...


@dataclass
class LeaveOneOut:
    """Every labelled item's neighbours among the others: ids, codes and scores (n, k_max),
    and the items' own ids (`items`, n), which a fold removes from its neighbours."""

    ids: np.ndarray
    codes: np.ndarray
    scores: np.ndarray
    metric: str
    items: np.ndarray

    def without(self, held_out_ids: np.ndarray) -> np.ndarray:
        """The codes with `held_out_ids`' votes removed (what a fold's training items see)."""
        return np.where(np.isin(self.ids, held_out_ids), -1, self.codes)


@dataclass
class Choices:
    """What cross-validation chose, the out-of-fold probabilities behind it, and its scores."""

    voter: Voter
    a: float
    a_optimum: float
    acts_as: str
    head_choice: dict[str, Any]
    """What the head's cross-validation chose (the probe's C and input, or the epochs)."""
    p_knn: np.ndarray
    p_head: np.ndarray
    metrics: dict[str, dict[str, float]]
    grid: list[dict[str, float]] = field(default_factory=list)
    curves: Mapping[str, Sequence[float | None]] = field(default_factory=dict)
    down_weighted: int = 0
    scored: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    """Items whose class has another labelled item: the only ones scored out of sample."""

    @property
    def p_hybrid(self) -> np.ndarray:
        return hybrid(self.p_knn, self.p_head, self.a)

    def to_dict(self) -> dict[str, Any]:
        """The hybrid block of the head manifest."""
        return {
            "a": self.a,
            "k": self.voter.k,
            "temperature": self.voter.temperature,
            "weights": self.voter.weights,
            "metric": self.voter.metric,
            "acts_as": self.acts_as,
            "a_optimum": self.a_optimum,
        }


def hybrid(p_knn: np.ndarray, p_head: np.ndarray, a: float) -> np.ndarray:
    """p = a * p_knn + (1 - a) * p_head (both over the same vocabulary)."""
    return np.asarray(a * p_knn + (1.0 - a) * p_head, dtype=np.float32)


def stratified_folds(y: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold number of each item: every class spread evenly over the folds, fixed seed."""
    n_folds = max(1, min(n_folds, len(y)))
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), np.int64)
    start = 0
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        members = members[rng.permutation(len(members))]
        # continue where the last class stopped, so small classes do not all land in fold 0
        fold[members] = (start + np.arange(len(members))) % n_folds
        start = (start + len(members)) % n_folds
    return fold


def scored_items(y: np.ndarray) -> int:
    """Items cross-validation can score: those whose class has another labelled item."""
    counts = np.bincount(y)
    return int(counts[counts >= 2].sum())


def select_voter(
    y: np.ndarray, loo: LeaveOneOut, n_classes: int, scored: np.ndarray | None = None
) -> tuple[Voter, np.ndarray, list[dict[str, float]]]:
    """(k, T) with the lowest leave-one-out log-loss of the kNN vote over the `scored`
    items (default all); ties keep the smaller. Returns the votes of every item."""
    rows = np.ones(len(y), bool) if scored is None else scored
    kmax = loo.codes.shape[1]
    k_grid = sorted({min(k, kmax) for k in K_GRID})
    best: tuple[float, Voter, np.ndarray] | None = None
    grid: list[dict[str, float]] = []
    for k in k_grid:
        for t in T_GRID:
            voter = Voter(k, t, "softmax", loo.metric)
            p = voter.probs(loo.codes, loo.scores, n_classes)
            ll = metrics.log_loss(y[rows], p[rows]) if rows.any() else 0.0
            grid.append({"k": k, "temperature": t, "log_loss": ll})
            if best is None or ll < best[0] - 1e-12:
                best = (ll, voter, p)
    if best is None:  # no neighbours at all
        voter = Voter(min(DEFAULT_K, max(kmax, 1)), DEFAULT_T, "softmax", loo.metric)
        return voter, np.zeros((len(y), n_classes), np.float32), grid
    return best[1], best[2], grid


def agreement_weights(y: np.ndarray, p_knn: np.ndarray) -> np.ndarray:
    """How far each item's neighbours agree with its label, in [MIN_WEIGHT, 1].

    p(own label) / p(top label): 1 when the neighbours' vote is for the item's label;
    items with no labelled neighbour keep weight 1 (there is no evidence against them).
    """
    top = p_knn.max(axis=1)
    own = p_knn[np.arange(len(y)), y]
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(top > 0, own / np.where(top > 0, top, 1.0), 1.0)
    return np.clip(w, MIN_WEIGHT, 1.0).astype(np.float32)


def fold_weights(
    y: np.ndarray, folds: np.ndarray, loo: LeaveOneOut, voter: Voter, n_classes: int, denoise: bool
) -> dict[int, np.ndarray | None]:
    """Each fold's training items' weights in the head's loss (None without `denoise`),
    from the votes of that fold's training items only."""
    out: dict[int, np.ndarray | None] = {}
    for f in np.unique(folds).tolist():
        held, train = folds == f, folds != f
        if not denoise:
            out[f] = None
            continue
        codes = loo.without(loo.items[held])
        out[f] = agreement_weights(y[train], voter.probs(codes[train], loo.scores[train], n_classes))
    return out


def select_a(
    y: np.ndarray, p_knn: np.ndarray, p_head: np.ndarray, evidence: int, a_grid: Sequence[float] = A_GRID
) -> tuple[float, float, list[dict[str, float]]]:
    """(a shrunk towards 0.5, a at the log-loss optimum, the grid); ties keep the smaller a."""
    grid: list[dict[str, float]] = []
    best_a, best_ll = DEFAULT_A, np.inf
    for a in a_grid:
        ll = metrics.log_loss(y, hybrid(p_knn, p_head, a)) if len(y) else np.inf
        grid.append({"a": a, "log_loss": float(ll)})
        if ll < best_ll - 1e-12:
            best_a, best_ll = a, ll
    trust = evidence / (evidence + SHRINK_ITEMS)
    shrunk = round(DEFAULT_A + trust * (best_a - DEFAULT_A), 2)
    return float(shrunk), float(best_a), grid


def guard(y: np.ndarray, p_knn: np.ndarray, p_head: np.ndarray, a: float) -> str:
    """"hybrid", or the single mode that is clearly more accurate out of fold.

    Clearly: on the items where the two disagree about right and wrong, the single mode
    is right on more by over GUARD_SIGMAS standard deviations (McNemar's test), so a
    one- or two-item lead on a handful of labels does not throw the mix away.
    """
    if len(y) == 0:
        return "hybrid"
    mixed_right = hybrid(p_knn, p_head, a).argmax(axis=1) == y
    best, best_margin = "hybrid", 0.0
    for mode, p in (("knn", p_knn), ("head", p_head)):
        right = p.argmax(axis=1) == y
        wins, losses = int((right & ~mixed_right).sum()), int((mixed_right & ~right).sum())
        margin = wins - losses
        if margin > GUARD_SIGMAS * np.sqrt(max(wins + losses, 1)) and margin > best_margin:
            best, best_margin = mode, margin
    return best


def choose(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    loo: LeaveOneOut,
    trainer: Trainer,
    n_folds: int,
    denoise: bool,
    seed: int,
) -> Choices:
    """Every choice the head generation needs, from cross-validation over all of x, y."""
    # only items whose class has another labelled item can be predicted out of sample
    s = np.bincount(y, minlength=n_classes)[y] >= 2
    voter, p_knn, knn_grid = select_voter(y, loo, n_classes, s)
    folds = stratified_folds(y, n_folds, seed)
    oof = trainer.out_of_fold(
        x, y, n_classes, folds, fold_weights(y, folds, loo, voter, n_classes, denoise)
    )
    p_head = oof.p
    evidence = int(s.sum())
    a, a_opt, a_grid = select_a(y[s], p_knn[s], p_head[s], evidence)
    # nothing to weigh the two on (one label per class): the head, scikit-learn's default
    # model there, which beat the half-and-half mix on every such case measured
    acts_as = guard(y[s], p_knn[s], p_head[s], a) if evidence else "head"
    final_a = {"knn": 1.0, "head": 0.0}.get(acts_as, a)
    scores = {
        "knn": metrics.summary(y[s], p_knn[s]),
        "head": metrics.summary(y[s], p_head[s]),
        "hybrid": metrics.summary(y[s], hybrid(p_knn[s], p_head[s], final_a)),
    } if evidence else {}
    down = int((agreement_weights(y, p_knn) < 1.0).sum()) if denoise else 0
    log.info(
        "cross-validation over %d items (%d folds): k=%d T=%.3f a=%.2f (optimum %.2f) acts as %s, "
        "head %s",
        len(y), folds.max() + 1 if len(y) else 0, voter.k, voter.temperature, final_a, a_opt,
        acts_as, oof.chosen,
    )
    return Choices(
        voter=voter,
        a=final_a,
        a_optimum=a_opt,
        acts_as=acts_as,
        head_choice=oof.chosen,
        p_knn=p_knn,
        p_head=p_head,
        metrics=scores,
        grid=[*({"k": g["k"], "temperature": g["temperature"], "log_loss": g["log_loss"]}
                for g in knn_grid), *a_grid],
        curves=oof.curves,
        down_weighted=down,
        scored=s,
    )
