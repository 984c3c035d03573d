"""Checks at the edge: every request field a caller can get wrong, named in its error."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from featurebank.core.errors import InvalidInput, shown
from featurebank.core.vocabulary import MODES, SPLITS
from featurebank.server.engine import (
    DEFAULT_TOP_N,
    MAX_K,
)
from featurebank.server.wire import MODE_NAMES
from featurebank.store.codec import MAX_LABEL_BYTES
from featurebank.v1 import featurebank_pb2 as pb

MAX_TOP_N = 1000
MAX_KEY_BYTES = 1024
DEFAULT_RANKED = 100
MAX_RANKED = 10_000
MAX_LABEL_FILTER = 1024  # labels in one Search filter



def check_vector(values: Sequence[float], dim: int, where: str = "vector") -> np.ndarray:
    """A float32 vector of the bank's dimension with only finite values."""
    if len(values) == 0:
        raise InvalidInput(f"{where} is empty")
    if len(values) != dim:
        raise InvalidInput(f"{where} has {len(values)} values; the bank's vectors have dim {dim}")
    v = np.asarray(values, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
        raise InvalidInput(f"{where} has NaN or infinity at position {int(bad[0])}")
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


def check_key(key: str, where: str = "key") -> str:
    if not key:
        raise InvalidInput(f"{where} is empty")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidInput(f"{where} is longer than {MAX_KEY_BYTES} bytes")
    return key


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
