"""Held-out splits that do not represent train: items where train has nothing near, and
labels a split lacks or holds in other shares than train.

Why: a test score measures a model only where the test items look like what it was trained
on. A `val`/`test` item is uncovered when its nearest train item is farther than train
items' own nearest train neighbours are but for extremes (the same robust log-scale cut as
outliers): it lies where train has no data; or when its label is one train has no item
of, which no model trained there can predict, however near train items of other labels
lie. For a split drawn at random from the bank, its items' nearest train distances are
distributed like train's own, so few are. A label train has and a split lacks is not
measured there at all, and label shares far from train's weigh the score's classes
differently from training.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from featurebank.classify.quality.duplicates import HELD_OUT, TRAIN
from featurebank.classify.quality.graph import Graph, robust_log_scale
from featurebank.classify.quality.outliers import OUTLIER_Z


@dataclass(frozen=True)
class SplitCheck:
    """How well one held-out split represents train."""

    split: str
    items: int
    uncovered: int  # items farther from train than train's own cut, or of a label train lacks
    label_distance: float  # total variation distance of its label shares from train's (0: same)
    missing_labels: list[str]  # train's labels it has no item of
    unseen_labels: list[str]  # its labels train has no item of
    uncovered_keys: list[str] = field(default_factory=list)  # farthest from train first

    @property
    def uncovered_share(self) -> float:
        return self.uncovered / self.items if self.items else 0.0


def find(
    graph: Graph, splits: Sequence[str], labels: Sequence[str | None], limit: int
) -> list[SplitCheck]:
    """One check per held-out split present, when the bank has train items (none otherwise)."""
    sp = np.asarray(splits, dtype=object)
    is_train = sp == TRAIN
    if not is_train.any():
        return []
    to_train = graph.pos >= 0
    to_train &= is_train[np.maximum(graph.pos, 0)]
    nearest = np.where(to_train, graph.dist, np.inf).min(axis=1)  # inf: none among the k
    med, spread = robust_log_scale(nearest[is_train])
    cut = float(np.exp(med + OUTLIER_Z * spread))
    train_shares = _shares([lab for lab, t in zip(labels, is_train, strict=True) if t])
    out = []
    for name in HELD_OUT:
        rows = np.flatnonzero(sp == name)
        if rows.size == 0:
            continue
        shares = _shares([labels[r] for r in rows.tolist()])
        unseen = set(shares) - set(train_shares) if train_shares else set()
        label_unseen = np.array([labels[r] in unseen for r in rows.tolist()], bool)
        lonely = rows[(nearest[rows] > cut) | label_unseen]
        lonely = lonely[np.argsort(-nearest[lonely], kind="stable")]
        distance = (
            0.5 * sum(abs(shares.get(x, 0.0) - train_shares.get(x, 0.0))
                      for x in set(shares) | set(train_shares))
            if shares and train_shares else 0.0
        )
        out.append(SplitCheck(
            name, int(rows.size), int(lonely.size), float(distance),
            sorted(set(train_shares) - set(shares)) if shares else [],
            sorted(unseen),
            [str(graph.keys[r]) for r in lonely[:limit].tolist()],
        ))
    return out


def _shares(labels: Sequence[str | None]) -> dict[str, float]:
    counts = Counter(lab for lab in labels if lab is not None)
    total = sum(counts.values())
    return {lab: c / total for lab, c in counts.items()} if total else {}
