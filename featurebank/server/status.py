"""The one place where featurebank errors become gRPC status codes.

Every handler funnels exceptions through `to_status`, so a client never sees
UNKNOWN: deliberate errors keep their code and message, anything unexpected is
INTERNAL with the exception's text (and a logged traceback on the server).
Messages are cut to MAX_MESSAGE_BYTES: status details travel in a trailer that the
client's metadata limit (8 KiB by default) must hold, and an over-long one turns the
real status into RESOURCE_EXHAUSTED "Stream removed".
"""

from __future__ import annotations

import logging
import os
import re
import threading

import grpc

from featurebank.core.errors import FeaturebankError

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1024  # UTF-8 bytes; percent-encoded, at most 3 KiB on the wire

_CODES: dict[str, grpc.StatusCode] = {
    code.name: code for code in grpc.StatusCode if code is not grpc.StatusCode.UNKNOWN
}


_HIDDEN: dict[str, re.Pattern[str]] = {}  # bank folders a client is never told
_HIDDEN_LOCK = threading.Lock()


def hide_path(folder: str | os.PathLike[str]) -> None:
    """Say "this bank" instead of `folder` in every status message: a client needs the
    bank's name, not where it lies on the server's disk."""
    with _HIDDEN_LOCK:
        for form in {os.fspath(folder), os.path.realpath(folder), os.path.abspath(folder)}:
            if form and form not in ("/", "."):
                _HIDDEN[form] = re.compile(
                    r"(?:(?<![-\w])bank )?" + re.escape(form.rstrip("/")) + r"(/|(?=\W|$))"
                )


def redacted(message: str) -> str:
    """`message` with every hidden bank folder (and what lies under it) named by role."""
    for form, pattern in sorted(_HIDDEN.items(), key=lambda kv: -len(kv[0])):
        if form in message:
            message = message.replace(f"--bank {form.rstrip('/')}", "--bank BANK")  # a command
            message = pattern.sub(lambda m: "this bank's " if m.group(1) else "this bank", message)
    return message


def code_of(name: str) -> grpc.StatusCode:
    """The StatusCode called `name`; unknown names become INTERNAL rather than UNKNOWN."""
    return _CODES.get(name, grpc.StatusCode.INTERNAL)


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Status code and message for an exception raised below the servicer."""
    if isinstance(exc, FeaturebankError):
        return code_of(exc.grpc_code), bounded(redacted(str(exc) or type(exc).__name__))
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "server out of memory"
    log.error("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, bounded(redacted(f"internal error: {type(exc).__name__}: {exc}"))


def bounded(message: str) -> str:
    """`message` cut to MAX_MESSAGE_BYTES of UTF-8, saying how much was left out."""
    data = message.encode("utf-8", "backslashreplace")
    if len(data) <= MAX_MESSAGE_BYTES:
        return message
    head = data[: MAX_MESSAGE_BYTES - 64].decode("utf-8", "ignore")
    return f"{head}... (message cut: {len(data)} bytes in all)"
