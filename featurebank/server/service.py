"""The FeatureBank servicer: one method per RPC, the engine's plain functions below.

Every RPC goes through `_rpc`, which records metrics and turns exceptions into
status codes via `server.status` (so nothing reaches the client as UNKNOWN).
Request checks live in `validation`, proto building in `responses`; what stays here
is the servicer class itself, one short method per RPC, hence its length.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import numpy as np
from grpc import aio

from featurebank.classify.abstain import check_precision
from featurebank.core.errors import FeaturebankError, InvalidInput, Overloaded, shown
from featurebank.core.vocabulary import SUGGEST_STRATEGIES
from featurebank.server.engine import (
    DEFAULT_SEARCH_K,
    ClassifyJob,
    Engine,
    Labelling,
    RebuildParams,
    SearchJob,
    UpsertRow,
    image_meta,
)
from featurebank.server.limits import StreamBytes, TooMany, UpsertBudget
from featurebank.server.metrics import Metrics
from featurebank.server.responses import (
    classified,
    finding,
    hit,
    info_response,
    operation,
    to_struct,
)
from featurebank.server.status import to_status
from featurebank.server.validation import (
    check_count,
    check_k,
    check_key,
    check_label_filter,
    check_many,
    check_mode,
    check_split,
    check_top_n,
    check_vector,
)
from featurebank.server.wire import STRATEGY_NAMES
from featurebank.v1 import featurebank_pb2 as pb
from featurebank.v1 import featurebank_pb2_grpc as pb_grpc

Req = TypeVar("Req")
Resp = TypeVar("Resp")

MAX_BATCH_INPUTS = 4096
MAX_UPSERT_ITEMS = 100_000
MAX_THUMBNAILS = 1000
MAX_OPERATION_ID = 64  # operation ids are 32 hex digits
RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata of RESOURCE_EXHAUSTED from a busy writer


class Unavailable(FeaturebankError):
    """The server is starting or stopping; the client may retry."""

    grpc_code = "UNAVAILABLE"


# --------------------------------------------------------------------- servicer


def _rpc(
    fn: Callable[[FeatureBankServicer, Req, aio.ServicerContext], Awaitable[Resp]],
) -> Callable[[FeatureBankServicer, Req, aio.ServicerContext], Awaitable[Resp]]:
    """Metrics and status mapping for one RPC method."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: FeatureBankServicer, request: Req, context: aio.ServicerContext) -> Resp:
        started = time.perf_counter()
        in_flight = self.metrics.in_flight.labels(name) if self.metrics is not None else None
        if in_flight is not None:
            in_flight.inc()
        try:
            if self.engine.store is None:
                raise Unavailable("the bank is still loading (or shutting down); retry shortly")
            response = await fn(self, request, context)
        except asyncio.CancelledError:  # the client went away or its deadline passed
            left = context.time_remaining()
            expired = left is not None and left <= 0
            self._observe(name, "DEADLINE_EXCEEDED" if expired else "CANCELLED", started)
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a status, never UNKNOWN
            code, message = to_status(e)
            self._observe(name, code.name, started)
            if isinstance(e, Overloaded):  # machine-readable retry hint beside the message
                context.set_trailing_metadata(((RETRY_AFTER_KEY, str(e.retry_after_ms)),))
            await context.abort(code, message)
            raise  # unreachable: abort raises
        finally:
            if in_flight is not None:
                in_flight.dec()
        self._observe(name, "OK", started)
        return response

    return wrapper


class FeatureBankServicer(pb_grpc.FeatureBankServicer):
    """featurebank.v1.FeatureBank over one Engine."""

    def __init__(
        self, engine: Engine, metrics: Metrics | None = None, upsert_budget: UpsertBudget | None = None
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.upsert_budget = upsert_budget or UpsertBudget()

    def _observe(self, method: str, code: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.observe(method, code, time.perf_counter() - started)

    async def _vectors(self, inputs: Sequence[pb.Input]) -> tuple[np.ndarray, list[int | None]]:
        """Vectors of images, vectors and keys (images batched with other calls).

        Also the stored id of each key input, so a stored item is left out of its own
        neighbours (leave-one-out) when classifying or searching by key.
        """
        dim = self.engine.dim
        out: list[np.ndarray | None] = [None] * len(inputs)
        own: list[int | None] = [None] * len(inputs)
        images: list[tuple[int, bytes]] = []
        keys: list[tuple[int, str]] = []

        def name(i: int) -> str:
            return f"inputs[{i}]" if len(inputs) > 1 else "input"

        for i, inp in enumerate(inputs):
            where = name(i)
            kind = inp.WhichOneof("input")
            if kind is None:
                raise InvalidInput(f"{where} is empty: set image, vector or key")
            if kind == "image":
                if not inp.image:
                    raise InvalidInput(f"{where}.image is empty")
                images.append((i, inp.image))
            elif kind == "vector":
                out[i] = check_vector(inp.vector.values, dim, f"{where}.vector")
            else:
                keys.append((i, check_key(inp.key, f"{where}.key")))
        if images:
            vectors = await self.engine.embed_each([b for _, b in images])
            for (i, _), v in zip(images, vectors, strict=True):
                if isinstance(v, BaseException):
                    raise _image_error(v, f"{name(i)}.image")
                out[i] = v
        if keys:
            vectors2, ids = await self.engine.vectors_of_keys([k for _, k in keys])
            for (i, _), v, item_id in zip(keys, vectors2, ids, strict=True):
                out[i] = v
                own[i] = int(item_id)
        return np.stack([v for v in out if v is not None]), own

    # ------------------------------------------------------------- read RPCs

    @_rpc
    async def Classify(
        self, request: pb.ClassifyRequest, context: aio.ServicerContext
    ) -> pb.ClassifyResponse:
        results = await self._classify(
            [request.input], request.mode, request.k, request.top_n, request.include_neighbors,
            request.abstain_below,
        )
        return results[0]

    @_rpc
    async def ClassifyBatch(
        self, request: pb.ClassifyBatchRequest, context: aio.ServicerContext
    ) -> pb.ClassifyBatchResponse:
        check_many(request.inputs, "ClassifyBatch", "inputs", MAX_BATCH_INPUTS)
        results = await self._classify(
            list(request.inputs), request.mode, request.k, request.top_n, request.include_neighbors,
            request.abstain_below,
        )
        return pb.ClassifyBatchResponse(results=results)

    async def _classify(
        self, inputs: Sequence[pb.Input], mode: int, k: int, top_n: int, neighbors: bool,
        abstain_below: float = 0.0,
    ) -> list[pb.ClassifyResponse]:
        mode_name = check_mode(mode)
        k_value = check_k(k, None)
        n = check_top_n(top_n)
        precision = check_precision(abstain_below) if abstain_below else None
        vectors, own = await self._vectors(inputs)
        jobs = [
            ClassifyJob(v, mode_name, k_value, n, neighbors, item_id, precision)
            for v, item_id in zip(vectors, own, strict=True)
        ]
        return [classified(c) for c in await self.engine.classify(jobs)]

    @_rpc
    async def Search(
        self, request: pb.SearchRequest, context: aio.ServicerContext
    ) -> pb.SearchResponse:
        k = check_k(request.k, DEFAULT_SEARCH_K) or DEFAULT_SEARCH_K
        labels = check_label_filter(request.labels)
        vectors, own = await self._vectors([request.input])
        job = SearchJob(vectors[0], k, labels, own[0], request.include_metadata)
        hits = (await self.engine.search([job]))[0]
        models = self.engine.models
        gen = int(models.classifier.index_generation) if models else 0
        return pb.SearchResponse(neighbors=[hit(h) for h in hits], index_generation=gen)

    @_rpc
    async def Embed(self, request: pb.EmbedRequest, context: aio.ServicerContext) -> pb.EmbedResponse:
        if not request.image:
            raise InvalidInput("image is empty")
        vector = (await self.engine.embed_each([request.image]))[0]
        if isinstance(vector, BaseException):
            raise _image_error(vector, "image")
        return pb.EmbedResponse(vector=pb.Vector(values=vector.tolist()), dim=int(vector.shape[0]))

    @_rpc
    async def GetInfo(
        self, request: pb.GetInfoRequest, context: aio.ServicerContext
    ) -> pb.GetInfoResponse:
        return info_response(await self.engine.info())

    @_rpc
    async def Suggest(
        self, request: pb.SuggestRequest, context: aio.ServicerContext
    ) -> pb.SuggestResponse:
        n = check_count(request.n, "n")
        strategy = STRATEGY_NAMES.get(request.strategy)
        if strategy is None:
            known = ", ".join(s.upper() for s in SUGGEST_STRATEGIES)
            raise InvalidInput(f"unknown strategy {request.strategy}: use one of {known}")
        done = await self.engine.suggest(n, strategy, request.label or None)
        return pb.SuggestResponse(
            suggestions=[
                pb.Suggestion(
                    key=s.key, score=s.score,
                    labels=[
                        pb.LabelProbability(label=label, probability=p)
                        for label, p in zip(s.labels, s.probs, strict=True)
                    ],
                )
                for s in done.items
            ],
            index_generation=done.index_generation,
            labels_generation=done.labels_generation,
        )

    @_rpc
    async def Audit(self, request: pb.AuditRequest, context: aio.ServicerContext) -> pb.AuditResponse:
        done: Labelling = await self.engine.audit(check_count(request.n, "n"))
        return pb.AuditResponse(
            findings=[finding(f) for f in done.items],
            index_generation=done.index_generation,
            labels_generation=done.labels_generation,
        )

    @_rpc
    async def Quality(
        self, request: pb.QualityRequest, context: aio.ServicerContext
    ) -> pb.QualityResponse:
        from featurebank.server.quality import quality

        return await quality(self.engine, request)

    @_rpc
    async def GetThumbnails(
        self, request: pb.GetThumbnailsRequest, context: aio.ServicerContext
    ) -> pb.GetThumbnailsResponse:
        check_many(request.keys, "GetThumbnails", "keys", MAX_THUMBNAILS)
        keys = [check_key(k, f"keys[{i}]") for i, k in enumerate(request.keys)]
        found = await self.engine.thumbnails(keys)
        return pb.GetThumbnailsResponse(
            thumbnails=[pb.Thumbnail(key=k, jpeg=t or b"") for k, t in zip(keys, found, strict=True)]
        )

    @_rpc
    async def GetReport(
        self, request: pb.GetReportRequest, context: aio.ServicerContext
    ) -> pb.GetReportResponse:
        found = await self.engine.report()
        return pb.GetReportResponse(
            name=found["name"], html=found["html"], metrics=to_struct(found["metrics"])
        )

    # ------------------------------------------------------------- write RPCs

    @_rpc
    async def Upsert(
        self, request_iterator: AsyncIterator[pb.UpsertItem], context: aio.ServicerContext
    ) -> pb.UpsertResponse:
        """All or nothing: the stream's items are committed in one transaction, and only
        when the client completed the stream; the server holds the stream until then,
        within the bounds of `upsert_budget`."""
        with self.upsert_budget.stream() as held:
            return await self._upsert(request_iterator, context, held)

    async def _upsert(
        self,
        request_iterator: AsyncIterator[pb.UpsertItem],
        context: aio.ServicerContext,
        held: StreamBytes,
    ) -> pb.UpsertResponse:
        dim = self.engine.dim
        rows: list[UpsertRow | None] = []
        seen: dict[str, int] = {}
        pending: list[tuple[int, str, pb.UpsertItem]] = []
        i = 0
        async for item in request_iterator:
            if i >= MAX_UPSERT_ITEMS:
                raise TooMany(
                    f"Upsert takes at most {MAX_UPSERT_ITEMS} items per call: split the stream"
                )
            held.add(item.ByteSize(), i)
            key = check_key(item.key, f"item {i} key")
            where = f"item {i} (key {shown(key)})"
            if key in seen:
                raise InvalidInput(f"{where}: key repeats item {seen[key]}")
            seen[key] = i
            split = check_split(item.split, where)
            kind = item.WhichOneof("data")
            if kind is None:
                raise InvalidInput(f"{where} has neither image nor vector")
            if kind == "vector":
                vec = check_vector(item.vector.values, dim, f"{where} vector")
                meta = {"uri": item.uri} if item.uri else {}
                rows.append(UpsertRow(key, vec, item.label or None, split, meta))
            else:
                if not item.image:
                    raise InvalidInput(f"{where} image is empty")
                rows.append(None)
                pending.append((i, split, item))
            i += 1
        await _check_stream_complete(context)
        if not rows:
            raise InvalidInput("Upsert got no items")
        if pending:
            vectors = await self.engine.embed_each([it.image for _, _, it in pending])
            for (j, split, it), v in zip(pending, vectors, strict=True):
                if isinstance(v, BaseException):
                    raise _image_error(v, f"item {j} (key {shown(it.key)}) image")
                rows[j] = UpsertRow(
                    it.key, v, it.label or None, split, image_meta(it.image, it.uri)
                )
        left = context.time_remaining()
        deadline = None if left is None else time.monotonic() + left
        done = await self.engine.upsert([r for r in rows if r is not None], deadline)
        return pb.UpsertResponse(**done)

    @_rpc
    async def SetLabels(
        self, request: pb.SetLabelsRequest, context: aio.ServicerContext
    ) -> pb.SetLabelsResponse:
        if not request.labels:
            raise InvalidInput("SetLabels got no labels")
        mapping: dict[str, str | None] = {}
        for i, a in enumerate(request.labels):
            key = check_key(a.key, f"labels[{i}].key")
            if key in mapping:
                raise InvalidInput(f"labels[{i}]: key {shown(key)} appears twice")
            mapping[key] = a.label or None
        return pb.SetLabelsResponse(**await self.engine.set_labels(mapping))

    @_rpc
    async def Delete(self, request: pb.DeleteRequest, context: aio.ServicerContext) -> pb.DeleteResponse:
        if not request.keys:
            raise InvalidInput("Delete got no keys")
        keys = [check_key(k, f"keys[{i}]") for i, k in enumerate(request.keys)]
        return pb.DeleteResponse(**await self.engine.delete(keys, request.ignore_missing))

    @_rpc
    async def RebuildIndex(
        self, request: pb.RebuildIndexRequest, context: aio.ServicerContext
    ) -> pb.Operation:
        params = RebuildParams(
            index={
                "factory": request.factory or None,
                "metric": request.metric or None,
                "transform": request.transform or None,
                "memory_budget": request.memory_budget or None,
                "target_recall": request.target_recall or None,
                "k": request.k or None,
                "allow_below_target": True if request.allow_below_target else None,
            },
            retrain_head=request.retrain_head,
            head_hidden=request.head_hidden if request.HasField("head_hidden") else None,
            head_epochs=request.head_epochs if request.HasField("head_epochs") else None,
        )
        return operation(self.engine.start_rebuild(params))

    @_rpc
    async def GetOperation(
        self, request: pb.GetOperationRequest, context: aio.ServicerContext
    ) -> pb.Operation:
        if not request.id:
            raise InvalidInput("operation id is empty")
        if len(request.id) > MAX_OPERATION_ID:
            raise InvalidInput(
                f"operation id {shown(request.id)} is longer than {MAX_OPERATION_ID} characters"
            )
        return operation(self.engine.get_operation(request.id))


async def _check_stream_complete(context: aio.ServicerContext) -> None:
    """Refuse a stream that ended because the call was cancelled, not half-closed.

    grpcio ends the request iterator the same way on both, and `context.cancelled()`
    is still false when it does (the cancellation reaches the handler a moment
    later). Sending the response headers is an operation on the call itself: on a
    call the client cancelled (or whose deadline passed) it fails or the handler is
    cancelled while it waits; on a stream the client completed it succeeds. Items
    of an incomplete stream are not the client's whole request and must not be
    committed.
    """
    left = context.time_remaining()
    if left is not None and left <= 0:
        raise asyncio.CancelledError("Upsert stream past its deadline")
    try:
        await context.send_initial_metadata(())
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - the call is gone; nobody hears a status
        raise asyncio.CancelledError(f"Upsert stream did not complete: {e}") from e
    if context.cancelled():
        raise asyncio.CancelledError("Upsert stream cancelled")


def _image_error(e: BaseException, where: str) -> BaseException:
    """Name the request field of a bad image (the embedder only knows its batch position)."""
    if isinstance(e, InvalidInput):
        return InvalidInput(f"{where}: {_IMAGE_POS.sub('', str(e), count=1)}")
    return e


_IMAGE_POS = re.compile(r"^image \d+: ")
