"""One set of calls for a bank, whether it is open in this process or served over gRPC.

`FeatureBank` checks the arguments and shapes the answers (one result for one input, a
`Batch` for a batch); `LocalBank` and `RemoteBank` implement the few primitives below it,
so the two cannot drift apart in what they accept or return.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from featurebank.api.inputs import KEYS, Keys, Query, as_query
from featurebank.api.results import (
    Batch,
    Classification,
    Finding,
    Hits,
    Info,
    Kept,
    Page,
    Published,
    Quality,
    Suggestion,
    Written,
)
from featurebank.core.errors import InvalidInput, shown

DEFAULT_K = 10
DEFAULT_TOP_N = 5
DEFAULT_LIST_N = 10


class FeatureBank(abc.ABC):
    """A bank: embed, search and classify anything `x` can be; write items, labels and indexes.

    `x` is a path, a folder, a list of paths, image bytes, a PIL image, an image array
    (H,W,C) / (N,H,W,C), a vector / (N,D) array, or `featurebank.keys(...)`; one input gives
    one result, a batch a `Batch` in the same order. Use as a context manager or `close()`.
    """

    # ------------------------------------------------------------------ reads

    def embed(self, x: Any) -> np.ndarray:
        """The bank's vector of each input: (D,) for one, (N, D) for a batch (float32)."""
        q = as_query(x)
        vectors = self._embed(q)
        return vectors if q.batched else vectors[0]

    def search(
        self,
        x: Any,
        k: int = DEFAULT_K,
        *,
        labels: Sequence[str] | None = None,
        filter: str | None = None,  # noqa: A002 - the name every vector database uses
        score_threshold: float | None = None,
        group_by: str | None = None,
        group_size: int | None = None,
        include_metadata: bool = False,
    ) -> Hits | Batch[Hits]:
        """The `k` nearest stored items of each input, optionally only those with `labels`.

        `filter`: an expression such as 'meta.camera == 4 and label != "cat"' (README:
        Filters); `score_threshold`: only hits at least this similar (maybe fewer than k);
        `group_by` ("label" or "meta.NAME"): at most `group_size` (default 1) hits per value;
        `include_metadata`: each hit's metadata. A stored item given by key is left out of
        its own neighbours.
        """
        _check_int("k", k)
        wanted = _labels_filter(labels)
        options = {
            "filter": check_filter(filter), "score_threshold": _threshold(score_threshold),
            **_groups(group_by, group_size), "include_metadata": bool(include_metadata),
        }
        return _shaped(as_query(x), lambda q: self._search(q, k, wanted, options))

    def recommend(
        self,
        positive: Any,
        negative: Any = None,
        *,
        k: int = DEFAULT_K,
        strategy: str = "average",
        filter: str | None = None,  # noqa: A002 - the name every vector database uses
        score_threshold: float | None = None,
        include_metadata: bool = False,
    ) -> Hits:
        """Items like the `positive` inputs and unlike the `negative` ones (any inputs `x`
        can be; `featurebank.keys(...)` for stored items, which are left out of the hits).

        `strategy`: "average" searches from avg(pos) + (avg(pos) - avg(neg)); "best_score"
        ranks candidates by their best positive unless a negative is nearer (Qdrant's).
        """
        _check_int("k", k)
        from featurebank.server.queries import check_strategy

        options = {"k": k, "strategy": check_strategy(strategy), "filter": check_filter(filter),
                   "score_threshold": _threshold(score_threshold),
                   "include_metadata": bool(include_metadata)}  # fmt: skip
        pos = as_query(positive)
        neg = as_query(negative) if negative is not None else None
        return self._recommend(pos, neg, options)

    def scroll(
        self,
        filter: str | None = None,  # noqa: A002 - the name every vector database uses
        *,
        limit: int = 100,
        page_token: str | None = None,
        include_vectors: bool = False,
    ) -> Page:
        """One page of stored items passing `filter`, in key order; pass the page's
        `next_page_token` back for the next (items added meanwhile may or may not appear;
        none present at the start is skipped or repeated)."""
        _check_int("limit", limit)
        if page_token is not None and not isinstance(page_token, str):
            raise InvalidInput(f"page_token must be a string, got {shown(page_token)}")
        return self._scroll(check_filter(filter), limit, page_token or "", bool(include_vectors))

    def count(self, filter: str | None = None) -> int:  # noqa: A002
        """How many stored items pass `filter` (all when None)."""
        return self._count(check_filter(filter))

    def set_metadata(self, metadata: Mapping[str, Mapping[str, Any]], *, replace: bool = False) -> Written:
        """Set fields of stored items' user metadata, {key: {field: value}} (a None value
        removes the field); `replace` replaces each item's whole user map. Vectors are not
        touched."""
        if not isinstance(metadata, Mapping) or not metadata:
            raise InvalidInput("set_metadata takes a non-empty mapping {key: {field: value}}")
        return self._set_metadata({str(k): dict(v) for k, v in metadata.items()}, bool(replace))

    def classify(
        self,
        x: Any,
        *,
        mode: str | None = None,
        top_n: int = DEFAULT_TOP_N,
        abstain_below: float | None = None,
        k: int | None = None,
        include_neighbors: bool = False,
        filter: str | None = None,  # noqa: A002 - the name every vector database uses
    ) -> Classification | Batch[Classification]:
        """Labels with probabilities for each input.

        `mode`: knn, head, hybrid or stacked (None: the bank's default, hybrid when a head
        exists); `top_n` labels are ranked; `abstain_below` (a target precision in (0, 1])
        answers "unknown" under the threshold calibrated for it; `k` neighbours vote
        (None: the bank's choice); `include_neighbors` returns them; with `filter` only
        labelled items passing it vote.
        """
        _check_int("top_n", top_n)
        if k is not None:
            _check_int("k", k)
        if abstain_below is not None and not (
            isinstance(abstain_below, int | float) and 0 < abstain_below <= 1
        ):
            raise InvalidInput(f"abstain_below must be a precision in (0, 1], got {shown(abstain_below)}")
        if mode is not None and not isinstance(mode, str):
            raise InvalidInput(f"mode must be a string, got {type(mode).__name__}")
        options = {"mode": mode, "top_n": top_n, "abstain_below": abstain_below, "k": k,
                   "include_neighbors": bool(include_neighbors),
                   "filter": check_filter(filter)}  # fmt: skip
        return _shaped(as_query(x), lambda q: self._classify(q, options))

    def suggest(
        self, n: int = DEFAULT_LIST_N, *, strategy: str = "margin", label: str | None = None,
        filter: str | None = None,
    ) -> Batch[Suggestion]:
        """The `n` unlabelled items whose label would help most, best first.

        `strategy`: margin, entropy or diverse; `label` keeps items with that label among
        their two most probable (the edge of that class); `filter` keeps items passing it.
        """
        _check_int("n", n)
        return Batch(self._suggest(n, strategy, label, check_filter(filter)))

    def audit(self, n: int = DEFAULT_LIST_N, *, filter: str | None = None) -> Batch[Finding]:
        """The `n` labelled items (passing `filter`) whose label the bank most confidently
        doubts."""
        _check_int("n", n)
        return Batch(self._audit(n, check_filter(filter)))

    def quality(self, n: int = 100, *, precision: float | None = None) -> Quality:
        """One data-quality pass: wrong labels, duplicates, train/test leaks, outliers and
        each held-out split against train, `n` findings listed per kind. `precision` cuts the label list where its estimated
        precision falls under it (default: at the estimated number of wrong labels)."""
        _check_int("n", n)
        if precision is not None and (
            isinstance(precision, bool) or not isinstance(precision, float | int)
            or not 0 < precision <= 1
        ):
            raise InvalidInput(f"precision must be a number in (0, 1], got {precision!r}")
        return self._quality(n, None if precision is None else float(precision))

    def keep(self, kind: str, *keys: str) -> Kept:
        """Remember a finding as looked at and kept, so later passes do not list it again:
        `keep("label", key)`, `keep("duplicate", a, b)` (a leak too), `keep("outlier", key)`."""
        if not isinstance(kind, str) or not all(isinstance(k, str) for k in keys):
            raise InvalidInput("keep takes a kind and keys, all strings")
        return self._keep(kind, list(keys))

    @abc.abstractmethod
    def info(self) -> Info:
        """The bank's spec, counts, labels and live generations."""

    # ------------------------------------------------------------------ writes

    def upsert(
        self,
        x: Any,
        *,
        keys: Sequence[str] | None = None,
        labels: str | Sequence[str | None] | None = None,
        splits: str | Sequence[str] | None = None,
        metadata: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None,
    ) -> Written:
        """Add or replace items (images or vectors), searchable when the call returns (once
        the bank has an index: a server builds the first one itself, in process call
        `build_index`).

        `keys` default to the files' paths relative to the folder given (or their names);
        arrays and bytes need them. `labels` default to the class subfolders of a folder;
        one string labels every item. `splits`: train, val, test or none. `metadata`: a map of
        string, number and boolean values for every item, or one map (or None) per item.
        """
        q = as_query(x)
        if q.kind == KEYS:
            raise InvalidInput("upsert takes images or vectors; stored keys are already stored")
        names = _keys_for(q, keys)
        if labels is None and any(q.folder_labels):
            labels = q.folder_labels
        metas = [metadata] * len(names) if isinstance(metadata, Mapping) else metadata
        return self._upsert(
            q, names, _per_item("labels", labels, len(names)), _per_item("splits", splits, len(names)),
            _per_item("metadata", metas, len(names)),
        )

    def set_labels(self, labels: Mapping[str, str | None]) -> Written:
        """Set (or, with None, clear) the labels of stored items: {key: label}."""
        if not isinstance(labels, Mapping) or not labels:
            raise InvalidInput("set_labels takes a non-empty mapping {key: label or None}")
        for k, v in labels.items():
            if not isinstance(k, str) or not (v is None or isinstance(v, str)):
                raise InvalidInput(f"set_labels: {shown(k)} -> {shown(v)} is not key -> label")
        return self._set_labels(dict(labels))

    def delete(self, keys: str | Keys | Iterable[str], *, ignore_missing: bool = False) -> Written:
        """Remove stored items; an unknown key is NotFound (nothing deleted) unless `ignore_missing`."""
        if isinstance(keys, str):
            names = [keys]
        elif isinstance(keys, Keys):
            names = list(keys.values)
        else:
            names = list(keys)
        if not names or not all(isinstance(k, str) and k for k in names):
            raise InvalidInput("delete takes one or more non-empty keys")
        return self._delete(names, ignore_missing)

    @abc.abstractmethod
    def build_index(self, **params: Any) -> Published:
        """Build and publish a new index generation over every stored item.

        `params` (factory, metric, transform, target_recall, memory_budget, k,
        allow_below_target, ondisk) change only what they name; the rest stays as the live index
        was built. On a server this is RebuildIndex: reads and writes go on meanwhile.
        """

    @abc.abstractmethod
    def train_head(self, **params: Any) -> Published:
        """Train and publish a head on the labelled items (hybrid and stacked modes use it)."""

    # ------------------------------------------------------------------ lifecycle

    @abc.abstractmethod
    def close(self) -> None:
        """Release the bank (its store, or the connection)."""

    def __enter__(self) -> FeatureBank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ primitives

    @abc.abstractmethod
    def _embed(self, q: Query) -> np.ndarray: ...

    @abc.abstractmethod
    def _search(
        self, q: Query, k: int, labels: list[str] | None, options: dict[str, Any]
    ) -> list[Hits]: ...

    @abc.abstractmethod
    def _recommend(self, pos: Query, neg: Query | None, options: dict[str, Any]) -> Hits: ...

    @abc.abstractmethod
    def _scroll(self, filter_text: str, limit: int, token: str, vectors: bool) -> Page: ...

    @abc.abstractmethod
    def _count(self, filter_text: str) -> int: ...

    @abc.abstractmethod
    def _set_metadata(self, metadata: dict[str, dict[str, Any]], replace: bool) -> Written: ...

    @abc.abstractmethod
    def _classify(self, q: Query, options: dict[str, Any]) -> list[Classification]: ...

    @abc.abstractmethod
    def _suggest(
        self, n: int, strategy: str, label: str | None, filter: str
    ) -> list[Suggestion]: ...

    @abc.abstractmethod
    def _audit(self, n: int, filter: str) -> list[Finding]: ...

    @abc.abstractmethod
    def _quality(self, n: int, precision: float | None) -> Quality: ...

    @abc.abstractmethod
    def _keep(self, kind: str, keys: list[str]) -> Kept: ...

    @abc.abstractmethod
    def _upsert(
        self, q: Query, keys: list[str], labels: list[str | None] | None, splits: list[str] | None,
        metadata: list[Mapping[str, Any] | None] | None,
    ) -> Written: ...

    @abc.abstractmethod
    def _set_labels(self, labels: dict[str, str | None]) -> Written: ...

    @abc.abstractmethod
    def _delete(self, keys: list[str], ignore_missing: bool) -> Written: ...


def check_options(given: Mapping[str, Any], allowed: Iterable[str], what: str) -> None:
    """Options passed on by name (to a server's config, a client) that it does not have."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise InvalidInput(f"unknown {what} option(s): {', '.join(unknown)}")


def check_filter(text: str | None) -> str:
    """A filter string, parsed once here so a bad one fails the same in process and remotely."""
    if text is None:
        return ""
    from featurebank.index.filters import parse

    parse(text)
    return text


def _threshold(value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise InvalidInput(f"score_threshold must be a finite number, got {shown(value)}")
    return float(value)


def _groups(group_by: str | None, group_size: int | None) -> dict[str, Any]:
    from featurebank.server.queries import check_group

    if group_size is not None:
        _check_int("group_size", group_size)
    field, size = check_group(group_by or "", group_size or 0)
    return {"group_by": field, "group_size": size}


def _shaped(q: Query, answer: Any) -> Any:
    out = answer(q)
    return Batch(out) if q.batched else out[0]


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InvalidInput(f"{name} must be a positive integer, got {shown(value)}")


def _labels_filter(labels: Sequence[str] | None) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, str):
        return [labels]
    out = list(labels)
    if not out or not all(isinstance(v, str) and v for v in out):
        raise InvalidInput(f"labels must be one or more non-empty strings, got {shown(labels)}")
    return out


def _keys_for(q: Query, keys: Sequence[str] | None) -> list[str]:
    if keys is None:
        if q.kind != "images" or any(n is None for n in q.names):
            raise InvalidInput(
                "upsert needs keys=[...]: arrays, vectors and bytes carry no file name to key them by"
            )
        return [str(n) for n in q.names]
    names = [keys] if isinstance(keys, str) else list(keys)
    if len(names) != len(q):
        raise InvalidInput(f"upsert got {len(names)} keys for {len(q)} items")
    return names


def _per_item(name: str, values: Any, n: int) -> Any:
    if values is None:
        return None
    if isinstance(values, str):
        return [values] * n
    out = list(values)
    if len(out) != n:
        raise InvalidInput(f"upsert got {len(out)} {name} for {n} items")
    return out
