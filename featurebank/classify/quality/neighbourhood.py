"""What a quality pass reads from the bank, kept so that the next pass applies only
what changed.

A `Neighbourhood` holds the live items as rows (ids, keys, labels, splits, content
hashes), their vectors as the index stores them (`space`), and the neighbour lists of
every row: its nearest items and, when not every item votes, its nearest voters.

`update` applies the store's change log since the generation it read: deleted rows
leave; new rows get their lists; rows that lost a neighbour (deleted, or no longer a
voter) are searched again; every other row merges the rows it may newly see (new
items, new voters) into its list, in list mode only the rows whose probed lists hold
one, in one search of the new rows that serves every list (`_merge_gained`). A row's k
nearest over (old candidates + new ones) is the merge of its old k with the new ones, so
the lists are a full pass's: below `space.EXACT_MAX` items exactly;
above, those of a full pass over the same lists (a fresh pass draws new k-means
centroids, so neighbours near a list's edge can differ). Neighbours whose distances
differ only by float32 rounding may come in another order. A new index generation
(transform), a trimmed change log or a change of mode (exact / lists, which rows vote
at all) reads the bank afresh. Wherever a row's nearest items all vote, its voters' list
is read off its list of every item (`_knn`), in a full pass and in an update alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from featurebank.classify.quality import space as space_mod
from featurebank.classify.quality.space import Space, closer, knn, nearness
from featurebank.core.errors import NotFound
from featurebank.core.vocabulary import HELD_OUT_SPLIT
from featurebank.core.vocabulary import metric as metric_named
from featurebank.store.rows import LogTrimmed

if TYPE_CHECKING:
    from featurebank.classify.classifier import Classifier
    from featurebank.store.items import Items

EVERYTHING, VOTERS = "everything", "voters"


@dataclass
class Lists:
    """Every row's k nearest rows (of the voters only, or of every row)."""

    k: int
    voters_only: bool
    pos: np.ndarray  # (n, k) rows, -1 = none
    fd: np.ndarray  # (n, k) faiss distances (squared l2, or inner product)
    room: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def grow(self, n: int) -> None:
        """Rows up to n, the new ones empty, written into spare room kept after the rows
        (an update of a few rows must not copy a million)."""
        m, room = len(self.pos), self.room
        if room is None or len(room[0]) < n or not np.shares_memory(room[0], self.pos):
            cap = n + n // 4
            room = np.empty((cap, self.k), np.int64), np.empty((cap, self.k), np.float32)
            room[0][:m], room[1][:m] = self.pos, self.fd
            self.room = room
        self.pos, self.fd = room[0][:n], room[1][:n]
        self.pos[m:], self.fd[m:] = -1, np.nan


@dataclass
class Neighbourhood:
    generation: int  # store generation the rows reflect
    index_generation: int
    metric: str
    k_all: int  # neighbours of every item (duplicates, outliers)
    k_votes: int  # neighbours a label is voted on by
    ids: np.ndarray  # int64 store ids, increasing
    keys: list[str]
    labels: list[str | None]
    splits: list[str]
    shas: list[str | None]
    space: Space
    lists: dict[str, Lists] = field(default_factory=dict)
    changed: int | None = None  # items the last update applied; None: read afresh
    voters: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # rows that vote

    def __post_init__(self) -> None:
        self.voters = voters_of(self.labels, self.splits)

    def layout(self) -> dict[str, tuple[int, bool]]:
        """The lists the findings need: name -> (k, voters only). Every item's list is as
        wide as the votes need, so that when every item votes it is also the voters'."""
        v = self.voters
        n_v = int(v.sum())
        out = {EVERYTHING: (max(self.k_all, self.k_votes), False)}
        if 1 < n_v < len(v):
            out[VOTERS] = (self.k_votes, True)
        return out

    def compute_lists(self) -> None:
        """Every list from scratch over the current rows."""
        rows, voters = np.arange(len(self.ids)), self.voters
        self.lists = {}
        for name, (k, only) in self.layout().items():  # every item's list first
            pos, fd = _knn(self.space, rows, voters if only else None, k,
                           self.lists.get(EVERYTHING))
            self.lists[name] = Lists(k, only, pos, fd)


def voters_of(labels: list[str | None], splits: list[str]) -> np.ndarray:
    """Rows whose label votes: labelled and not held out."""
    return np.array(
        [lab is not None and sp != HELD_OUT_SPLIT for lab, sp in zip(labels, splits, strict=True)],
        dtype=bool,
    )


def shas_of(items: Items) -> list[str | None]:
    return [m.get("sha256") if isinstance(m.get("sha256"), str) else None for m in items.meta]


def read(clf: Classifier, k_all: int, k_votes: int) -> Neighbourhood:
    """Every live item and its lists, read afresh."""
    store, searcher = clf.store, clf.searcher
    generation = int(store.generation)  # before the read: an update may apply a change twice
    items = store.to_numpy()
    kind = metric_named(searcher.metric).faiss_kind
    x = searcher.transform(items.vectors) if len(items) else items.vectors
    hood = Neighbourhood(
        generation, int(clf.index_generation), searcher.metric, k_all, k_votes,
        np.asarray(items.ids, np.int64), list(items.keys), list(items.labels), list(items.splits),
        shas_of(items), space_mod.space_of(x, kind),
    )
    hood.compute_lists()
    return hood


def update(hood: Neighbourhood | None, clf: Classifier, k_all: int, k_votes: int) -> Neighbourhood:
    """`hood` with the store's changes since it was read applied (see the module)."""
    if (
        hood is None or hood.index_generation != int(clf.index_generation)
        or (hood.k_all, hood.k_votes, hood.metric) != (k_all, k_votes, clf.searcher.metric)
    ):
        return read(clf, k_all, k_votes)
    try:
        return _apply(hood, clf)
    except (LogTrimmed, NotFound):  # the log no longer reaches it, or an item went meanwhile
        return read(clf, k_all, k_votes)


def _apply(hood: Neighbourhood, clf: Classifier) -> Neighbourhood:
    store, searcher = clf.store, clf.searcher
    ch = store.changes_since(hood.generation)
    ch_added = ch.added.astype(np.int64)
    had = _present(hood.ids, ch_added)  # applied twice (read during a commit): a relabel
    added = ch_added[~had]
    deleted = ch.deleted.astype(np.int64)
    deleted = deleted[_present(hood.ids, deleted)]
    relabelled = np.union1d(ch.relabelled.astype(np.int64), ch_added[had])
    relabelled = relabelled[_present(hood.ids, relabelled)]
    hood.changed = len(added) + len(deleted) + len(relabelled)
    hood.generation = int(ch.generation)
    if not hood.changed:
        return hood
    old_voters = hood.voters
    relabelled_at = np.zeros(0, np.int64)
    if len(relabelled):
        got = store.to_numpy(ids=relabelled.astype(np.uint64))
        relabelled_at = np.searchsorted(hood.ids, np.asarray(got.ids, np.int64))
        for r, lab, sp in zip(relabelled_at.tolist(), got.labels, got.splits, strict=True):
            hood.labels[r], hood.splits[r] = lab, sp
    keep = np.ones(len(hood.ids), bool)
    keep[np.searchsorted(hood.ids, deleted)] = False
    remap = np.where(keep, np.cumsum(keep) - 1, -1)
    new = store.to_numpy(ids=added.astype(np.uint64)) if len(added) else None
    n_kept = int(keep.sum())
    voters = old_voters.copy()
    voters[relabelled_at] = voters_of([hood.labels[r] for r in relabelled_at.tolist()],
                                      [hood.splits[r] for r in relabelled_at.tolist()])
    _take_rows(hood, keep, new, searcher)
    n = len(hood.ids)
    hood.voters = np.concatenate([voters[keep], voters_of(hood.labels[n_kept:],
                                                          hood.splits[n_kept:])])
    if (
        n == 0 or hood.space.exact != (n <= space_mod.EXACT_MAX) or not hood.space.sized_for(n)
    ):
        return read(clf, hood.k_all, hood.k_votes)
    voters = hood.voters
    was_voter = np.zeros(n, bool)
    was_voter[:n_kept] = old_voters[keep]
    if VOTERS not in hood.lists and old_voters.all() and len(old_voters) > 1:
        # every item voted: its list was the voters' list too
        old = hood.lists[EVERYTHING]
        hood.lists[VOTERS] = Lists(hood.k_votes, True, old.pos[:, :hood.k_votes].copy(),
                                   old.fd[:, :hood.k_votes].copy())
    layout = hood.layout()
    hood.lists = {name: lists for name, lists in hood.lists.items() if name in layout}
    carried = []
    for name, (k, only) in layout.items():
        if name not in hood.lists:  # voters appeared where one or none voted: searched afresh
            pos, fd = knn(hood.space, np.arange(n), voters, k)
            hood.lists[name] = Lists(k, True, pos, fd)
            continue
        carried.append(_carry(hood.space, hood.lists[name], keep, remap, n_kept,
                              voters if only else None, was_voter if only else None,
                              hood.lists[EVERYTHING] if only else None))
    _merge_gained(hood.space, carried, n_kept)
    return hood


def _present(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which of `ids` are in the increasing `sorted_ids`."""
    if not len(sorted_ids):
        return np.zeros(len(ids), bool)
    at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return np.asarray(sorted_ids[at] == ids)


def _take_rows(hood: Neighbourhood, keep: np.ndarray, new: Items | None, searcher: Any) -> None:
    """Drop the deleted rows and append the new ones (ids keep increasing)."""
    sp = hood.space
    if not keep.all():
        kept = np.flatnonzero(keep).tolist()
        hood.keys, hood.labels = [hood.keys[i] for i in kept], [hood.labels[i] for i in kept]
        hood.splits, hood.shas = [hood.splits[i] for i in kept], [hood.shas[i] for i in kept]
        sp.drop(keep)
        hood.ids = hood.ids[keep]
    if new is not None and len(new):
        sp.append(np.ascontiguousarray(searcher.transform(new.vectors), np.float32))
        hood.ids = np.concatenate([hood.ids, np.asarray(new.ids, np.int64)])
        hood.keys += list(new.keys)
        hood.labels += list(new.labels)
        hood.splits += list(new.splits)
        hood.shas += shas_of(new)


@dataclass
class _Carried:
    """One list of neighbours carried over to the new rows, before the gained rows that
    its other rows may newly see are merged in."""

    lists: Lists
    gained: np.ndarray  # (n,) bool: rows it may newly list (new items, new voters)
    fresh: np.ndarray  # (n,) bool: rows whose list was searched again whole


def _carry(
    space: Space,
    lists: Lists,
    keep: np.ndarray,
    remap: np.ndarray,
    n_kept: int,
    allowed: np.ndarray | None,
    was_allowed: np.ndarray | None,
    wider: Lists | None,
) -> _Carried:
    """Kept rows keep their lists (renumbered); rows that lost a neighbour (deleted, or no
    longer allowed) and new rows are searched again (`wider`: every item's lists, already
    carried over)."""
    n, k = len(space.x), lists.k
    if keep.all():  # only appended: the kept rows' lists stand, new rows go on the end
        lists.grow(n)
        kept = lists.pos[:n_kept]
        lost = np.zeros(kept.shape, bool)
    else:
        old = lists.pos[keep]
        moved = np.where(old >= 0, remap[np.maximum(old, 0)], -1)
        lost = (old >= 0) & (moved < 0)
        kept_fd = lists.fd[keep]
        lists.pos, lists.fd = np.full((n, k), -1, np.int64), np.full((n, k), np.nan, np.float32)
        lists.pos[:n_kept], lists.fd[:n_kept] = moved, kept_fd
        kept = lists.pos[:n_kept]
    gained = np.zeros(n, bool)
    gained[n_kept:] = True
    if allowed is not None and was_allowed is not None:
        lost |= (kept >= 0) & ~allowed[np.maximum(kept, 0)]
        gained = allowed & ~was_allowed
    fresh = np.zeros(n, bool)
    fresh[:n_kept] = lost.any(axis=1)
    fresh[n_kept:] = True
    again = np.flatnonzero(fresh)
    lists.pos[again], lists.fd[again] = _knn(space, again, allowed, k, wider)
    return _Carried(lists, gained, fresh)


def _knn(
    space: Space, rows: np.ndarray, allowed: np.ndarray | None, k: int, wider: Lists | None
) -> tuple[np.ndarray, np.ndarray]:
    """`knn`, taking a row's list from `wider` (its k or more nearest of every item, over
    the same candidates) where that list's first k are all allowed: then they are its k
    nearest allowed items. Why: where nearly every item votes, the voters' lists are
    then mostly read off, not searched."""
    if wider is None or allowed is None or wider.k < k or not len(rows):
        return knn(space, rows, allowed, k)
    first = wider.pos[rows, :k]
    read_off = ((first >= 0) & allowed[np.maximum(first, 0)]).all(axis=1)
    pos, fd = first.copy(), wider.fd[rows, :k].copy()
    searched = np.flatnonzero(~read_off)
    pos[searched], fd[searched] = knn(space, rows[searched], allowed, k)
    return pos, fd


def _merge_gained(space: Space, carried: list[_Carried], n_kept: int) -> None:
    """Every kept row not searched again merges into each of its lists the gained rows
    nearer than that list's k-th (the rows' distances to the gained rows computed once
    for every list)."""
    if not carried:
        return
    any_gains = np.logical_or.reduce([c.gained for c in carried])
    gained = np.flatnonzero(any_gains)
    rows = np.flatnonzero(~np.logical_and.reduce([c.fresh[:n_kept] for c in carried]))
    if not len(gained) or not len(rows):
        return
    worst = [nearness(c.lists.pos[:, -1], c.lists.fd[:, -1], space.kind) for c in carried]
    k = max(c.lists.k for c in carried)
    uncommon = any_gains & ~np.logical_and.reduce([c.gained for c in carried])
    r, g, d = closer(space, rows, gained, np.maximum.reduce(worst)[rows], k, uncommon)
    for c, bound in zip(carried, worst, strict=True):
        ok = c.gained[g] & ~c.fresh[r] & (nearness(g, d, space.kind) < bound[r])
        if ok.any():
            _merge_pairs(c.lists, r[ok], g[ok], d[ok], space.kind)


def _merge_pairs(lists: Lists, r: np.ndarray, g: np.ndarray, d: np.ndarray, kind: str) -> None:
    """Merge the (row, new neighbour, distance) pairs into the rows' lists."""
    order = np.lexsort((g, nearness(g, d, kind), r))  # per row nearest first; ties by position
    r, g, d = r[order], g[order], d[order]
    rows, start, count = np.unique(r, return_index=True, return_counts=True)
    rank = np.arange(len(r)) - np.repeat(start, count)
    at = np.repeat(np.arange(len(rows)), count)
    near = rank < lists.k
    width = int(min(lists.k, count.max()))
    pb = np.full((len(rows), width), -1, np.int64)
    fb = np.full((len(rows), width), np.nan, np.float32)
    pb[at[near], rank[near]], fb[at[near], rank[near]] = g[near], d[near]
    lists.pos[rows], lists.fd[rows] = merge(lists.pos[rows], lists.fd[rows], pb, fb, lists.k, kind)


def merge(
    pa: np.ndarray, fa: np.ndarray, pb: np.ndarray, fb: np.ndarray, k: int, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest of two disjoint neighbour lists per row."""
    p, f = np.concatenate([pa, pb], axis=1), np.concatenate([fa, fb], axis=1)
    order = np.argsort(nearness(p, f, kind), axis=1, kind="stable")[:, :k]
    return np.take_along_axis(p, order, axis=1), np.take_along_axis(f, order, axis=1)
