"""Group commit of Upserts with back-pressure, on one writer thread.

Why: a store commit (one LMDB transaction, one fsync) costs about the same for 1
item as for 1,000, so Upserts that arrive while the writer is busy are committed
together in one transaction; then the live searcher catches up once (the new
items become searchable from its in-memory segment, no index file is written).
The writer is one thread, so Upserts, SetLabels and Deletes stay ordered.

Back-pressure: at most `max_queued_rows` items wait for the writer; beyond that a
call fails at once with Overloaded (RESOURCE_EXHAUSTED) and a retry hint from the
measured commit rate, instead of waiting minutes in a queue.

Deadline contract of Upsert: a call whose deadline has passed (or that was
cancelled) when its commit starts is not committed (DEADLINE_EXCEEDED or
CANCELLED, nothing stored); once the commit has
started it completes and stands, even if the deadline passes meanwhile (the client
then sees DEADLINE_EXCEEDED for a stored item, and a retry is harmless because
Upsert replaces by key).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featurebank.core.errors import DeadlineExceeded, Overloaded

log = logging.getLogger(__name__)

MAX_GROUP_ROWS = 50_000  # rows per group commit (bounds one transaction's size)


@dataclass(frozen=True)
class UpsertRow:
    key: str
    vector: np.ndarray
    label: str | None
    split: str
    meta: dict[str, Any]
    thumbnail: bytes | None = None  # a small JPEG to keep, when the caller asked for one


@dataclass
class _Request:
    rows: list[UpsertRow]
    deadline: float | None  # time.monotonic() by which the commit must start
    future: Future[dict[str, int]] = field(default_factory=Future)


class GroupWriter:
    """Queues Upserts and commits them in groups on the writer executor.

    `commit(rows)` stores the rows in one transaction and returns (keys replaced,
    store generation); `after()` runs once per group (the searcher's
    catch-up) and returns the index generation to report.
    """

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        commit: Callable[[list[UpsertRow]], tuple[set[str], int]],
        after: Callable[[], int],
        max_queued_rows: int = 100_000,
    ) -> None:
        self._executor = executor
        self._commit = commit
        self._after = after
        self.max_queued_rows = max_queued_rows
        self._lock = threading.Lock()
        self._queue: list[_Request] = []
        self._queued_rows = 0
        self._draining = False
        self._rate = 20_000.0  # rows/s, refined by every commit
        self.groups = 0
        self.commits = 0

    def submit(self, rows: list[UpsertRow], deadline: float | None) -> Future[dict[str, int]]:
        """Queue one Upsert; Overloaded at once when the queue is full."""
        req = _Request(rows, deadline)
        with self._lock:
            if self._queue and self._queued_rows + len(rows) > self.max_queued_rows:
                wait_ms = int(1000 * self._queued_rows / max(self._rate, 1.0))
                hint = min(max(wait_ms, 50), 30_000)
                raise Overloaded(
                    f"the writer is saturated ({self._queued_rows} items from "
                    f"{len(self._queue)} calls waiting, limit {self.max_queued_rows}): "
                    f"retry after about {hint} ms",
                    retry_after_ms=hint,
                )
            self._queue.append(req)
            self._queued_rows += len(rows)
            start = not self._draining
            self._draining = True
        if start:
            self._executor.submit(self._drain)
        return req.future

    def _take(self) -> list[_Request]:
        """The next group: queued calls up to MAX_GROUP_ROWS rows, none repeating a key."""
        with self._lock:
            group: list[_Request] = []
            keys: set[str] = set()
            rows = 0
            while self._queue:
                req = self._queue[0]
                mine = {r.key for r in req.rows}
                if group and (rows + len(req.rows) > MAX_GROUP_ROWS or mine & keys):
                    break
                self._queue.pop(0)
                self._queued_rows -= len(req.rows)
                group.append(req)
                keys |= mine
                rows += len(req.rows)
            if not group:
                self._draining = False
            return group

    def _drain(self) -> None:
        """Commit queued calls group by group; a group is acknowledged once searchable."""
        while group := self._take():
            try:
                done = self._commit_group(group)
                index_generation = self._after() if done else 0
            except BaseException as e:  # noqa: BLE001 - never leave a caller waiting
                log.exception("a group commit or the catch-up after it failed")
                for req in group:
                    if not req.future.done():
                        req.future.set_exception(e)
                continue
            for req, result in done:
                req.future.set_result({**result, "index_generation": index_generation})

    def _commit_group(self, group: list[_Request]) -> list[tuple[_Request, dict[str, int]]]:
        now = time.monotonic()
        live: list[_Request] = []
        for req in group:
            if not req.future.set_running_or_notify_cancel():
                continue  # the caller went away before its commit started: not committed
            if req.deadline is not None and now >= req.deadline:
                req.future.set_exception(DeadlineExceeded(
                    f"the deadline passed before the commit of {len(req.rows)} items "
                    "started: nothing was stored"
                ))
            else:
                live.append(req)
        if not live:
            return []
        try:
            return self._commit_requests(live)
        except Exception as e:  # noqa: BLE001 - delivered to the callers
            if len(live) == 1:
                live[0].future.set_exception(e)
                return []
        out: list[tuple[_Request, dict[str, int]]] = []
        for req in live:  # one call's bad input must fail only that call
            out.extend(raise_into(req, self._commit_requests))
        return out

    def _commit_requests(self, reqs: list[_Request]) -> list[tuple[_Request, dict[str, int]]]:
        rows = [r for req in reqs for r in req.rows]
        started = time.perf_counter()
        replaced, generation = self._commit(rows)
        secs = time.perf_counter() - started
        self._rate = 0.8 * self._rate + 0.2 * (len(rows) / max(secs, 1e-4))
        self.groups += 1
        self.commits += len(reqs)
        out = []
        for req in reqs:
            n_replaced = sum(1 for r in req.rows if r.key in replaced)
            out.append((req, {
                "added": len(req.rows) - n_replaced,
                "replaced": n_replaced,
                "store_generation": generation,
            }))
        return out


def raise_into(
    req: _Request, commit: Callable[[list[_Request]], list[tuple[_Request, dict[str, int]]]]
) -> list[tuple[_Request, dict[str, int]]]:
    """Commit one call alone; its error (if any) goes to its caller only."""
    try:
        return commit([req])
    except BaseException as e:  # noqa: BLE001 - delivered to the caller
        req.future.set_exception(e)
        return []
