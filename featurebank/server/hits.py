"""Which of a search's neighbours a Search returns: at or above its threshold, at most
group_size per group, at most k, and how many neighbours to fetch for that."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

MAX_CANDIDATES = 8192  # most neighbours fetched to fill groups or to drop examples


class HitLike(Protocol):
    @property
    def label(self) -> str | None: ...
    @property
    def meta(self) -> dict[str, Any] | None: ...


class Wanted(Protocol):
    @property
    def k(self) -> int: ...
    @property
    def score_threshold(self) -> float | None: ...
    @property
    def group_by(self) -> str | None: ...
    @property
    def group_size(self) -> int: ...


def group_value(hit: HitLike, field: str) -> Any:
    if field == "label":
        return hit.label
    return (hit.meta or {}).get(field[5:])


def select_hits(hits: Sequence[Any], job: Wanted) -> list[Any]:
    """Hits at or above the threshold, at most group_size per group, at most k in all."""
    out: list[Any] = []
    per_group: dict[Any, int] = {}
    for h in hits:
        if job.score_threshold is not None and not h.score >= job.score_threshold:
            break  # hits come best first
        if job.group_by is not None:
            g = group_value(h, job.group_by)
            if g is None:
                continue  # an item without the field belongs to no group
            g = (type(g).__name__, g)
            if per_group.get(g, 0) >= job.group_size:
                continue
            per_group[g] = per_group.get(g, 0) + 1
        out.append(h)
        if len(out) == job.k:
            break
    return out


def candidates_for(job: Wanted, available: int) -> int:
    """Neighbours to fetch first: k, or more when groups may drop some."""
    want = job.k if job.group_by is None else job.k * job.group_size * 4
    return max(1, min(want, available, MAX_CANDIDATES))
