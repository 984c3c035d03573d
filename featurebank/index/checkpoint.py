"""Checkpoints: fold the searcher's mutable segment into a new published generation.

Why in the background: the store's commit is already the durable record, and
the segment makes a write searchable at once (index/segment.py), so writing an
index file is only needed to keep the segment small (exact search over it costs
per query) and restarts quick. A checkpoint runs when the segment holds
`max_items` items or `max_bytes` bytes, when its oldest item is `max_seconds`
old, or when that many deleted items are still in the generation; one thread
polls the policy and runs one fold at a time, never holding up a write.

A fold that fails (e.g. RecallBelowTarget) is logged and kept as `last_error`;
the next attempt waits for `max_seconds` or for the segment to double, so a
refused fold is not retried in a loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from featurebank.core.errors import FeaturebankError, InvalidInput

if TYPE_CHECKING:
    from featurebank.index.searcher import Searcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointPolicy:
    """When a segment is folded: the first limit reached (0 turns a limit off)."""

    max_items: int = 20_000
    max_bytes: int = 64 << 20
    max_seconds: float = 300.0
    poll_seconds: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_items", "max_bytes", "max_seconds"):
            if getattr(self, name) < 0:
                raise InvalidInput(f"checkpoint {name} must be >= 0, got {getattr(self, name)}")
        if self.poll_seconds <= 0:
            raise InvalidInput(f"checkpoint poll_seconds must be > 0, got {self.poll_seconds}")

    def due(self, searcher: Searcher, now: float | None = None) -> str | None:
        """Why the searcher's segment should be folded now (None: not yet)."""
        seg = searcher.segment
        pending = seg.size + searcher.stale_count
        if pending == 0:
            return None
        if self.max_items and pending >= self.max_items:
            return f"{pending} items pending >= {self.max_items}"
        if self.max_bytes and seg.nbytes >= self.max_bytes:
            return f"segment of {seg.nbytes} bytes >= {self.max_bytes}"
        age = (now or time.time()) - seg.since if seg.since else 0.0
        if self.max_seconds and seg.size and age >= self.max_seconds:
            return f"oldest pending item {age:.0f}s old >= {self.max_seconds:.0f}s"
        return None


class Checkpointer:
    """A thread that folds the live searcher's segment when the policy says so.

    `searcher()` gives the live searcher (None before the first index); `fold()`
    folds and publishes (the caller holds its own one-publisher lock inside) and
    returns the new manifest.
    """

    def __init__(
        self,
        policy: CheckpointPolicy,
        searcher: Callable[[], Searcher | None],
        fold: Callable[[str], dict[str, Any]],
    ) -> None:
        self.policy = policy
        self._searcher = searcher
        self._fold = fold
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.last_result: dict[str, Any] | None = None
        self.folds = 0
        self._failed: tuple[float, int] | None = None  # (when, pending then)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fb-checkpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.policy.poll_seconds):
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - logged; the thread must keep checkpointing
                log.exception("checkpoint failed")

    def run_once(self, force: bool = False) -> dict[str, Any] | None:
        """Fold now if due (or `force` and anything is pending); the new manifest or None."""
        searcher = self._searcher()
        if searcher is None:
            return None
        why = self.policy.due(searcher)
        pending = searcher.segment.size + searcher.stale_count
        if force and why is None and pending:
            why = "requested"
        if why is None or (not force and self._backing_off(pending)):
            return None
        log.info("checkpoint: %s", why)
        try:
            result = self._fold(why)
        except FeaturebankError as e:
            self.last_error = str(e)
            self._failed = (time.time(), pending)
            log.error("checkpoint not published: %s", e)
            return None
        self.last_error, self._failed = None, None
        self.last_result = result
        self.folds += 1
        return result

    def _backing_off(self, pending: int) -> bool:
        if self._failed is None:
            return False
        when, then = self._failed
        waited = time.time() - when
        return waited < max(self.policy.max_seconds, self.policy.poll_seconds) and pending < 2 * then
