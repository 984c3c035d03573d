"""The answers of the Python API: small dataclasses, the same for a bank in process and over gRPC.

Each has `to_dict()`; a batch is a `Batch` (a list, in the order of the inputs) that also
converts to numpy (`to_numpy(field)`) and, when pandas is installed, to a DataFrame
(`to_pandas()`, one row per result, or per neighbour of a search).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from featurebank.core.errors import FailedPrecondition, InvalidInput

T = TypeVar("T", bound="Result")


class Result:
    """What every answer can do: become a plain dict, and rows of a table."""

    numpy_field: ClassVar[str] = "key"  # what `Batch.to_numpy()` stacks by default

    def to_dict(self) -> dict[str, Any]:
        """The result as plain Python values (JSON-ready), nested results included (a
        neighbour's metadata only when it was asked for)."""
        out: dict[str, Any] = _unset_dropped(dataclasses.asdict(self))  # type: ignore[call-overload]
        return out

    def rows(self) -> list[dict[str, Any]]:
        """Its rows in a DataFrame of many results: one, without the neighbours' list."""
        row = self.to_dict()
        row.pop("neighbors", None)
        return [row]


def _unset_dropped(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _unset_dropped(v) for k, v in value.items() if not (k == "metadata" and v is None)}
    if isinstance(value, list):
        return [_unset_dropped(v) for v in value]
    return value


@dataclass(frozen=True)
class Neighbor(Result):
    """A stored item near the query: its key, label (None when unlabelled), score (higher = closer)."""

    key: str
    label: str | None
    score: float
    metadata: dict[str, Any] | None = None  # with include_metadata


@dataclass(frozen=True)
class Item(Result):
    """A stored item as `scroll` lists it: key, label, split, metadata (and vector if asked)."""

    key: str
    label: str | None
    split: str
    metadata: dict[str, Any]
    vector: list[float] | None = None


@dataclass(frozen=True)
class Page(Result):
    """One page of `scroll`: items in key order, and the token of the next page (None: last)."""

    items: list[Item]
    next_page_token: str | None
    store_generation: int

    @property
    def keys(self) -> list[str]:
        """The page's keys, in order."""
        return [i.key for i in self.items]

    def rows(self) -> list[dict[str, Any]]:
        """One row per item."""
        return [i.to_dict() for i in self.items]


@dataclass(frozen=True)
class Classification(Result):
    """The bank's answer for one input.

    `label` is the most probable label, or "unknown" when the answer abstained (its top
    probability was under the threshold calibrated for the precision asked); `labels` and
    `probabilities` rank the labels either way, and `probability` is the top one's.
    `head_generation` is None when no head took part (knn mode, or no head trained).
    """

    label: str
    probability: float
    labels: list[str]
    probabilities: list[float]
    abstained: bool
    mode: str
    index_generation: int
    head_generation: int | None
    neighbors: list[Neighbor] = field(default_factory=list)

    numpy_field: ClassVar[str] = "label"


@dataclass(frozen=True)
class Hits(Result):
    """The nearest stored items of one query, closest first."""

    neighbors: list[Neighbor]
    index_generation: int

    numpy_field: ClassVar[str] = "keys"

    @property
    def keys(self) -> list[str]:
        """The neighbours' keys, closest first."""
        return [n.key for n in self.neighbors]

    @property
    def scores(self) -> list[float]:
        """The neighbours' scores, closest (highest) first."""
        return [n.score for n in self.neighbors]

    @property
    def labels(self) -> list[str | None]:
        """The neighbours' labels (None when unlabelled)."""
        return [n.label for n in self.neighbors]

    def rows(self) -> list[dict[str, Any]]:
        """One row per neighbour, with its rank (0 = closest)."""
        return [
            {"rank": r, **n.to_dict(), "index_generation": self.index_generation}
            for r, n in enumerate(self.neighbors)
        ]


@dataclass(frozen=True)
class Suggestion(Result):
    """An unlabelled item worth labelling: how uncertain the bank is (`score`) and its guesses."""

    key: str
    score: float
    labels: list[str]
    probabilities: list[float]


@dataclass(frozen=True)
class Finding(Result):
    """A labelled item whose label the bank doubts, with the neighbours that say so.

    `confidence` = p(suggested) - p(label), the item left out of its own vote; the head's
    view (`head_p_*`) is None when the bank has no head.
    """

    key: str
    label: str
    suggested: str
    confidence: float
    p_label: float
    p_suggested: float
    head_p_label: float | None
    head_p_suggested: float | None
    neighbors: list[Neighbor] = field(default_factory=list)


@dataclass(frozen=True)
class Duplicate(Result):
    """Items that are copies of each other: exact (the same content) or near (closer than
    the bank's calibrated distance, or with thumbnails that match); `splits` in the order
    of `keys`."""

    keys: list[str]
    splits: list[str]
    exact: bool
    distance: float  # the closest pair's (0 for exact copies)
    match: float = 0.0  # the best thumbnail match of its pairs (0: none was compared)


@dataclass(frozen=True)
class Leak(Result):
    """A train item copied into a held-out split."""

    train: str
    held_out: str
    split: str
    distance: float
    exact: bool
    match: float = 0.0  # the pair's thumbnail match (0: not compared)


@dataclass(frozen=True)
class Outlier(Result):
    """An item far from every labelled neighbour: `score` is its mean neighbour distance over
    theirs to their own; `neighbors` the nearest reference items (key, distance)."""

    key: str
    score: float
    distance: float
    neighbors: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class SplitCheck(Result):
    """How well a held-out split (val, test) represents train: its items farther from every
    train item than train items are from each other but for extremes (`uncovered`), how far
    its label shares are from train's (total variation, 0 = the same), train's labels it
    lacks and its labels train lacks."""

    split: str
    items: int
    uncovered: int
    uncovered_keys: list[str]
    label_distance: float
    missing_labels: list[str]
    unseen_labels: list[str]


@dataclass(frozen=True)
class Quality(Result):
    """One data-quality pass: wrong labels (with an estimate of how many, per class and per
    swapped pair), duplicates, train/test leaks, outliers and each held-out split against
    train. `counts` are whole; each list is cut to the `n` asked. `estimated_wrong` is None
    for a bank without labels."""

    items: int
    labelled: int
    estimated_wrong: float | None
    wrong_per_class: dict[str, float]
    swapped: list[tuple[str, str, float]]  # (label, label, estimated items) most first
    label_errors: list[Finding]
    duplicates: list[Duplicate]
    leaks: list[Leak]
    outliers: list[Outlier]
    splits: list[SplitCheck]
    counts: dict[str, int]
    index_generation: int
    labels_generation: int
    seconds: float

    numpy_field: ClassVar[str] = "items"


@dataclass(frozen=True)
class Kept(Result):
    """A finding remembered as looked at and kept: not listed by later passes."""

    kind: str  # label, duplicate or outlier
    keys: list[str]
    label: str | None = None  # a kept label: the label it was kept with


@dataclass(frozen=True)
class Info(Result):
    """What a bank is: its spec, counts, labels and live generations (None: none yet)."""

    bank: str
    spec: dict[str, Any]
    dim: int
    count: int
    labelled: int
    labels: list[str]
    store_generation: int
    labels_generation: int
    index_generation: int | None
    head_generation: int | None
    default_mode: str | None


@dataclass(frozen=True)
class Written(Result):
    """What a write did: items added, replaced, relabelled or deleted, and the generations after."""

    store_generation: int
    added: int = 0
    replaced: int = 0
    updated: int = 0
    deleted: int = 0
    index_generation: int | None = None


@dataclass(frozen=True)
class Published(Result):
    """A build or training that published: the live generations now, and its manifest."""

    index_generation: int | None
    head_generation: int | None
    manifest: dict[str, Any] = field(default_factory=dict)


class Batch(list[T], Generic[T]):
    """Results of a batched input, in its order; a list that also converts to numpy and pandas."""

    def to_dicts(self) -> list[dict[str, Any]]:
        """Each result as a plain dict."""
        return [r.to_dict() for r in self]

    def to_numpy(self, field: str | None = None) -> np.ndarray:
        """One field of every result stacked (labels of classifications, keys of hits, ...).

        A field holding a list per result (the `keys` or `scores` of hits, the `probabilities`
        of classifications) gives a 2-d array, padded with "" or NaN where a result has fewer.
        """
        if not self:
            return np.zeros(0)
        name = field or type(self[0]).numpy_field
        try:
            values = [getattr(r, name) for r in self]
        except AttributeError:
            raise InvalidInput(f"{type(self[0]).__name__} has no field {name!r}") from None
        if not isinstance(values[0], list):
            return np.asarray(values)
        width = max(len(v) for v in values)
        numeric = all(isinstance(e, float | int) for v in values for e in v)
        pad: Any = np.nan if numeric else ""
        return np.asarray([[*v, *([pad] * (width - len(v)))] for v in values])

    def to_pandas(self) -> Any:
        """A pandas DataFrame, one row per result (per neighbour for searches, with `query`)."""
        try:
            import pandas as pd
        except ImportError:
            raise FailedPrecondition("to_pandas needs pandas: pip install pandas") from None
        rows = [{"query": i, **row} for i, r in enumerate(self) for row in r.rows()]
        return pd.DataFrame(rows)
