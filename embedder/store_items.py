"""What store reads return: `Items`, `Changes`, and lazily decoded metadata."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np


class LazyMeta(Sequence[dict[str, Any]]):
    """Item metadata decoded on first use: a full scan should not pay for JSON nobody reads."""

    def __init__(self, n: int, parts: list[tuple[bytes, np.ndarray, np.ndarray]]) -> None:
        self._n = n
        self._parts = parts  # (JSON list of a block, rows picked, output positions)
        self._decoded: list[dict[str, Any]] | None = None

    def _all(self) -> list[dict[str, Any]]:
        if self._decoded is None:
            out: list[dict[str, Any]] = [{}] * self._n
            for raw, rows, positions in self._parts:
                values = json.loads(raw)
                for r, p in zip(rows.tolist(), positions.tolist(), strict=True):
                    out[p] = values[r]
            self._decoded, self._parts = out, []
        return self._decoded

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, i: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, i: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        return self._all()[i]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._all())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, LazyMeta)):
            return self._all() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"LazyMeta({self._all()!r})"


@dataclass
class Items:
    """A batch of stored items, in the order asked for (or id order for scans)."""

    ids: np.ndarray
    keys: list[str]
    vectors: np.ndarray
    labels: list[str | None]
    splits: list[str]
    meta: Sequence[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


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
