"""The data-quality pass: wrong labels, duplicates, leaks, outliers and held-out splits
unlike train, from the bank's index, without training anything.

One module per finding type (labels, duplicates, outliers, held_out) over the neighbour
lists of every item (neighbourhood, computed in blocks by space); this module puts the
findings into one `Report`. A `Cache` keeps the lists, so a later pass over the same bank
applies only what changed since. A bank without labels still gets duplicates, leaks,
outliers and split checks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from featurebank.classify.classifier import Classifier
from featurebank.classify.knn import Voter
from featurebank.classify.quality import (
    decisions,
    duplicates,
    held_out,
    labels,
    looks,
    neighbourhood,
    outliers,
)
from featurebank.classify.quality.graph import Graph, graph_of
from featurebank.core.errors import InvalidInput
from featurebank.core.memory import small_pages

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
    changed: int | None = None  # items applied to the last pass's lists; None: read afresh
    splits: list[held_out.SplitCheck] = field(default_factory=list)  # val/test against train

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
    """Every finding type over the live items, read afresh; lists cut to `limit` each
    (counts are whole)."""
    return Cache().run(clf, precision, limit)


class Cache:
    """The last pass's rows and neighbour lists of one bank: the next pass applies only
    the store's changes since (`neighbourhood.update`), then derives every finding
    again from the lists (vectorised, so cheap beside the neighbour search)."""

    def __init__(self) -> None:
        self.hood: neighbourhood.Neighbourhood | None = None
        self._last: tuple[tuple[Any, ...], Report] | None = None  # (what it answered, report)
        self.looks = looks.Looks()  # thumbnail matches of candidate duplicate pairs
        self._lock = threading.Lock()

    def run(self, clf: Classifier, precision: float | None = None, limit: int = LIMIT) -> Report:
        check_limit(limit)
        if precision is not None and not 0 < precision <= 1:
            raise InvalidInput(f"precision must be in (0, 1], got {precision:g}")
        # an update keeps the arrays a read made (huge pages suit those) and makes many
        # big, brief ones (see `small_pages`)
        brief = small_pages() if self.hood is not None else contextlib.nullcontext()
        with self._lock, brief:
            started = time.perf_counter()
            labels_gen = int(clf.store.labels_generation)
            voter = clf.voter()
            self.hood = hood = neighbourhood.update(
                self.hood, clf, NEIGHBOURS, max(NEIGHBOURS, voter.k)
            )
            asked = (precision, limit, voter, hood.generation, hood.index_generation,
                     decisions.stamp(clf.bank))
            if self._last is not None and self._last[0] == asked:  # nothing changed since
                report = replace(self._last[1], changed=0,
                                 seconds=time.perf_counter() - started)
                return report
            everything, ref = graphs(hood)
            probs = self.probs(hood, voter, ref)
            report = report_of(hood, clf, everything, ref, probs, precision, limit, labels_gen,
                               started, self.looks)
            self._last = (asked, report)
            return report

    def probs(
        self, hood: neighbourhood.Neighbourhood, voter: Voter, ref: Graph | None
    ) -> np.ndarray | None:
        """Every row's out-of-fold vote over `ref` (`labels.trusted_vote`), None without
        two voters. Voted afresh each pass: one re-weighting reaches every row that a
        neighbour's trust reaches, and it costs a few vectorised sweeps of the lists."""
        if ref is None or vote_list(hood) is None:
            return None
        return labels.trusted_vote(voter, ref)


def vote_list(hood: neighbourhood.Neighbourhood) -> str | None:
    """The list labels are voted on: the voters', or every item's when every item votes;
    None without two voters."""
    if neighbourhood.VOTERS in hood.lists:
        return neighbourhood.VOTERS
    return neighbourhood.EVERYTHING if hood.voters.sum() > 1 else None


def graphs(hood: neighbourhood.Neighbourhood) -> tuple[Graph, Graph | None]:
    """(every item's graph, the voters' graph or None without two voters), with label
    codes into the sorted labels of the bank."""
    labs = hood.labels
    vocab = sorted({lab for lab in labs if lab is not None})
    col = {lab: j for j, lab in enumerate(vocab)}
    row_codes = np.array(
        [col[lab] if v and lab is not None else -1
         for lab, v in zip(labs, hood.voters, strict=True)],
        np.int64,
    )

    def graph(name: str) -> Graph:
        lists = hood.lists[name]
        return graph_of(lists.pos, lists.fd, hood.metric, row_codes, vocab, hood.keys, labs)

    everything = graph(neighbourhood.EVERYTHING)
    name = vote_list(hood)
    return everything, None if name is None else everything if name == neighbourhood.EVERYTHING \
        else graph(name)


def report_of(
    hood: neighbourhood.Neighbourhood,
    clf: Classifier,
    everything: Graph,
    ref: Graph | None,
    probs: np.ndarray | None,
    precision: float | None,
    limit: int,
    labels_gen: int,
    started: float,
    seen: looks.Looks | None = None,
) -> Report:
    """The findings of a neighbourhood (`seen`: the thumbnail matches compared so far)."""
    keys, splits, labs = hood.keys, hood.splits, hood.labels
    voters = hood.voters
    kept = decisions.load(clf.bank)
    look = None  # thumbnails compared only where the bank keeps some
    if clf.store.thumbnail_count():
        look = functools.partial((seen or looks.Looks()).matches, clf.store, hood.ids, keys)
    dups = duplicates.find(everything.first(NEIGHBOURS), keys, splits, labs, hood.shas, look=look)
    hidden = forget_kept(kept, dups)
    # a handful of labelled items is no reference for a domain: then every item is
    reference = ref if ref is not None and voters.sum() > NEIGHBOURS else everything
    kept_outliers = {k.keys[0] for k in kept if k.kind == "outlier"}
    found, _, cut = outliers.find(reference.first(NEIGHBOURS), keys, kept_outliers, limit)
    hidden += found.kept
    labelled = np.flatnonzero([lab is not None for lab in labs])
    errors = None
    if labelled.size and ref is not None and probs is not None:
        errors = labels.find(
            probs[labelled], ref, labelled, [keys[i] for i in labelled],
            [str(labs[i]) for i in labelled], precision,
            {(k.keys[0], k.label) for k in kept if k.kind == "label"}, limit,
        )
        hidden += errors.kept
    checks = held_out.find(everything.first(NEIGHBOURS), splits, labs, limit)
    counts = {
        "label_errors": 0 if errors is None else errors.candidates,
        "duplicate_groups": len(dups.groups),
        "exact_groups": sum(g.exact for g in dups.groups),
        "leaks": len(dups.leaks),
        "outliers": found.count,
        "uncovered": sum(c.uncovered for c in checks),  # held-out items train has nothing near
        "kept": hidden,  # findings left out because a person kept them
    }
    dups.groups, dups.leaks = dups.groups[:limit], dups.leaks[:limit]
    seconds = time.perf_counter() - started
    log.info("quality pass over %d items in %.2f s (%s)", len(keys), seconds,
             "read afresh" if hood.changed is None else f"{hood.changed} changed items applied")
    return Report(
        items=len(keys), labelled=int(labelled.size), index_generation=hood.index_generation,
        labels_generation=labels_gen, labels=errors, duplicates=dups, outliers=found.listed,
        outlier_cut=cut, counts=counts, seconds=seconds, changed=hood.changed, splits=checks,
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
