"""What store reads return: `Items` (with lazily decoded columns) and `Changes`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


class Lazy:
    """A column computed on first access: scans should not pay for columns nobody reads."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn


def _resolve(obj: Any, name: str) -> Any:
    value = obj.__dict__[name]
    if isinstance(value, Lazy):
        value = obj.__dict__[name] = value.fn()
    return value


class Items:
    """A batch of stored items, in the order asked for (or id order for scans).

    `keys`, `labels`, `splits` and `meta` are plain lists; scans build them on first
    access (creating a few hundred thousand strings costs as much as copying the vectors).
    """

    def __init__(
        self,
        ids: np.ndarray,
        keys: list[str] | Lazy,
        vectors: np.ndarray,
        labels: list[str | None] | Lazy,
        splits: list[str] | Lazy,
        meta: Sequence[dict[str, Any]] | Lazy | None = None,
    ) -> None:
        self.ids = ids
        self.vectors = vectors
        self.__dict__["_keys"] = keys
        self.__dict__["_labels"] = labels
        self.__dict__["_splits"] = splits
        self.__dict__["_meta"] = [] if meta is None else meta

    @property
    def keys(self) -> list[str]:
        out: list[str] = _resolve(self, "_keys")
        return out

    @keys.setter
    def keys(self, value: list[str]) -> None:
        self.__dict__["_keys"] = value

    @property
    def labels(self) -> list[str | None]:
        out: list[str | None] = _resolve(self, "_labels")
        return out

    @labels.setter
    def labels(self, value: list[str | None]) -> None:
        self.__dict__["_labels"] = value

    @property
    def splits(self) -> list[str]:
        out: list[str] = _resolve(self, "_splits")
        return out

    @splits.setter
    def splits(self, value: list[str]) -> None:
        self.__dict__["_splits"] = value

    @property
    def meta(self) -> Sequence[dict[str, Any]]:
        out: Sequence[dict[str, Any]] = _resolve(self, "_meta")
        return out

    @meta.setter
    def meta(self, value: Sequence[dict[str, Any]]) -> None:
        self.__dict__["_meta"] = value

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Items(n={len(self)}, dim={self.vectors.shape[-1] if self.vectors.ndim else 0})"


@dataclass
class Changes:
    """What happened after a generation: enough for an index to catch up without a rebuild.

    `added`: live ids added since; `deleted`: ids that existed then and are gone now;
    `relabelled`: live ids older than the generation whose label or split changed.
    """

    added: np.ndarray
    relabelled: np.ndarray
    deleted: np.ndarray
    generation: int
