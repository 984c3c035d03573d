"""The FeatureBank servicer: validation at the edge, the engine's plain functions below.

Every RPC goes through `_rpc`, which records metrics and turns exceptions into
status codes via `server.status` (so nothing reaches the client as UNKNOWN).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np
from google.protobuf import struct_pb2
from grpc import aio

from featurebank.classify.abstain import check_precision
from featurebank.classify.head_generations import hybrid_mode
from featurebank.core.errors import FeaturebankError, InvalidInput, Overloaded, shown
from featurebank.core.vocabulary import MODES, SPLITS, SUGGEST_STRATEGIES
from featurebank.protos.featurebank.v1 import featurebank_pb2 as pb
from featurebank.protos.featurebank.v1 import featurebank_pb2_grpc as pb_grpc
from featurebank.server.engine import (
    DEFAULT_SEARCH_K,
    DEFAULT_TOP_N,
    MAX_K,
    Classified,
    ClassifyJob,
    Engine,
    Hit,
    Labelling,
    Operation,
    RebuildParams,
    SearchJob,
    UpsertRow,
    image_meta,
)
from featurebank.server.limits import StreamBytes, TooMany, UpsertBudget
from featurebank.server.metrics import Metrics
from featurebank.server.status import to_status
from featurebank.server.wire import MODE_NAMES, MODE_VALUES, STRATEGY_NAMES
from featurebank.store.codec import MAX_LABEL_BYTES

Req = TypeVar("Req")
Resp = TypeVar("Resp")

MAX_TOP_N = 1000
MAX_BATCH_INPUTS = 4096
MAX_KEY_BYTES = 1024
MAX_UPSERT_ITEMS = 100_000
MAX_THUMBNAILS = 1000
DEFAULT_RANKED = 100
MAX_RANKED = 10_000
MAX_LABEL_FILTER = 1024  # labels in one Search filter
MAX_OPERATION_ID = 64  # operation ids are 32 hex digits
RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata of RESOURCE_EXHAUSTED from a busy writer


class Unavailable(FeaturebankError):
    """The server is starting or stopping; the client may retry."""

    grpc_code = "UNAVAILABLE"


# --------------------------------------------------------------------- validation


def check_vector(values: Sequence[float], dim: int, where: str = "vector") -> np.ndarray:
    """A float32 vector of the bank's dimension with only finite values."""
    if len(values) == 0:
        raise InvalidInput(f"{where} is empty")
    if len(values) != dim:
        raise InvalidInput(f"{where} has {len(values)} values; the bank's vectors have dim {dim}")
    v = np.asarray(values, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
        raise InvalidInput(f"{where} has NaN or infinity at position {int(bad[0])}")
    return v


def check_k(k: int, default: int | None, where: str = "k") -> int | None:
    if k == 0:
        return default
    if not 1 <= k <= MAX_K:
        raise InvalidInput(f"{where}={k} is out of range: use 1..{MAX_K} (0 = default)")
    return k


def check_top_n(top_n: int) -> int:
    if top_n == 0:
        return DEFAULT_TOP_N
    if top_n > MAX_TOP_N:
        raise InvalidInput(f"top_n={top_n} is out of range: use 1..{MAX_TOP_N} (0 = {DEFAULT_TOP_N})")
    return top_n


def check_count(n: int, where: str) -> int:
    """How many items a ranking returns: 0 means DEFAULT_RANKED."""
    if n == 0:
        return DEFAULT_RANKED
    if n > MAX_RANKED:
        raise InvalidInput(f"{where}={n} is out of range: use 1..{MAX_RANKED} (0 = {DEFAULT_RANKED})")
    return n


def check_mode(mode: int) -> str | None:
    if mode == pb.MODE_UNSPECIFIED:
        return None
    try:
        return MODE_NAMES[mode]
    except KeyError:
        known = ", ".join(m.upper() for m in MODES)
        raise InvalidInput(f"unknown mode {mode}: use {known}") from None


def check_key(key: str, where: str = "key") -> str:
    if not key:
        raise InvalidInput(f"{where} is empty")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidInput(f"{where} is longer than {MAX_KEY_BYTES} bytes")
    return key


def check_split(split: str, where: str) -> str:
    split = split or "none"
    if split not in SPLITS:
        raise InvalidInput(f"{where}: split {shown(split)} is not one of {', '.join(SPLITS)}")
    return split


def check_label_filter(labels: Sequence[str]) -> tuple[str, ...]:
    """A Search label filter: at most MAX_LABEL_FILTER labels, each a label the store could hold."""
    if len(labels) > MAX_LABEL_FILTER:
        raise InvalidInput(f"labels filter has {len(labels)} labels; at most {MAX_LABEL_FILTER}")
    for i, label in enumerate(labels):
        if not label:
            raise InvalidInput(f"labels filter: label {i} is empty")
        if len(label.encode()) > MAX_LABEL_BYTES:
            raise InvalidInput(
                f"labels filter: label {i} ({shown(label)}) is longer than {MAX_LABEL_BYTES} bytes"
            )
    return tuple(labels)


def to_struct(data: dict[str, Any] | None) -> struct_pb2.Struct:
    """A Struct from any JSON-able dict (numpy scalars and paths become plain values)."""
    s = struct_pb2.Struct()
    if data:
        s.update(json.loads(json.dumps(data, default=_jsonable)))
    return s


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _number(x: Any) -> float:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return 0.0
    return f if math.isfinite(f) else 0.0


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
        if not request.inputs:
            raise InvalidInput("ClassifyBatch got no inputs")
        if len(request.inputs) > MAX_BATCH_INPUTS:
            raise InvalidInput(
                f"ClassifyBatch got {len(request.inputs)} inputs; at most {MAX_BATCH_INPUTS}"
            )
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
        return [_classified(c) for c in await self.engine.classify(jobs)]

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
        return pb.SearchResponse(neighbors=[_hit(h) for h in hits], index_generation=gen)

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
        return _info(await self.engine.info())

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
            findings=[_finding(f) for f in done.items],
            index_generation=done.index_generation,
            labels_generation=done.labels_generation,
        )

    @_rpc
    async def GetThumbnails(
        self, request: pb.GetThumbnailsRequest, context: aio.ServicerContext
    ) -> pb.GetThumbnailsResponse:
        if not request.keys:
            raise InvalidInput("GetThumbnails got no keys")
        if len(request.keys) > MAX_THUMBNAILS:
            raise InvalidInput(
                f"GetThumbnails got {len(request.keys)} keys; at most {MAX_THUMBNAILS}"
            )
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
        return _operation(self.engine.start_rebuild(params))

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
        return _operation(self.engine.get_operation(request.id))


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


# --------------------------------------------------------------------- responses


def _classified(c: Classified) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(
        labels=[
            pb.LabelProbability(label=label, probability=p)
            for label, p in zip(c.labels, c.probs, strict=True)
        ],
        neighbors=[pb.Neighbor(key=k, label=lb or "", score=s) for k, lb, s in c.neighbors],
        index_generation=c.index_generation,
        head_generation=c.head_generation,
        mode=MODE_VALUES.get(c.mode, pb.MODE_UNSPECIFIED),
        abstained=c.abstained,
    )


def _hit(h: Hit) -> pb.Neighbor:
    n = pb.Neighbor(key=h.key, label=h.label or "", score=h.score)
    if h.meta is not None:
        n.metadata.CopyFrom(to_struct(h.meta))
    return n


def _finding(f: Any) -> pb.Finding:
    """An audit finding (featurebank.classify.audit.Finding) as its message."""
    return pb.Finding(
        key=f.key, label=f.label, suggested=f.suggested, confidence=f.confidence,
        p_label=f.p_label, p_suggested=f.p_suggested, has_head=f.head_p_suggested is not None,
        head_p_label=f.head_p_label or 0.0, head_p_suggested=f.head_p_suggested or 0.0,
        neighbors=[pb.Neighbor(key=nb.key, label=nb.label or "", score=nb.score) for nb in f.neighbors],
    )


def _operation(op: Operation) -> pb.Operation:
    out = pb.Operation(
        id=op.id, kind=op.kind, done=op.done, progress=op.progress, stage=op.stage,
        started=op.started, finished=op.finished,
        index_generation=op.index_generation, head_generation=op.head_generation,
    )
    if op.error is not None:
        out.error.code, out.error.message = op.error
    if op.done and op.result:
        out.result.CopyFrom(to_struct(op.result))
    return out


def _info(info: dict[str, Any]) -> pb.GetInfoResponse:
    spec = info["spec"]
    size = spec.input_size or (0, 0)
    out = pb.GetInfoResponse(
        bank=info["bank"],
        spec=pb.Spec(
            backbone=spec.backbone, weights=spec.weights,
            input_height=int(size[0]), input_width=int(size[1]),
            resize=spec.resize, preprocessing=spec.preprocessing, pooling=spec.pooling,
            dim=int(spec.dim), dtype=spec.dtype, layer=spec.layer or "",
        ),
        count=info["count"],
        labelled=info["labelled"],
        store_generation=info["store_generation"],
        labels_generation=info["labels_generation"],
        labels=info["labels"],
        default_mode=MODE_VALUES.get(info["default_mode"] or "", pb.MODE_UNSPECIFIED),
    )
    index = info["index"]
    if index:
        m = index["manifest"]
        out.index.generation = index["generation"]
        out.index.ntotal = index["ntotal"]
        out.index.factory = str(m.get("factory", ""))
        out.index.metric = str(m.get("metric", ""))
        out.index.transform = str(m["transform"]["spec"])
        out.index.recall = _number(m.get("recall_at_k"))  # None when too few items to measure
        out.index.store_generation = int(m["store_generation"])
        out.index.manifest.CopyFrom(to_struct(m))
        out.index.target_recall = float(m.get("target_recall") or 0.0)
        out.index.target_reached = bool(m.get("target_reached"))
        out.index.pending_items = index["pending_items"]
        out.index.checkpoint_error = index["checkpoint_error"] or ""
    device = info["device"]
    out.device.description = device["description"]
    if "kind" in device:
        out.device.kind = device["kind"]
        out.device.devices.extend(device["devices"])
        out.device.precision = device["precision"]
        out.device.batch_size = device["batch_size"]
        for name, work in device["work_by_device"].items():
            out.device.work.add(device=name, batches=work["batches"], images=work["images"])
    head = info["head"]
    if head:
        m = head["manifest"]
        out.head.generation = head["generation"]
        out.head.stale = head["stale"]
        out.head.metrics.CopyFrom(to_struct(m.get("cv_metrics") or m.get("val_metrics", {})))
        out.head.hybrid_acts_as = MODE_VALUES[hybrid_mode(m)]
        out.head.manifest.CopyFrom(to_struct(m))
    return out
