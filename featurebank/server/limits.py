"""How many bytes of Upsert streams the server holds before committing them.

An Upsert stream is committed all at once (one store transaction: the client sees all
of its items stored or none), so the server holds the whole stream until it ends.
These bounds keep one caller from taking the server's memory that way: each stream may
hold at most `per_stream` bytes and all streams together at most `total`. Past either
bound the call fails with RESOURCE_EXHAUSTED and a message saying which bound and what
to do; nothing of that stream is committed.

Everything here runs on the server's event loop, so plain integers need no lock.
"""

from __future__ import annotations

from featurebank.core.errors import FeaturebankError, InvalidInput
from featurebank.server.bounds import DEFAULT_STREAM_BYTES, DEFAULT_TOTAL_BYTES, MiB


class TooMany(FeaturebankError):
    """A call asks the server to hold more than its bounds allow at once."""

    grpc_code = "RESOURCE_EXHAUSTED"


def _mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n} bytes"


class UpsertBudget:
    """Bytes held by the Upsert streams in flight, bounded per stream and in all."""

    def __init__(self, per_stream: int = DEFAULT_STREAM_BYTES, total: int = DEFAULT_TOTAL_BYTES) -> None:
        if per_stream < 1 or total < 1:
            raise InvalidInput(f"Upsert byte bounds must be positive, got {per_stream} and {total}")
        if per_stream > total:
            raise InvalidInput(
                f"the per-stream Upsert bound ({_mib(per_stream)}) exceeds the server-wide "
                f"one ({_mib(total)})"
            )
        self.per_stream = per_stream
        self.total = total
        self.held = 0

    def stream(self) -> StreamBytes:
        return StreamBytes(self)


class StreamBytes:
    """One stream's share of the budget; `release` (or leaving the `with`) gives it back."""

    def __init__(self, budget: UpsertBudget) -> None:
        self.budget = budget
        self.held = 0

    def add(self, n: int, item: int) -> None:
        """Account for `n` more bytes received as item number `item`."""
        b = self.budget
        if self.held + n > b.per_stream:
            raise TooMany(
                f"Upsert stream exceeds {_mib(b.per_stream)} at item {item}: a stream is "
                "committed all at once, so send smaller streams (split the items over "
                "several calls)"
            )
        if b.held + n > b.total:
            raise TooMany(
                f"the server holds {_mib(b.held)} of Upsert streams in flight (limit "
                f"{_mib(b.total)}): retry shortly, or send smaller streams"
            )
        self.held += n
        b.held += n

    def release(self) -> None:
        self.budget.held -= self.held
        self.held = 0

    def __enter__(self) -> StreamBytes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
