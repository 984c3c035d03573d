"""Bearer-token auth with two roles, as a grpc.aio server interceptor.

Tokens come from a file of `ROLE TOKEN` lines or the environment
(FEATUREBANK_READ_TOKEN / FEATUREBANK_WRITE_TOKEN). A write token may also read.
Tokens are compared in constant time and never logged. Health and reflection
stay open so load balancers and tooling can probe without credentials.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from grpc import aio

from featurebank.core.errors import InvalidInput
from featurebank.core.files import read_named_text

READ = "read"
WRITE = "write"
ROLES = (READ, WRITE)

SERVICE = "/featurebank.v1.FeatureBank/"
READ_METHODS = frozenset({
    "Classify", "ClassifyBatch", "Search", "Embed", "GetInfo", "Suggest", "Audit", "GetThumbnails",
    "GetReport", "SearchBatch", "Recommend", "Scroll", "Count",
})
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class Tokens:
    """Role -> set of tokens; `role_of` answers which role a presented token grants."""

    def __init__(self, tokens: Mapping[str, list[str]] | None = None) -> None:
        self._tokens: dict[str, list[bytes]] = {r: [] for r in ROLES}
        for role, values in (tokens or {}).items():
            for value in values:
                self.add(role, value)

    def add(self, role: str, token: str) -> None:
        if role not in ROLES:
            raise InvalidInput(f"unknown token role {role!r}: expected 'read' or 'write'")
        if not token:
            raise InvalidInput(f"empty {role} token")
        self._tokens[role].append(token.encode())

    @property
    def enabled(self) -> bool:
        return any(self._tokens.values())

    def role_of(self, token: str) -> str | None:
        """`write`, `read` or None; checks every token so timing does not reveal which matched."""
        presented = token.encode()
        found: str | None = None
        for role in (READ, WRITE):
            for known in self._tokens[role]:
                if hmac.compare_digest(presented, known):
                    found = role
        return found

    def __repr__(self) -> str:  # never show the secrets themselves
        return f"Tokens(read={len(self._tokens[READ])}, write={len(self._tokens[WRITE])})"

    def describe(self) -> str:
        """How many tokens of each role, never the tokens: `1 read, 2 write`."""
        return f"{len(self._tokens[READ])} read, {len(self._tokens[WRITE])} write"

    @classmethod
    def load(
        cls, path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> Tokens:
        """Tokens from `path` (if given) plus the environment variables."""
        tokens = cls()
        if path is not None:
            text = read_named_text("tokens file", path)
            for lineno, raw in enumerate(text.splitlines(), 1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise InvalidInput(
                        f"{path}:{lineno}: expected 'ROLE TOKEN' (role read or write)"
                    )
                role = parts[0].lower()
                if role not in ROLES:
                    raise InvalidInput(
                        f"{path}:{lineno}: unknown role {parts[0]!r}: expected read or write"
                    )
                tokens.add(role, parts[1])
            if not tokens.enabled:
                raise InvalidInput(
                    f"tokens file {path} has no tokens: add 'read TOKEN' or 'write TOKEN' "
                    "lines (an empty file would turn authentication off)"
                )
        env = os.environ if environ is None else environ
        for role, var in ((READ, "FEATUREBANK_READ_TOKEN"), (WRITE, "FEATUREBANK_WRITE_TOKEN")):
            if env.get(var):
                tokens.add(role, env[var])
        return tokens


def required_role(method: str) -> str | None:
    """The role a full method name needs; None for open services (health, reflection)."""
    if method.startswith(OPEN_PREFIXES):
        return None
    if method.startswith(SERVICE) and method[len(SERVICE) :] in READ_METHODS:
        return READ
    return WRITE  # anything unlisted needs the stronger role


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def aborting_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str
) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape that only aborts."""

    async def unary(request: Any, context: aio.ServicerContext) -> Any:
        await context.abort(code, details)

    async def streaming(request: Any, context: aio.ServicerContext) -> Any:
        await context.abort(code, details)
        yield  # pragma: no cover - makes this an async generator

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


OnDenied = Callable[[str, grpc.StatusCode], None]


class AuthInterceptor(aio.ServerInterceptor):
    """Rejects calls without a token of the role their method needs."""

    def __init__(self, tokens: Tokens, on_denied: OnDenied | None = None) -> None:
        self.tokens = tokens
        self.on_denied = on_denied

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        need = required_role(method)
        if handler is None or need is None or not self.tokens.enabled:
            return handler
        token = _bearer(handler_call_details.invocation_metadata)
        if token is None:
            return self._denied(
                handler, method, grpc.StatusCode.UNAUTHENTICATED,
                "missing bearer token: send metadata 'authorization: Bearer <token>'",
            )
        role = self.tokens.role_of(token)
        if role is None:
            return self._denied(
                handler, method, grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"
            )
        if need == WRITE and role != WRITE:
            name = method.rsplit("/", 1)[-1]
            return self._denied(
                handler, method, grpc.StatusCode.PERMISSION_DENIED,
                f"{name} needs a write token; this token only grants read",
            )
        return handler

    def _denied(
        self, handler: grpc.RpcMethodHandler, method: str, code: grpc.StatusCode, details: str
    ) -> grpc.RpcMethodHandler:
        if self.on_denied is not None:
            self.on_denied(method, code)
        return aborting_handler(handler, code, details)
