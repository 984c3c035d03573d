"""One small hierarchy of errors, so every layer fails the same way.

Each class names the gRPC status the server maps it to (in one place,
`server/status.py`); the message always says what was wrong and where.
"""

from __future__ import annotations


class FeaturebankError(Exception):
    """Base of every error featurebank raises on purpose."""

    grpc_code = "INTERNAL"


class InvalidInput(FeaturebankError, ValueError):
    """The caller gave something malformed: wrong dimension, NaN, bad key, bad image."""

    grpc_code = "INVALID_ARGUMENT"


class SpecMismatch(InvalidInput):
    """Vectors or a backbone that do not match the bank's spec."""


class NotFound(FeaturebankError, KeyError):
    """An unknown key, id, bank or generation."""

    grpc_code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class FailedPrecondition(FeaturebankError):
    """The bank is not in a state that allows the call: no index yet, no head, empty bank."""

    grpc_code = "FAILED_PRECONDITION"


class DamagedFile(FailedPrecondition):
    """A file of the bank is damaged or missing: the message names the file and what is wrong.

    Derived files (indexes, heads, thumbnails) are rebuilt by `featurebank store repair`;
    the store itself is salvaged by it into a fresh environment.
    """

    grpc_code = "DATA_LOSS"


class ReadOnlyBank(FailedPrecondition):
    """A write was asked of a bank on a read-only file system (it can still be read)."""


class DeviceUnavailable(FailedPrecondition):
    """The device a job or server was asked to run on is not there (e.g. no GPU visible)."""


class RecallBelowTarget(FailedPrecondition):
    """An index measured below its recall target, which the operator did not allow."""


class Overloaded(FeaturebankError):
    """The bank's writer is saturated; the caller should retry after `retry_after_ms`."""

    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_ms: int = 1000) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class DeadlineExceeded(FeaturebankError):
    """The caller's deadline passed before the work started; nothing was done."""

    grpc_code = "DEADLINE_EXCEEDED"


class WriterBusy(FeaturebankError):
    """Another process holds the bank's single writer lock."""

    grpc_code = "FAILED_PRECONDITION"


class StorageFull(FeaturebankError):
    """The disk or the store's map could not take more data; the last commit is intact."""

    grpc_code = "RESOURCE_EXHAUSTED"


def shown(value: object, limit: int = 64) -> str:
    """`value` as it may appear in a message: repr'd, cut to `limit` characters.

    Messages echo what the caller sent so they can find it; a value is never copied
    whole, since a 100k-character key or label would make the message itself the problem.
    """
    if not isinstance(value, str):
        text = repr(value)
        return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"
