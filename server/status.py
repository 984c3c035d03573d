"""The one place where featurebank errors become gRPC status codes.

Every handler funnels exceptions through `to_status`, so a client never sees
UNKNOWN: deliberate errors keep their code and message, anything unexpected is
INTERNAL with the exception's text (and a logged traceback on the server).
"""

from __future__ import annotations

import logging

import grpc

from featurebank.core.errors import FeaturebankError

log = logging.getLogger(__name__)

_CODES: dict[str, grpc.StatusCode] = {
    code.name: code for code in grpc.StatusCode if code is not grpc.StatusCode.UNKNOWN
}


def code_of(name: str) -> grpc.StatusCode:
    """The StatusCode called `name`; unknown names become INTERNAL rather than UNKNOWN."""
    return _CODES.get(name, grpc.StatusCode.INTERNAL)


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Status code and message for an exception raised below the servicer."""
    if isinstance(exc, FeaturebankError):
        return code_of(exc.grpc_code), str(exc) or type(exc).__name__
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "server out of memory"
    log.error("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
