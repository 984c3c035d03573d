"""Checks at the edge: every request field a caller can get wrong, named in its error.

The servicer hands each request here first; what comes back is plain values the
engine's parts take (a oneof already told apart, unset fields already defaulted).
The bounds and defaults quoted are `server.bounds`'.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from featurebank.classify.abstain import check_precision
from featurebank.core.errors import InvalidInput, shown
from featurebank.core.vocabulary import MODES, SPLITS, SUGGEST_STRATEGIES
from featurebank.index.filters import Node
from featurebank.server.bounds import (
    DEFAULT_RANKED,
    DEFAULT_TOP_N,
    MAX_K,
    MAX_KEY_BYTES,
    MAX_LABEL_FILTER,
    MAX_OPERATION_ID,
    MAX_RANKED,
    MAX_TOP_N,
)
from featurebank.server.group_commit import UpsertRow
from featurebank.server.indexing import RebuildParams
from featurebank.server.queries import struct_meta
from featurebank.server.reads import ClassifyOptions
from featurebank.server.wire import MODE_NAMES, STRATEGY_NAMES
from featurebank.store.codec import MAX_LABEL_BYTES
from featurebank.v1 import featurebank_pb2 as pb

# ---- fields -----------------------------------------------------------------------------------


def check_vector(values: Sequence[float], dim: int, where: str = "vector") -> np.ndarray:
    """A float32 vector of the bank's dimension with only finite values."""
    if len(values) == 0:
        raise InvalidInput(f"{where} is empty")
    if len(values) != dim:
        raise InvalidInput(f"{where} has {len(values)} values; the bank's vectors have dim {dim}")
    v = np.asarray(values, dtype=np.float32)
    if not np.isfinite(v).all():
        bad = int(np.flatnonzero(~np.isfinite(v))[0])
        raise InvalidInput(f"{where} has NaN or infinity at position {bad}")
    return v


def check_k(k: int, default: int | None, where: str = "k") -> int | None:
    if k == 0:
        return default
    if not 1 <= k <= MAX_K:
        raise InvalidInput(f"{where}={k} is out of range: use 1..{MAX_K} (0 = default)")
    return k


def check_top_n(top_n: int) -> int:
    if top_n == 0:
        return DEFAULT_TOP_N
    if top_n > MAX_TOP_N:
        raise InvalidInput(f"top_n={top_n} is out of range: use 1..{MAX_TOP_N} (0 = {DEFAULT_TOP_N})")
    return top_n


def check_count(n: int, where: str) -> int:
    """How many items a ranking returns: 0 means DEFAULT_RANKED."""
    if n == 0:
        return DEFAULT_RANKED
    if n > MAX_RANKED:
        raise InvalidInput(f"{where}={n} is out of range: use 1..{MAX_RANKED} (0 = {DEFAULT_RANKED})")
    return n


def check_mode(mode: int) -> str | None:
    if mode == pb.MODE_UNSPECIFIED:
        return None
    try:
        return MODE_NAMES[mode]
    except KeyError:
        known = ", ".join(m.upper() for m in MODES)
        raise InvalidInput(f"unknown mode {mode}: use {known}") from None


def check_strategy(strategy: int) -> str:
    """A Suggest strategy's name (STRATEGY_UNSPECIFIED: the default)."""
    name = STRATEGY_NAMES.get(strategy)
    if name is None:
        known = ", ".join(s.upper() for s in SUGGEST_STRATEGIES)
        raise InvalidInput(f"unknown strategy {strategy}: use one of {known}")
    return name


def check_key(key: str, where: str = "key") -> str:
    if not key:
        raise InvalidInput(f"{where} is empty")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidInput(f"{where} is longer than {MAX_KEY_BYTES} bytes")
    return key


def check_keys(keys: Sequence[str], method: str) -> list[str]:
    """The keys of a call that needs at least one."""
    if not keys:
        raise InvalidInput(f"{method} got no keys")
    return [check_key(k, f"keys[{i}]") for i, k in enumerate(keys)]


def check_split(split: str, where: str) -> str:
    split = split or "none"
    if split not in SPLITS:
        raise InvalidInput(f"{where}: split {shown(split)} is not one of {', '.join(SPLITS)}")
    return split


def check_label_filter(labels: Sequence[str]) -> tuple[str, ...]:
    """A Search label filter: at most MAX_LABEL_FILTER labels, each a label the store could hold."""
    if len(labels) > MAX_LABEL_FILTER:
        raise InvalidInput(f"labels filter has {len(labels)} labels; at most {MAX_LABEL_FILTER}")
    for i, label in enumerate(labels):
        if not label:
            raise InvalidInput(f"labels filter: label {i} is empty")
        if len(label.encode()) > MAX_LABEL_BYTES:
            raise InvalidInput(
                f"labels filter: label {i} ({shown(label)}) is longer than {MAX_LABEL_BYTES} bytes"
            )
    return tuple(labels)


def check_many(items: Sequence[Any], method: str, what: str, most: int) -> None:
    """A repeated request field holds at least one and at most `most` entries."""
    if not items:
        raise InvalidInput(f"{method} got no {what}")
    if len(items) > most:
        raise InvalidInput(f"{method} got {len(items)} {what}; at most {most}")


def check_operation_id(op_id: str) -> str:
    if not op_id:
        raise InvalidInput("operation id is empty")
    if len(op_id) > MAX_OPERATION_ID:
        raise InvalidInput(f"operation id {shown(op_id)} is longer than {MAX_OPERATION_ID} characters")
    return op_id


# ---- requests ---------------------------------------------------------------------------------


def check_classify(
    mode: int, k: int, top_n: int, include_neighbors: bool, abstain_below: float,
    where: Node | None = None,
) -> ClassifyOptions:
    """The options of a Classify or ClassifyBatch request (0 fields: the defaults);
    `where` is its parsed filter."""
    return ClassifyOptions(
        mode=check_mode(mode),
        k=check_k(k, None),
        top_n=check_top_n(top_n),
        include_neighbors=include_neighbors,
        abstain_below=check_precision(abstain_below) if abstain_below else None,
        where=where,
    )


@dataclass(frozen=True)
class Inputs:
    """A request's inputs told apart by kind, each with its position in the request."""

    count: int
    vectors: list[tuple[int, np.ndarray]]  # already checked
    images: list[tuple[int, bytes]]
    keys: list[tuple[int, str]]

    def where(self, i: int) -> str:
        """The request field of input `i`, for errors."""
        return f"inputs[{i}]" if self.count > 1 else "input"


def check_inputs(inputs: Sequence[pb.Input], dim: int) -> Inputs:
    """Each Input's oneof (image, vector or key), checked."""
    out = Inputs(len(inputs), [], [], [])
    for i, inp in enumerate(inputs):
        where = out.where(i)
        kind = inp.WhichOneof("input")
        if kind is None:
            raise InvalidInput(f"{where} is empty: set image, vector or key")
        if kind == "image":
            if not inp.image:
                raise InvalidInput(f"{where}.image is empty")
            out.images.append((i, inp.image))
        elif kind == "vector":
            out.vectors.append((i, check_vector(inp.vector.values, dim, f"{where}.vector")))
        else:
            out.keys.append((i, check_key(inp.key, f"{where}.key")))
    return out


@dataclass(frozen=True)
class UpsertImage:
    """An Upsert item that sends an image: stored once the image is embedded."""

    position: int
    key: str
    split: str
    item: pb.UpsertItem

    @property
    def where(self) -> str:
        return f"item {self.position} (key {shown(self.key)}) image"


def check_upsert_item(
    item: pb.UpsertItem, i: int, dim: int, seen: dict[str, int]
) -> UpsertRow | UpsertImage:
    """Item `i` of an Upsert stream: a row to store, or an image to embed first.

    `seen` maps the stream's keys so far to their item numbers (a key may not repeat).
    """
    key = check_key(item.key, f"item {i} key")
    where = f"item {i} (key {shown(key)})"
    if key in seen:
        raise InvalidInput(f"{where}: key repeats item {seen[key]}")
    seen[key] = i
    split = check_split(item.split, where)
    kind = item.WhichOneof("data")
    if kind is None:
        raise InvalidInput(f"{where} has neither image nor vector")
    if kind == "vector":
        vec = check_vector(item.vector.values, dim, f"{where} vector")
        meta: dict[str, Any] = {"uri": item.uri} if item.uri else {}
        meta.update(struct_meta(item.metadata, key))
        return UpsertRow(key, vec, item.label or None, split, meta)
    if not item.image:
        raise InvalidInput(f"{where} image is empty")
    return UpsertImage(i, key, split, item)


def check_labels(labels: Sequence[pb.LabelAssignment]) -> dict[str, str | None]:
    """A SetLabels request as key -> label (None clears it); each key once."""
    if not labels:
        raise InvalidInput("SetLabels got no labels")
    mapping: dict[str, str | None] = {}
    for i, a in enumerate(labels):
        key = check_key(a.key, f"labels[{i}].key")
        if key in mapping:
            raise InvalidInput(f"labels[{i}]: key {shown(key)} appears twice")
        mapping[key] = a.label or None
    return mapping


def check_splits(splits: Sequence[pb.SplitAssignment]) -> dict[str, str]:
    """A SetSplits request as key -> split (empty = none); each key once."""
    if not splits:
        raise InvalidInput("SetSplits got no splits")
    mapping: dict[str, str] = {}
    for i, a in enumerate(splits):
        key = check_key(a.key, f"splits[{i}].key")
        if key in mapping:
            raise InvalidInput(f"splits[{i}]: key {shown(key)} appears twice")
        mapping[key] = check_split(a.split, f"splits[{i}]")
    return mapping


def check_rebuild(request: pb.RebuildIndexRequest) -> RebuildParams:
    """What a RebuildIndex request overrides (unset fields keep the live generation's)."""
    return RebuildParams(
        index={
            "factory": request.factory or None,
            "metric": request.metric or None,
            "transform": request.transform or None,
            "memory_budget": request.memory_budget or None,
            "target_recall": request.target_recall or None,
            "k": request.k or None,
            "allow_below_target": True if request.allow_below_target else None,
            "ondisk": request.ondisk if request.HasField("ondisk") else None,
        },
        retrain_head=request.retrain_head,
        head_hidden=request.head_hidden if request.HasField("head_hidden") else None,
        head_epochs=request.head_epochs if request.HasField("head_epochs") else None,
    )


def image_error(e: BaseException, where: str) -> BaseException:
    """Name the request field of a bad image (the embedder only knows its batch position)."""
    if isinstance(e, InvalidInput):
        return InvalidInput(f"{where}: {_IMAGE_POS.sub('', str(e), count=1)}")
    return e


_IMAGE_POS = re.compile(r"^image \d+: ")
