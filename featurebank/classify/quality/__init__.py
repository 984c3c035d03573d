"""The data-quality pass: wrong labels, duplicates, leaks and outliers from the bank's
index, without training anything.

One module per finding type (labels, duplicates, outliers) over the neighbour graphs
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
from featurebank.classify.quality import decisions, duplicates, labels, outliers
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
        raise InvalidInput(f"precision must be in (0, 1], got {precision:g}")
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
    kept = decisions.load(clf.bank)
    dups = duplicates.find(everything.first(NEIGHBOURS), keys, splits, labs, shas)
    hidden = forget_kept(kept, dups)
    # a handful of labelled items is no reference for a domain: then every item is
    reference = ref if ref is not None and voters.sum() > NEIGHBOURS else everything
    found, _, cut = outliers.find(reference.first(NEIGHBOURS), keys)
    kept_outliers = {k.keys[0] for k in kept if k.kind == "outlier"}
    hidden += sum(o.key in kept_outliers for o in found)
    found = [o for o in found if o.key not in kept_outliers]
    labelled = np.flatnonzero([lab is not None for lab in labs])
    errors = None
    if labelled.size and ref is not None:
        errors = labels.find(
            voter, ref, labelled, [keys[i] for i in labelled], [str(labs[i]) for i in labelled],
            precision, {(k.keys[0], k.label) for k in kept if k.kind == "label"},
        )
        hidden += errors.kept
        errors.findings = errors.findings[:limit]
    counts = {
        "label_errors": 0 if errors is None else errors.candidates,
        "duplicate_groups": len(dups.groups),
        "exact_groups": sum(g.exact for g in dups.groups),
        "leaks": len(dups.leaks),
        "outliers": len(found),
        "kept": hidden,  # findings left out because a person kept them
    }
    dups.groups, dups.leaks = dups.groups[:limit], dups.leaks[:limit]
    seconds = time.perf_counter() - started
    log.info("quality pass over %d items in %.2f s", len(ids), seconds)
    return Report(
        items=len(ids), labelled=int(labelled.size), index_generation=int(clf.index_generation),
        labels_generation=labels_gen, labels=errors, duplicates=dups, outliers=found[:limit],
        outlier_cut=cut, counts=counts, seconds=seconds,
    )


def forget_kept(kept: set[decisions.Kept], dups: duplicates.Duplicates) -> int:
    """Drop kept duplicate pairs (and their leaks) from `dups`; how many findings went."""
    pairs = {k.keys for k in kept if k.kind == "duplicate"}
    if not pairs:
        return 0
    before = len(dups.groups) + len(dups.leaks)
    for g in dups.groups:
        g.pairs = [p for p in g.pairs if tuple(sorted((p.a, p.b))) not in pairs]
        linked = {k for p in g.pairs for k in (p.a, p.b)}
        g.members = [m for m in g.members if m.key in linked]
    dups.groups = [g for g in dups.groups if g.pairs]
    dups.leaks = [x for x in dups.leaks if tuple(sorted((x.train, x.held_out))) not in pairs]
    return before - len(dups.groups) - len(dups.leaks)
