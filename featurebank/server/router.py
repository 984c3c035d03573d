"""The servicer a multi-bank server exposes: each call goes to the bank its `bank` field names.

Why a router in front of the per-bank servicers: a bank's servicer (server/service.py)
answers over one engine and stays as it is; the router resolves the name (alias or bank,
empty = the default), holds the bank open for the call (server/banks.py) and hands the
call to that bank's servicer. Errors of its own (unknown bank, a bank that fails to
open) are mapped to status codes the same way as every other error.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from grpc import aio

from featurebank.core.errors import InvalidInput
from featurebank.server.auth import Grant, OutOfScope, Tokens, bearer
from featurebank.server.banks import Banks, Entry
from featurebank.server.engine import Engine
from featurebank.server.lifecycle import Lifecycle
from featurebank.server.metrics import Metrics
from featurebank.server.read_your_writes import reach_generation
from featurebank.server.replica import ReplicaEngine
from featurebank.server.replication import (
    DEFAULT_LOG_RETENTION,
    Hub,
    follow_stream,
    snapshot_stream,
)
from featurebank.server.service import FeatureBankServicer, Unavailable
from featurebank.server.status import to_status
from featurebank.v1 import featurebank_pb2 as pb
from featurebank.v1 import featurebank_pb2_grpc as pb_grpc

ROUTED = (
    "Classify", "ClassifyBatch", "Search", "Embed", "Suggest", "Audit", "GetThumbnails",
    "GetReport", "Quality", "SetLabels", "Delete", "RebuildIndex", "GetOperation",
    "SearchBatch", "Recommend", "Scroll", "Count", "SetMetadata", "SetSplits", "KeepFinding",
)

MakeServicer = Callable[[Engine], FeatureBankServicer]


class BankRouter(pb_grpc.FeatureBankServicer):
    """featurebank.v1.FeatureBank over many banks, one FeatureBankServicer per open bank."""

    def __init__(
        self, banks: Banks, make_servicer: MakeServicer, metrics: Metrics | None = None,
        tokens: Tokens | None = None, log_retention: int = DEFAULT_LOG_RETENTION,
    ) -> None:
        self.banks = banks
        self.log_retention = log_retention
        self.hubs: dict[str, Hub] = {}  # bank folder -> the replicas following it
        self.make_servicer = make_servicer
        self.metrics = metrics
        self.tokens = tokens if tokens is not None and tokens.enabled else None
        self.lifecycle = Lifecycle(banks)

    def _servicer(self, entry: Entry, engine: Engine) -> FeatureBankServicer:
        servicer = entry.servicer
        if servicer is None or servicer.engine is not engine:
            servicer = entry.servicer = self.make_servicer(engine)
        return servicer  # type: ignore[no-any-return]

    async def _answer(self, method: str, call: Callable[[], Awaitable[Any]],
                      context: aio.ServicerContext) -> Any:
        """`call()`'s answer, or its error as a status (never UNKNOWN)."""
        started = time.perf_counter()
        try:
            return await call()
        except aio.AbortError:
            raise  # the bank's servicer already answered with a status
        except Exception as e:  # noqa: BLE001 - mapped to a status, never UNKNOWN
            code, message = to_status(e)
            if self.metrics is not None:
                self.metrics.observe(method, code.name, time.perf_counter() - started)
            await context.abort(code, message)
            raise  # unreachable: abort raises

    def _grant(self, context: aio.ServicerContext) -> Grant | None:
        """The caller's token's grant where tokens are scoped (the interceptor checked it)."""
        if self.tokens is None or not self.tokens.scoped:
            return None
        token = bearer(context.invocation_metadata())
        return self.tokens.grant(token) if token else None

    def _check_reach(self, context: aio.ServicerContext, method: str, *names: str) -> None:
        """PERMISSION_DENIED unless the token reaches each named bank (or the bank an alias
        names); checked before the name is looked up, so a token learns of no other bank."""
        grant = self._grant(context)
        if grant is None:
            return
        for name in names:
            asked = name or self.banks.default or ""
            if asked and not grant.reaches(asked, self.banks.aliases.get(asked, asked)):
                raise OutOfScope(f"{method}: this token does not reach bank {asked!r}")

    async def _route(
        self, method: str, name: str, request: Any, context: aio.ServicerContext,
        named: bool = False,
    ) -> Any:
        """The bank's servicer's answer (with `named`, the answer and the bank's name)."""

        async def call() -> Any:
            self._check_reach(context, method, name)
            async with self.banks.using(name) as (entry, engine):
                why = None
                if isinstance(engine, ReplicaEngine):
                    why = engine.unreadable() or (None if method == "GetInfo" else engine.loading())
                if why is not None:  # clients and load balancers retry elsewhere
                    raise Unavailable(why)
                if getattr(request, "min_store_generation", 0) > 0:  # read-your-writes
                    await reach_generation(engine, request.min_store_generation,
                                           context.time_remaining())
                response = await getattr(self._servicer(entry, engine), method)(request, context)
                return (response, entry.name) if named else response

        return await self._answer(method, call, context)

    # ------------------------------------------------------------- lifecycle (write role)

    async def CreateBank(self, request: pb.CreateBankRequest, context: aio.ServicerContext) -> pb.BankState:
        async def call() -> pb.BankState:
            self._check_reach(context, "CreateBank", request.name)
            entry = await self.lifecycle.create(request.name, request.spec)
            return pb.BankState(**self.banks.state(entry))

        return await self._answer("CreateBank", call, context)  # type: ignore[no-any-return]

    async def DropBank(
        self, request: pb.DropBankRequest, context: aio.ServicerContext
    ) -> pb.DropBankResponse:
        async def call() -> pb.DropBankResponse:
            self._check_reach(context, "DropBank", request.name)
            hub = self._hub_of(request.name)
            with hub.closing(request.name, request.force) if hub else contextlib.nullcontext():
                await self.lifecycle.drop(request.name, request.force)
            if hub is not None:
                self.hubs = {k: h for k, h in self.hubs.items() if h is not hub}
            if self.metrics is not None:
                self.metrics.for_bank(request.name).forget_bank()
            return pb.DropBankResponse(name=request.name)

        return await self._answer("DropBank", call, context)  # type: ignore[no-any-return]

    async def SetAlias(
        self, request: pb.SetAliasRequest, context: aio.ServicerContext
    ) -> pb.SetAliasResponse:
        async def call() -> pb.SetAliasResponse:
            self._check_reach(context, "SetAlias", request.alias, *([request.bank] if request.bank else []))
            previous = self.lifecycle.set_alias(request.alias, request.bank)
            return pb.SetAliasResponse(alias=request.alias, bank=request.bank, previous=previous)

        return await self._answer("SetAlias", call, context)  # type: ignore[no-any-return]

    # ------------------------------------------------------------- the banks' own RPCs

    async def GetInfo(self, request: pb.GetInfoRequest, context: aio.ServicerContext) -> pb.GetInfoResponse:
        response = pb.GetInfoResponse()  # no default bank and none named: the list alone
        if request.bank or self.banks.default is not None:
            response, response_name = await self._route(
                "GetInfo", request.bank, request, context, named=True
            )
            response.name = response_name
        hub = self.hubs.get(response.bank)
        if hub is not None:
            response.followers.extend(
                pb.FollowerInfo(**f) for f in hub.describe(response.store_generation)
            )
        grant = self._grant(context)
        response.banks.extend(
            pb.BankState(**s) for s in self.banks.states()
            if grant is None or grant.reaches(s["name"], *s["aliases"])
        )
        if self.tokens is not None:
            response.roles.extend(
                pb.RoleReach(role=role, banks=banks) for role, banks in self.tokens.reach().items()
            )
        return response

    async def Upsert(
        self, request_iterator: AsyncIterator[pb.UpsertItem], context: aio.ServicerContext
    ) -> pb.UpsertResponse:
        """The stream's first item names the bank; later items repeat it or leave it empty."""
        first = await anext(aiter(request_iterator), None)
        name = first.bank if first is not None else ""

        async def items() -> AsyncIterator[pb.UpsertItem]:
            if first is None:
                return
            yield first
            async for n, item in _numbered(request_iterator, 1):
                if item.bank and item.bank != name:
                    raise InvalidInput(
                        f"items[{n}].bank is {item.bank!r} but the stream's first item named "
                        f"{name!r}: one Upsert writes to one bank"
                    )
                yield item

        return await self._route("Upsert", name, items(), context)  # type: ignore[no-any-return]


    # ------------------------------------------------------------- replication (server/replication.py)

    def _hub_of(self, name: str) -> Hub | None:
        """The replicas following the bank `name` (None: none ever did)."""
        entry = self.banks.entries.get(name)
        return self.hubs.get(str(entry.path)) if entry is not None else None

    def _hub(self, engine: Engine) -> Hub:
        key = str(engine.bank.root)
        hub = self.hubs.get(key)
        if hub is None:
            hub = self.hubs[key] = Hub(self.log_retention, metrics=engine.metrics)
        return hub

    async def _stream(
        self, method: str, name: str, context: aio.ServicerContext,
        answer: Callable[[Engine], AsyncIterator[Any]],
    ) -> AsyncIterator[Any]:
        """A server stream from the bank `name`, its errors mapped to a status."""
        try:
            self._check_reach(context, method, name)
            async with self.banks.using(name) as (_entry, engine):
                async for message in answer(engine):
                    yield message
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a status, never UNKNOWN
            code, message = to_status(e)
            if self.metrics is not None:
                self.metrics.observe(method, code.name, 0.0)
            await context.abort(code, message)

    async def ReplicaSnapshot(
        self, request: pb.SnapshotRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.SnapshotChunk]:
        async for chunk in self._stream("ReplicaSnapshot", request.bank, context,
                                        lambda engine: snapshot_stream(engine, request)):
            yield chunk

    async def FollowStore(
        self, request_iterator: AsyncIterator[pb.FollowRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.StoreDelta]:
        """The first request names the bank and where the replica is; later ones its progress."""
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return

        async def requests() -> AsyncIterator[pb.FollowRequest]:
            yield first
            async for r in request_iterator:
                yield r

        async for delta in self._stream(
            "FollowStore", first.bank, context,
            lambda engine: follow_stream(engine, self._hub(engine), requests(), context.peer()),
        ):
            yield delta


async def _numbered(items: AsyncIterator[Any], start: int) -> AsyncIterator[tuple[int, Any]]:
    n = start
    async for item in items:
        yield n, item
        n += 1


def _routed(method: str) -> Callable[..., Any]:
    async def call(self: BankRouter, request: Any, context: aio.ServicerContext) -> Any:
        return await self._route(method, request.bank, request, context)

    call.__name__ = method
    return call


for _method in ROUTED:
    setattr(BankRouter, _method, _routed(_method))
