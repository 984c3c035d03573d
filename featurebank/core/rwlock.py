"""A readers-writer lock for threads, shared by the store and the searcher."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class RWLock:
    """Many shared holders or one exclusive holder.

    With `prefer_writers`, a waiting exclusive holder blocks new shared ones, so a steady
    stream of readers cannot starve it (shared sections must then never nest).
    """

    def __init__(self, prefer_writers: bool = False) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._prefer_writers = prefer_writers
        self._readers = 0
        self._exclusive = False
        self._waiting = 0

    def _may_share(self) -> bool:
        return not self._exclusive and not (self._prefer_writers and self._waiting)

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(self._may_share)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    def acquire_exclusive(self) -> None:
        with self._cond:
            self._waiting += 1
            try:
                self._cond.wait_for(lambda: not self._exclusive and self._readers == 0)
            finally:
                self._waiting -= 1
            self._exclusive = True

    def release_exclusive(self) -> None:
        with self._cond:
            self._exclusive = False
            self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        self.acquire_exclusive()
        try:
            yield
        finally:
            self.release_exclusive()
