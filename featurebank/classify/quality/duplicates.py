"""Duplicates and leaks: the same content stored twice, and copies across splits.

Exact duplicates come first, from the content sha256 the store records for every
image it embedded (no vectors needed). Near duplicates are calibrated on the bank
itself, two ways:

- globally: a pair closer than `DUPLICATE_Z` robust standard deviations below the
  bank's typical nearest-neighbour distance (on a log scale);
- locally: an item and its nearest neighbour closer than `LOCAL_RATIO` times the
  distance of either one's next neighbour, and under `LOCAL_CAP` times the bank's
  typical nearest-neighbour distance. A resized copy is often further from its
  original than two crisp look-alikes are, yet much closer than anything else.

Why relative: a fixed cosine cut means different things for different backbones and
transforms; the bank's own spread of neighbour distances does not. Measured on the
digits CNN (benchmarks/quality_bench.py): byte-identical and re-encoded copies are all
found by distance, copies saved at twice the size mostly, copies cropped by a pixel a
side rarely (that backbone moves them as far as two different scans of one digit).
Those the distance leaves out are found by their thumbnails where the bank keeps them
(`looks.py`: near neighbours compared pixel by pixel after aligning scale).

A leak is a duplicate pair with one item in `train` and the other in `val` or
`test`: the held-out score then measures memory, not generalisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from featurebank.classify.quality import looks
from featurebank.classify.quality.graph import Graph, robust_log_scale

DUPLICATE_Z = 3.0  # robust standard deviations below the typical nearest-neighbour distance
LOCAL_RATIO = 0.25  # a pair this much closer than either item's next neighbour
LOCAL_CAP = 0.5  # ... and closer than this fraction of the typical nearest-neighbour distance
TRAIN, HELD_OUT = "train", ("val", "test")


@dataclass(frozen=True)
class Member:
    key: str
    split: str
    label: str | None


@dataclass(frozen=True)
class Pair:
    """Two items that look like one: `distance` in the index's metric (0 for exact)."""

    a: str
    b: str
    distance: float
    exact: bool
    match: float = 0.0  # the thumbnails' match (looks.py) when they decided it; 0: not compared


@dataclass
class Group:
    """Items that are copies of each other (connected by duplicate pairs)."""

    members: list[Member]
    pairs: list[Pair] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return all(p.exact for p in self.pairs)


@dataclass(frozen=True)
class Leak:
    """A duplicate pair across splits: `train` item and its copy in `val`/`test`."""

    train: str
    held_out: str
    split: str
    distance: float
    exact: bool
    match: float = 0.0  # as Pair.match


@dataclass
class Duplicates:
    threshold: float  # distance under which a pair is a near duplicate
    groups: list[Group]
    leaks: list[Leak]


def sha_pairs(shas: Sequence[str | None]) -> list[tuple[int, int]]:
    """(first, other) rows sharing a content hash; rows without one never match."""
    first: dict[str, int] = {}
    out = []
    for r, sha in enumerate(shas):
        if not sha:
            continue
        if sha in first:
            out.append((first[sha], r))
        else:
            first[sha] = r
    return out


def near_threshold(
    graph: Graph, exact_rows: np.ndarray, z: float = DUPLICATE_Z
) -> tuple[float, float]:
    """(the distance below which any pair is a near duplicate, the typical nearest-
    neighbour distance), from the bank's own spread of nearest-neighbour distances
    (exact copies left out of the calibration)."""
    d1 = graph.dist[:, 0].copy()
    d1[exact_rows] = np.inf
    med, spread = robust_log_scale(d1)
    return (float(np.exp(med - z * spread)) if spread > 0 else 0.0), float(np.exp(med))


def locally_close(graph: Graph, typical: float) -> np.ndarray:
    """Rows whose nearest neighbour is far closer to them than either one's next one."""
    if graph.dist.shape[1] < 2:
        return np.zeros(len(graph.dist), bool)
    o = graph.pos[:, 0]
    ok = o >= 0
    oo = np.maximum(o, 0)
    d = graph.dist[:, 0]
    next_r = graph.dist[:, 1]
    next_o = np.where(graph.pos[oo, 0] == np.arange(len(o)), graph.dist[oo, 1], graph.dist[oo, 0])
    with np.errstate(invalid="ignore"):
        return ok & (d < LOCAL_CAP * typical) & (d < LOCAL_RATIO * np.minimum(next_r, next_o))


def find(
    graph: Graph,
    keys: Sequence[str],
    splits: Sequence[str],
    labels: Sequence[str | None],
    shas: Sequence[str | None],
    z: float = DUPLICATE_Z,
    look: Callable[[list[tuple[int, int]]], np.ndarray] | None = None,
) -> Duplicates:
    """Exact (same sha256) and near duplicate groups, and the leaks among their pairs.
    `look` gives the thumbnail match of row pairs (looks.Looks.matches): near
    neighbours the feature cut leaves out are copies when their thumbnails match."""
    exact = sha_pairs(shas)
    exact_rows = np.array(sorted({r for p in exact for r in p}), np.int64)
    threshold, typical = near_threshold(graph, exact_rows, z)
    pairs: dict[tuple[int, int], Pair] = {}
    for a, b in exact:
        pairs[(a, b)] = Pair(keys[a], keys[b], 0.0, True)
    close = (graph.dist < threshold) & (graph.pos >= 0)
    close[:, 0] |= locally_close(graph, typical)
    rows, cols = np.nonzero(close)
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        o = int(graph.pos[r, c])
        a, b = min(r, o), max(r, o)
        if (a, b) not in pairs:
            pairs[(a, b)] = Pair(keys[a], keys[b], float(graph.dist[r, c]), False)
    if look is not None:
        candidates = _candidates(graph, typical, pairs)
        found = look(list(candidates))
        for (a, b), m, copy in zip(candidates, found, looks.copies(found), strict=True):
            if copy:
                pairs[(a, b)] = Pair(keys[a], keys[b], candidates[(a, b)], False, float(m))
    groups = _groups(pairs, keys, splits, labels)
    leaks = [
        leak for (a, b), p in sorted(pairs.items()) if (leak := _leak(p, a, b, splits)) is not None
    ]
    leaks.sort(key=lambda x: (not x.exact, x.distance, x.train))
    return Duplicates(threshold, groups, leaks)


def _candidates(
    graph: Graph, typical: float, pairs: dict[tuple[int, int], Pair]
) -> dict[tuple[int, int], float]:
    """(row, row) -> distance of the near neighbours worth comparing by their thumbnails
    (not yet duplicates): each row's nearest, however far (a weak backbone can move a
    copy far, but rarely past its original), and its next few closer than the typical
    neighbour."""
    first = graph.first(looks.CANDIDATES)
    near = (first.pos >= 0) & (first.dist < looks.WITHIN * typical)
    near[:, 0] = first.pos[:, 0] >= 0
    out: dict[tuple[int, int], float] = {}
    for r, c in zip(*np.nonzero(near), strict=True):
        o = int(first.pos[r, c])
        pair = (min(int(r), o), max(int(r), o))
        if pair not in pairs:
            out.setdefault(pair, float(first.dist[r, c]))
    return out


def _leak(p: Pair, a: int, b: int, splits: Sequence[str]) -> Leak | None:
    for tr, ho, key_tr, key_ho in ((a, b, p.a, p.b), (b, a, p.b, p.a)):
        if splits[tr] == TRAIN and splits[ho] in HELD_OUT:
            return Leak(key_tr, key_ho, splits[ho], p.distance, p.exact, p.match)
    return None


def _groups(
    pairs: dict[tuple[int, int], Pair],
    keys: Sequence[str],
    splits: Sequence[str],
    labels: Sequence[str | None],
) -> list[Group]:
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    by_root: dict[int, list[int]] = {}
    for x in sorted(parent):
        by_root.setdefault(root(x), []).append(x)
    edges: dict[int, list[Pair]] = {}
    for (a, _b), p in sorted(pairs.items()):
        edges.setdefault(root(a), []).append(p)
    out = [
        Group([Member(keys[r], splits[r], labels[r]) for r in rows], edges[g])
        for g, rows in by_root.items()
    ]
    out.sort(key=lambda g: (not g.exact, min(p.distance for p in g.pairs), g.members[0].key))
    return out
