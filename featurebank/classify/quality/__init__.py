"""The data-quality pass: wrong labels, duplicates, leaks and outliers from the bank's
index, without training anything.

One module per finding type (labels, duplicates, outliers) over one neighbour graph
(graph); this module reads the bank once and puts the findings into one `Report`.
A bank without labels still gets duplicates, leaks and outliers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from featurebank.classify.classifier import Classifier
from featurebank.classify.quality import duplicates, labels, outliers
from featurebank.classify.quality.graph import neighbours
from featurebank.core.errors import InvalidInput
from featurebank.core.vocabulary import HELD_OUT_SPLIT

log = logging.getLogger(__name__)

NEIGHBOURS = 10  # k of the duplicate and outlier graphs
LIMIT = 100  # findings listed per kind by default


@dataclass
class Report:
    items: int
    labelled: int
    index_generation: int
    labels_generation: int
    labels: labels.LabelErrors | None  # None when the bank has no labels
    duplicates: duplicates.Duplicates
    outliers: list[outliers.Outlier]
    outlier_cut: float
    counts: dict[str, int]  # findings of each kind before the lists were cut to the limit
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for g, group in zip(out["duplicates"]["groups"], self.duplicates.groups, strict=True):
            g["exact"] = group.exact
        return out


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidInput(f"n must be a positive integer, got {limit!r}")
    return limit


def run(clf: Classifier, precision: float | None = None, limit: int = LIMIT) -> Report:
    """Every finding type over the live items; lists cut to `limit` each (counts are whole)."""
    check_limit(limit)
    if precision is not None and not 0 < precision <= 1:
        raise InvalidInput(f"precision must be in (0, 1], got {precision}")
    started = time.perf_counter()
    store, searcher = clf.store, clf.searcher
    labels_gen = int(store.labels_generation)
    items = store.to_numpy()
    ids = np.asarray(items.ids, np.int64)
    keys, splits, labs = items.keys, items.splits, items.labels
    shas = [m.get("sha256") if isinstance(m.get("sha256"), str) else None for m in items.meta]
    voters = np.array(
        [lab is not None and sp != HELD_OUT_SPLIT for lab, sp in zip(labs, splits, strict=True)],
        dtype=bool,
    )
    voter = clf.voter()
    ref = None
    if voters.sum() > 1:  # one search serves the label votes and the outliers
        # when every item votes, the voters' graph is the whole bank's (and needs no filter)
        ref = neighbours(searcher, items.vectors, ids, max(NEIGHBOURS, voter.k),
                         voters_only=not voters.all())
    everything = ref if ref is not None and voters.all() else neighbours(
        searcher, items.vectors, ids, NEIGHBOURS
    )
    dups = duplicates.find(everything.first(NEIGHBOURS), keys, splits, labs, shas)
    # a handful of labelled items is no reference for a domain: then every item is
    reference = ref if ref is not None and voters.sum() > NEIGHBOURS else everything
    found, _, cut = outliers.find(reference.first(NEIGHBOURS), keys)
    labelled = np.flatnonzero([lab is not None for lab in labs])
    errors = None
    if labelled.size and ref is not None:
        errors = labels.find(
            voter, ref, labelled, [keys[i] for i in labelled], [str(labs[i]) for i in labelled],
            precision,
        )
        errors.findings = errors.findings[:limit]
    counts = {
        "label_errors": 0 if errors is None else errors.candidates,
        "duplicate_groups": len(dups.groups),
        "exact_groups": sum(g.exact for g in dups.groups),
        "leaks": len(dups.leaks),
        "outliers": len(found),
    }
    dups.groups, dups.leaks = dups.groups[:limit], dups.leaks[:limit]
    seconds = time.perf_counter() - started
    log.info("quality pass over %d items in %.2f s", len(ids), seconds)
    return Report(
        items=len(ids), labelled=int(labelled.size), index_generation=int(clf.index_generation),
        labels_generation=labels_gen, labels=errors, duplicates=dups, outliers=found[:limit],
        outlier_cut=cut, counts=counts, seconds=seconds,
    )
