"""The FeatureBank servicer: one method per RPC, the engine's parts below.

Every RPC goes through `_rpc`, which records metrics and turns exceptions into
status codes via `server.status` (so nothing reaches the client as UNKNOWN).
Request checks live in `validation`, proto building in `responses`; what stays here
is the servicer class itself, one short method per RPC.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TypeVar

import numpy as np
from grpc import aio

from featurebank.core.errors import FeaturebankError, InvalidInput, Overloaded
from featurebank.server import queries
from featurebank.server.batching import run_in
from featurebank.server.bounds import (
    DEFAULT_SEARCH_K,
    MAX_BATCH_INPUTS,
    MAX_THUMBNAILS,
    MAX_UPSERT_ITEMS,
)
from featurebank.server.engine import Engine
from featurebank.server.group_commit import UpsertRow
from featurebank.server.limits import StreamBytes, TooMany, UpsertBudget
from featurebank.server.metrics import Metrics
from featurebank.server.reads import ClassifyJob
from featurebank.server.responses import (
    finding,
    hit,
    info_response,
    operation,
    prediction,
    suggestion,
    to_struct,
)
from featurebank.server.status import to_status
from featurebank.server.validation import (
    Inputs,
    UpsertImage,
    check_classify,
    check_count,
    check_inputs,
    check_k,
    check_keys,
    check_label_filter,
    check_labels,
    check_many,
    check_operation_id,
    check_rebuild,
    check_splits,
    check_strategy,
    check_upsert_item,
    image_error,
)
from featurebank.server.writes import image_meta, thumbnail_of
from featurebank.v1 import featurebank_pb2 as pb
from featurebank.v1 import featurebank_pb2_grpc as pb_grpc

Req = TypeVar("Req")
Resp = TypeVar("Resp")

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
        in_flight = self.metrics.in_flight_of(name) if self.metrics is not None else None
        if in_flight is not None:
            in_flight.inc()
        try:
            if not self.engine.is_open:
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
        self.reads, self.writes, self.info = engine.reads, engine.writes, engine.info
        self.queries = queries.Queries(engine)
        self.metrics = metrics
        self.upsert_budget = upsert_budget or UpsertBudget()

    def _observe(self, method: str, code: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.observe(method, code, time.perf_counter() - started)

    async def _vectors(self, inputs: Inputs) -> tuple[list[np.ndarray], list[int | None]]:
        """Vectors of images, vectors and keys (images batched with other calls), in order.

        Also the stored id of each key input, so a stored item is left out of its own
        neighbours (leave-one-out) when classifying or searching by key.
        """
        out: list[np.ndarray | None] = [None] * inputs.count
        own: list[int | None] = [None] * inputs.count
        for i, checked in inputs.vectors:
            out[i] = checked
        if inputs.images:
            embedded = await self.reads.embed_each([b for _, b in inputs.images])
            for (i, _), e in zip(inputs.images, embedded, strict=True):
                if isinstance(e, BaseException):
                    raise image_error(e, f"{inputs.where(i)}.image")
                out[i] = e
        if inputs.keys:
            found, ids = await self.reads.vectors_of_keys([k for _, k in inputs.keys])
            for (i, _), v, item_id in zip(inputs.keys, found, ids, strict=True):
                out[i] = v
                own[i] = int(item_id)
        return [v for v in out if v is not None], own

    # ------------------------------------------------------------- read RPCs

    @_rpc
    async def Classify(
        self, request: pb.ClassifyRequest, context: aio.ServicerContext
    ) -> pb.ClassifyResponse:
        results = await self._classify(
            [request.input], request.mode, request.k, request.top_n, request.include_neighbors,
            request.abstain_below, request.filter,
        )
        return results[0]

    @_rpc
    async def ClassifyBatch(
        self, request: pb.ClassifyBatchRequest, context: aio.ServicerContext
    ) -> pb.ClassifyBatchResponse:
        check_many(request.inputs, "ClassifyBatch", "inputs", MAX_BATCH_INPUTS)
        results = await self._classify(
            list(request.inputs), request.mode, request.k, request.top_n, request.include_neighbors,
            request.abstain_below, request.filter,
        )
        return pb.ClassifyBatchResponse(results=results)

    async def _classify(
        self, inputs: Sequence[pb.Input], mode: int, k: int, top_n: int, neighbors: bool,
        abstain_below: float, filter_text: str = "",
    ) -> list[pb.ClassifyResponse]:
        options = check_classify(mode, k, top_n, neighbors, abstain_below,
                                 queries.check_filter(filter_text))
        vectors, own = await self._vectors(check_inputs(inputs, self.engine.dim))
        jobs = [ClassifyJob(v, options, item_id) for v, item_id in zip(vectors, own, strict=True)]
        return [prediction(p) for p in await self.reads.classify(jobs)]

    @_rpc
    async def Search(
        self, request: pb.SearchRequest, context: aio.ServicerContext
    ) -> pb.SearchResponse:
        return await self._search(request)

    async def _search(self, request: pb.SearchRequest, where: str = "") -> pb.SearchResponse:
        k = check_k(request.k, DEFAULT_SEARCH_K, f"{where}k") or DEFAULT_SEARCH_K
        labels = check_label_filter(request.labels)
        job0 = queries.search_job(request, np.zeros(0), None, labels, k, where)  # checks first
        vectors, own = await self._vectors(check_inputs([request.input], self.engine.dim))
        job = replace(job0, vector=vectors[0], exclude_id=own[0])
        found = (await self.reads.search([job]))[0]
        return pb.SearchResponse(
            neighbors=[hit(h) for h in found.hits], index_generation=found.index_generation
        )

    @_rpc
    async def SearchBatch(
        self, request: pb.SearchBatchRequest, context: aio.ServicerContext
    ) -> pb.SearchBatchResponse:
        check_many(request.requests, "SearchBatch", "requests", queries.MAX_SEARCH_BATCH)
        done = await asyncio.gather(
            *(self._search(r, f"requests[{i}].") for i, r in enumerate(request.requests)),
            return_exceptions=True,
        )
        results = []
        for d in done:
            if isinstance(d, BaseException):
                if not isinstance(d, Exception):
                    raise d
                code, message = to_status(d)
                results.append(pb.SearchBatchResult(error=pb.OperationError(code=code.name, message=message)))
            else:
                results.append(pb.SearchBatchResult(response=d))
        return pb.SearchBatchResponse(results=results)

    @_rpc
    async def Recommend(
        self, request: pb.RecommendRequest, context: aio.ServicerContext
    ) -> pb.SearchResponse:
        check_many(request.positives, "Recommend", "positives", queries.MAX_EXAMPLES)
        if len(request.positives) + len(request.negatives) > queries.MAX_EXAMPLES:
            raise InvalidInput(f"Recommend takes at most {queries.MAX_EXAMPLES} examples in all")
        strategy = queries.check_strategy(request.strategy)
        k = check_k(request.k, DEFAULT_SEARCH_K) or DEFAULT_SEARCH_K
        where = queries.check_filter(request.filter)
        threshold = queries.check_threshold(request.HasField("score_threshold"), request.score_threshold)
        examples = [*request.positives, *request.negatives]
        found, own = await self._vectors(check_inputs(examples, self.engine.dim))
        vectors, n = np.stack(found), len(request.positives)
        hits, generation = await run_in(
            self.reads.compute, self.queries.recommend, vectors[:n], vectors[n:],
            [i for i in own if i is not None], strategy, k, where, threshold, request.include_metadata,
        )
        return pb.SearchResponse(neighbors=[hit(h) for h in hits], index_generation=generation)

    @_rpc
    async def Scroll(self, request: pb.ScrollRequest, context: aio.ServicerContext) -> pb.ScrollResponse:
        return await self.queries.scroll(request)

    @_rpc
    async def Count(self, request: pb.CountRequest, context: aio.ServicerContext) -> pb.CountResponse:
        return await self.queries.count(request)

    @_rpc
    async def Embed(self, request: pb.EmbedRequest, context: aio.ServicerContext) -> pb.EmbedResponse:
        if not request.image:
            raise InvalidInput("image is empty")
        vector = (await self.reads.embed_each([request.image]))[0]
        if isinstance(vector, BaseException):
            raise image_error(vector, "image")
        return pb.EmbedResponse(vector=pb.Vector(values=vector.tolist()), dim=int(vector.shape[0]))

    @_rpc
    async def GetInfo(
        self, request: pb.GetInfoRequest, context: aio.ServicerContext
    ) -> pb.GetInfoResponse:
        return info_response(await self.info.bank())

    @_rpc
    async def Suggest(
        self, request: pb.SuggestRequest, context: aio.ServicerContext
    ) -> pb.SuggestResponse:
        n = check_count(request.n, "n")
        done = await self.info.suggest(n, check_strategy(request.strategy), request.label or None,
                                       queries.check_filter(request.filter))
        return pb.SuggestResponse(
            suggestions=[suggestion(s) for s in done.items],
            index_generation=done.index_generation,
            labels_generation=done.labels_generation,
        )

    @_rpc
    async def Audit(self, request: pb.AuditRequest, context: aio.ServicerContext) -> pb.AuditResponse:
        done = await self.info.audit(check_count(request.n, "n"),
                                     queries.check_filter(request.filter))
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
        keys = check_keys(request.keys, "GetThumbnails")
        found = await self.reads.thumbnails(keys)
        return pb.GetThumbnailsResponse(
            thumbnails=[pb.Thumbnail(key=k, jpeg=t or b"") for k, t in zip(keys, found, strict=True)]
        )

    @_rpc
    async def GetReport(
        self, request: pb.GetReportRequest, context: aio.ServicerContext
    ) -> pb.GetReportResponse:
        found = await self.info.report()
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
        rows: list[UpsertRow | UpsertImage] = []
        seen: dict[str, int] = {}
        async for item in request_iterator:
            if len(rows) >= MAX_UPSERT_ITEMS:
                raise TooMany(
                    f"Upsert takes at most {MAX_UPSERT_ITEMS} items per call: split the stream"
                )
            held.add(item.ByteSize(), len(rows))
            rows.append(check_upsert_item(item, len(rows), dim, seen))
        await _check_stream_complete(context)
        if not rows:
            raise InvalidInput("Upsert got no items")
        images = [r for r in rows if isinstance(r, UpsertImage)]
        if images:
            vectors = await self.reads.embed_each([p.item.image for p in images])
            for p, v in zip(images, vectors, strict=True):
                if isinstance(v, BaseException):
                    raise image_error(v, p.where)
                meta = image_meta(p.item.image, p.item.uri)
                meta.update(queries.struct_meta(p.item.metadata, p.key))
                rows[p.position] = UpsertRow(
                    p.key, v, p.item.label or None, p.split, meta,
                    thumbnail_of(p.item.image) if p.item.thumbnail else None,
                )
        left = context.time_remaining()
        deadline = None if left is None else time.monotonic() + left
        done = await self.writes.upsert([r for r in rows if isinstance(r, UpsertRow)], deadline)
        return pb.UpsertResponse(**done)

    @_rpc
    async def SetLabels(
        self, request: pb.SetLabelsRequest, context: aio.ServicerContext
    ) -> pb.SetLabelsResponse:
        return pb.SetLabelsResponse(**await self.writes.set_labels(check_labels(request.labels)))

    @_rpc
    async def SetMetadata(
        self, request: pb.SetMetadataRequest, context: aio.ServicerContext
    ) -> pb.SetMetadataResponse:
        return await self.queries.set_metadata(request)

    @_rpc
    async def Delete(self, request: pb.DeleteRequest, context: aio.ServicerContext) -> pb.DeleteResponse:
        keys = check_keys(request.keys, "Delete")
        return pb.DeleteResponse(**await self.writes.delete(keys, request.ignore_missing))

    @_rpc
    async def SetSplits(
        self, request: pb.SetSplitsRequest, context: aio.ServicerContext
    ) -> pb.SetSplitsResponse:
        return pb.SetSplitsResponse(**await self.writes.set_splits(check_splits(request.splits)))

    @_rpc
    async def KeepFinding(
        self, request: pb.KeepFindingRequest, context: aio.ServicerContext
    ) -> pb.KeepFindingResponse:
        kept = await self.writes.keep_finding(request.kind, check_keys(request.keys, "KeepFinding"))
        return pb.KeepFindingResponse(kind=kept.kind, keys=kept.keys, label=kept.label or "")

    @_rpc
    async def RebuildIndex(
        self, request: pb.RebuildIndexRequest, context: aio.ServicerContext
    ) -> pb.Operation:
        return operation(self.engine.start_rebuild(check_rebuild(request)))

    @_rpc
    async def GetOperation(
        self, request: pb.GetOperationRequest, context: aio.ServicerContext
    ) -> pb.Operation:
        return operation(self.engine.get_operation(check_operation_id(request.id)))


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
