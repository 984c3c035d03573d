"""Bearer-token auth with three roles, as a grpc.aio server interceptor.

Tokens come from a file of `ROLE TOKEN [BANKS]` lines or the environment
(FEATUREBANK_READ_TOKEN / FEATUREBANK_WRITE_TOKEN / FEATUREBANK_REPLICATE_TOKEN). A write
token may also read and replicate; a replicate token (what a replica on another host
presents to its primary) may only call the replication RPCs.
BANKS (`bank1,bank2`, or `*`, the default) limits the banks a token reaches on a server of
many banks; the router (server/router.py) checks it, since only the request names its bank.
Tokens are compared in constant time and never logged. Health and reflection
stay open so load balancers and tooling can probe without credentials.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from featurebank.core.errors import FeaturebankError, InvalidInput
from featurebank.core.files import read_named_text

READ = "read"
WRITE = "write"
REPLICATE = "replicate"
ROLES = (READ, WRITE, REPLICATE)
GRANTED_BY = {READ: (READ, WRITE), WRITE: (WRITE,), REPLICATE: (REPLICATE, WRITE)}
"""The token roles that may call a method needing each role."""
ENV_VARS = {READ: "FEATUREBANK_READ_TOKEN", WRITE: "FEATUREBANK_WRITE_TOKEN",
            REPLICATE: "FEATUREBANK_REPLICATE_TOKEN"}

SERVICE = "/featurebank.v1.FeatureBank/"
READ_METHODS = frozenset({
    "Classify", "ClassifyBatch", "Search", "Embed", "GetInfo", "Suggest", "Audit", "GetThumbnails",
    "GetReport", "Quality", "SearchBatch", "Recommend", "Scroll", "Count",
})
REPLICATION_METHODS = frozenset({"ReplicaSnapshot", "FollowStore"})
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


EVERY_BANK = "*"


class OutOfScope(FeaturebankError):
    """A valid token used on a bank outside the banks it reaches."""

    grpc_code = "PERMISSION_DENIED"

Scope = frozenset[str] | None  # the banks a token reaches; None = every bank


@dataclass(frozen=True)
class Grant:
    """What a presented token allows: its role and the banks it reaches."""

    role: str
    banks: Scope = None

    def reaches(self, *names: str) -> bool:
        """Whether any of `names` (a bank or the alias it was asked by) is in scope."""
        return self.banks is None or any(n in self.banks for n in names)


def parse_scope(text: str, where: str) -> Scope:
    """`*` or `bank1,bank2` (bank or alias names)."""
    if text == EVERY_BANK:
        return None
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise InvalidInput(f"{where}: empty bank name in {text!r}: expected 'bank1,bank2' or '*'")
    return frozenset(names)


class Tokens:
    """Role -> tokens (each with its scope); `grant` answers what a presented token allows."""

    def __init__(self, tokens: Mapping[str, list[str]] | None = None) -> None:
        self._tokens: dict[str, list[tuple[bytes, Scope]]] = {r: [] for r in ROLES}
        for role, values in (tokens or {}).items():
            for value in values:
                self.add(role, value)

    def add(self, role: str, token: str, banks: Scope = None) -> None:
        if role not in ROLES:
            raise InvalidInput(f"unknown token role {role!r}: expected {', '.join(ROLES)}")
        if not token:
            raise InvalidInput(f"empty {role} token")
        self._tokens[role].append((token.encode(), banks))

    @property
    def enabled(self) -> bool:
        return any(self._tokens.values())

    @property
    def scoped(self) -> bool:
        """Some token reaches only some banks."""
        return any(scope is not None for ts in self._tokens.values() for _, scope in ts)

    def grant(self, token: str) -> Grant | None:
        """Role and banks of `token`, or None; checks every token so timing does not reveal
        which matched (a write match wins over a read one)."""
        presented = token.encode()
        found: Grant | None = None
        for role in (READ, REPLICATE, WRITE):
            for known, scope in self._tokens[role]:
                if hmac.compare_digest(presented, known):
                    found = Grant(role, scope)
        return found

    def role_of(self, token: str) -> str | None:
        """`write`, `read` or None."""
        found = self.grant(token)
        return found.role if found is not None else None

    def reach(self) -> dict[str, list[str]]:
        """role -> the banks its tokens reach (`*`: every bank); never the tokens."""
        out: dict[str, list[str]] = {}
        for role, tokens in self._tokens.items():
            if not tokens:
                continue
            scopes = [scope for _, scope in tokens]
            if any(scope is None for scope in scopes):
                out[role] = [EVERY_BANK]
            else:
                out[role] = sorted(set().union(*(s for s in scopes if s is not None)))
        return out

    def __repr__(self) -> str:  # never show the secrets themselves
        return f"Tokens(read={len(self._tokens[READ])}, write={len(self._tokens[WRITE])})"

    def describe(self) -> str:
        """How many tokens of each role (and, when scoped, the banks each role reaches),
        never the tokens: `1 read, 2 write` or `1 read, 2 write; read reaches a, b; write *`."""
        out = f"{len(self._tokens[READ])} read, {len(self._tokens[WRITE])} write"
        if self._tokens[REPLICATE]:
            out += f", {len(self._tokens[REPLICATE])} replicate"
        if self.scoped:
            out += "".join(f"; {role} reaches {', '.join(banks)}" for role, banks in self.reach().items())
        return out

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
                if len(parts) not in (2, 3):
                    raise InvalidInput(
                        f"{path}:{lineno}: expected 'ROLE TOKEN' or 'ROLE TOKEN BANKS' (role "
                        "read or write; BANKS 'bank1,bank2' or '*')"
                    )
                role = parts[0].lower()
                if role not in ROLES:
                    raise InvalidInput(
                        f"{path}:{lineno}: unknown role {parts[0]!r}: expected {', '.join(ROLES)}"
                    )
                scope = parse_scope(parts[2], f"{path}:{lineno}") if len(parts) == 3 else None
                tokens.add(role, parts[1], scope)
            if not tokens.enabled:
                raise InvalidInput(
                    f"tokens file {path} has no tokens: add 'read TOKEN' or 'write TOKEN' "
                    "lines (an empty file would turn authentication off)"
                )
        env = os.environ if environ is None else environ
        for role, var in ENV_VARS.items():
            if env.get(var):
                tokens.add(role, env[var])
        return tokens


def required_role(method: str) -> str | None:
    """The role a full method name needs; None for open services (health, reflection)."""
    if method.startswith(OPEN_PREFIXES):
        return None
    name = method[len(SERVICE) :] if method.startswith(SERVICE) else ""
    if name in READ_METHODS:
        return READ
    if name in REPLICATION_METHODS:
        return REPLICATE
    return WRITE  # anything unlisted needs the stronger role


def bearer(metadata: Any) -> str | None:
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
        token = bearer(handler_call_details.invocation_metadata)
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
        if role not in GRANTED_BY[need]:
            name = method.rsplit("/", 1)[-1]
            needs = " or ".join(GRANTED_BY[need])
            return self._denied(
                handler, method, grpc.StatusCode.PERMISSION_DENIED,
                f"{name} needs a {needs} token; this token only grants {role}",
            )
        return handler

    def _denied(
        self, handler: grpc.RpcMethodHandler, method: str, code: grpc.StatusCode, details: str
    ) -> grpc.RpcMethodHandler:
        if self.on_denied is not None:
            self.on_denied(method, code)
        return aborting_handler(handler, code, details)
