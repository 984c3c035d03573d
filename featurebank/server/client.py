"""A small blocking Python client for featurebank.v1.FeatureBank.

Wraps the generated stub so applications pass images, vectors or keys and get
protobuf responses back; gRPC errors become `RemoteError` (a FeaturebankError
carrying the status code), so callers handle one hierarchy.

Over 400 lines because it mirrors the whole service, one method per RPC, and every
method shares the same call wrapper and input conversion; split by RPC, nothing is gained.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from featurebank.core.errors import FeaturebankError, InvalidInput, NotFound
from featurebank.core.files import read_named_text
from featurebank.server.wire import MODE_VALUES, STRATEGY_VALUES
from featurebank.v1 import featurebank_pb2 as pb
from featurebank.v1 import featurebank_pb2_grpc as pb_grpc

T = TypeVar("T")

ImageLike = bytes | str | os.PathLike[str] | np.ndarray
MiB = 1 << 20
BANK_FIELD = 100  # the number of the `bank` field every per-bank request carries


class RemoteError(FeaturebankError):
    """A call the server refused or failed; `code` is its grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, details: str, method: str = "") -> None:
        super().__init__(f"{method + ': ' if method else ''}{code.name}: {details}")
        self.code = code
        self.details = details
        self.grpc_code = code.name


def _image_bytes(image: ImageLike) -> bytes:
    """An encoded image file, its path, or an image array (H, W[, C]) sent as lossless PNG."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, np.ndarray):
        from featurebank.embedder.images import png_bytes

        return png_bytes(image)
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.is_file():
            raise NotFound(f"image file {path} does not exist")
        return path.read_bytes()
    raise InvalidInput(
        f"image must be bytes, a file path or an image array, got {type(image).__name__}"
    )


def as_input(value: pb.Input | ImageLike | Sequence[float]) -> pb.Input:
    """An Input from an Input, image bytes, a path, an image array, or a 1-d vector."""
    if isinstance(value, pb.Input):
        return value
    if isinstance(value, np.ndarray | list | tuple) and np.ndim(value) == 1:
        return make_input(vector=value)
    return make_input(image=value)  # type: ignore[arg-type]


def make_input(
    image: ImageLike | None = None, vector: Sequence[float] | np.ndarray | None = None,
    key: str | None = None,
) -> pb.Input:
    """An Input from exactly one of image (bytes or path), vector or key."""
    given = sum(x is not None for x in (image, vector, key))
    if given != 1:
        raise InvalidInput("give exactly one of image, vector or key")
    if image is not None:
        return pb.Input(image=_image_bytes(image))
    if vector is not None:
        return pb.Input(vector=pb.Vector(values=np.asarray(vector, dtype=np.float32).ravel()))
    return pb.Input(key=str(key))


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The bearer token in a file: its first line that is not blank or a # comment.

    A file (readable only by its owner) keeps the token out of the process list,
    where `--token VALUE` would show it to every user of the machine.
    """
    for line in read_named_text("token file", path).splitlines():
        token = line.strip()
        if token and not token.startswith("#"):
            return token
    raise InvalidInput(f"token file {path} holds no token")


class FeatureBankClient:
    """Blocking client; use as a context manager or call `close()`."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | bytes | None = None,
        *,
        tls: bool | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls_server_name: str | None = None,
        timeout: float | None = 60.0,
        max_message_bytes: int = 16 * MiB,
        bank: str = "",
    ) -> None:
        self.target = target
        self.bank = bank  # the bank (or alias) every request names; "" = the server's default
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        use_tls = tls if tls is not None else (tls_ca is not None or tls_cert is not None)
        if use_tls:
            ca = tls_ca if isinstance(tls_ca, bytes) or tls_ca is None else Path(tls_ca).read_bytes()
            creds = grpc.ssl_channel_credentials(
                root_certificates=ca,
                private_key=Path(tls_key).read_bytes() if tls_key else None,
                certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
            )
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.FeatureBankStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> FeatureBankClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def for_bank(self, bank: str) -> FeatureBankClient:
        """This client naming `bank` on every request, over the same channel (closing
        either closes both)."""
        view = copy.copy(self)
        view.bank = bank
        return view

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        if self.bank:
            request = self._named(request)
        try:
            return method(
                request, timeout=timeout if timeout is not None else self.timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            details = e.details() if hasattr(e, "details") else str(e)
            name = getattr(method, "_method", b"")
            label = name.decode().rsplit("/", 1)[-1] if isinstance(name, bytes) else ""
            raise RemoteError(code, details or "", label) from None

    def _named(self, request: Any) -> Any:
        """`request` (or each message of a stream) naming this client's bank, unless it names one."""
        if isinstance(request, Iterable) and not hasattr(request, "DESCRIPTOR"):
            return (self._named(item) for item in request)
        field = request.DESCRIPTOR.fields_by_name.get("bank")
        if field is not None and field.number == BANK_FIELD and not request.bank:
            request.bank = self.bank  # (SetAliasRequest.bank, the alias's target, is another field)
        return request

    # ------------------------------------------------------------------ reads

    def classify(
        self,
        image: ImageLike | None = None,
        *,
        vector: Sequence[float] | np.ndarray | None = None,
        key: str | None = None,
        mode: str | None = None,
        k: int = 0,
        top_n: int = 0,
        include_neighbors: bool = False,
        abstain_below: float = 0.0,
        filter: str = "",  # noqa: A002 - the request field's name
        timeout: float | None = None,
        min_store_generation: int = 0,  # read-your-writes: an Upsert's store_generation
    ) -> pb.ClassifyResponse:
        request = pb.ClassifyRequest(
            input=make_input(image, vector, key), mode=_mode(mode), k=k, top_n=top_n,
            include_neighbors=include_neighbors, abstain_below=abstain_below, filter=filter,
            min_store_generation=min_store_generation,
        )
        return self._call(self.stub.Classify, request, timeout)

    def classify_batch(
        self,
        inputs: Iterable[pb.Input | ImageLike | Sequence[float]],
        *,
        mode: str | None = None,
        k: int = 0,
        top_n: int = 0,
        include_neighbors: bool = False,
        abstain_below: float = 0.0,
        filter: str = "",  # noqa: A002 - the request field's name
        timeout: float | None = None,
        min_store_generation: int = 0,  # read-your-writes: an Upsert's store_generation
    ) -> list[pb.ClassifyResponse]:
        request = pb.ClassifyBatchRequest(
            inputs=[as_input(i) for i in inputs], mode=_mode(mode), k=k, top_n=top_n,
            include_neighbors=include_neighbors, abstain_below=abstain_below, filter=filter,
            min_store_generation=min_store_generation,
        )
        return list(self._call(self.stub.ClassifyBatch, request, timeout).results)

    def search(
        self,
        image: ImageLike | None = None,
        *,
        vector: Sequence[float] | np.ndarray | None = None,
        key: str | None = None,
        k: int = 0,
        labels: Sequence[str] = (),
        include_metadata: bool = False,
        filter: str = "",  # noqa: A002 - the request field's name
        score_threshold: float | None = None,
        group_by: str = "",
        group_size: int = 0,
        timeout: float | None = None,
        min_store_generation: int = 0,  # read-your-writes: an Upsert's store_generation
    ) -> pb.SearchResponse:
        request = search_request(
            make_input(image, vector, key), k=k, labels=labels, include_metadata=include_metadata,
            filter=filter, score_threshold=score_threshold, group_by=group_by, group_size=group_size,
        )
        request.min_store_generation = min_store_generation
        return self._call(self.stub.Search, request, timeout)

    def search_batch(
        self, requests: Iterable[pb.SearchRequest], timeout: float | None = None
    ) -> list[pb.SearchBatchResult]:
        """Many searches in one call (see `search_request`); each result holds its
        response or its own error."""
        request = pb.SearchBatchRequest(requests=list(requests))
        return list(self._call(self.stub.SearchBatch, request, timeout).results)

    def recommend(
        self,
        positives: Iterable[pb.Input | ImageLike | Sequence[float]],
        negatives: Iterable[pb.Input | ImageLike | Sequence[float]] = (),
        *,
        strategy: str = "average",
        k: int = 0,
        filter: str = "",  # noqa: A002 - the request field's name
        score_threshold: float | None = None,
        include_metadata: bool = False,
        timeout: float | None = None,
    ) -> pb.SearchResponse:
        """Items like the positives and unlike the negatives (pb.Input(key=...) for stored items)."""
        request = pb.RecommendRequest(
            positives=[as_input(i) for i in positives], negatives=[as_input(i) for i in negatives],
            strategy=strategy, k=k, filter=filter, score_threshold=score_threshold,
            include_metadata=include_metadata,
        )
        return self._call(self.stub.Recommend, request, timeout)

    def scroll(
        self,
        filter: str = "",  # noqa: A002 - the request field's name
        *,
        limit: int = 0,
        page_token: str = "",
        include_vectors: bool = False,
        timeout: float | None = None,
    ) -> pb.ScrollResponse:
        """One page of items in key order; pass `next_page_token` back for the next."""
        request = pb.ScrollRequest(
            filter=filter, limit=limit, page_token=page_token, include_vectors=include_vectors
        )
        return self._call(self.stub.Scroll, request, timeout)

    def count(self, filter: str = "", timeout: float | None = None) -> int:  # noqa: A002
        return int(self._call(self.stub.Count, pb.CountRequest(filter=filter), timeout).count)

    def set_metadata(
        self, metadata: Mapping[str, Mapping[str, Any]], replace: bool = False,
        timeout: float | None = None,
    ) -> pb.SetMetadataResponse:
        """Set fields of items' user metadata (None removes a field); `replace` the whole map."""
        items = []
        for key, fields in metadata.items():
            a = pb.MetadataAssignment(key=key)
            a.metadata.update(dict(fields))
            items.append(a)
        request = pb.SetMetadataRequest(items=items, replace=replace)
        return self._call(self.stub.SetMetadata, request, timeout)

    def embed(self, image: ImageLike, timeout: float | None = None) -> np.ndarray:
        response = self._call(self.stub.Embed, pb.EmbedRequest(image=_image_bytes(image)), timeout)
        return np.asarray(response.vector.values, dtype=np.float32)

    def info(self, timeout: float | None = None) -> pb.GetInfoResponse:
        return self._call(self.stub.GetInfo, pb.GetInfoRequest(), timeout)

    def suggest(
        self, n: int = 0, strategy: str = "margin", label: str | None = None,
        timeout: float | None = None, filter: str = "",
    ) -> pb.SuggestResponse:
        """Unlabelled items (passing `filter`) ranked by how much a label would help
        (strategy margin|entropy|diverse)."""
        request = pb.SuggestRequest(n=n, strategy=_strategy(strategy), label=label or "",
                                    filter=filter)  # fmt: skip
        return self._call(self.stub.Suggest, request, timeout)

    def audit(self, n: int = 0, timeout: float | None = None, filter: str = "") -> pb.AuditResponse:
        """Labelled items (passing `filter`) whose label the bank doubts, most confident first."""
        return self._call(self.stub.Audit, pb.AuditRequest(n=n, filter=filter), timeout)

    def quality(
        self, precision: float = 0.0, n: int = 0, timeout: float | None = None
    ) -> pb.QualityResponse:
        """Wrong labels, duplicates, leaks and outliers of the served bank."""
        return self._call(self.stub.Quality, pb.QualityRequest(precision=precision, n=n), timeout)

    def thumbnails(self, keys: Sequence[str], timeout: float | None = None) -> dict[str, bytes]:
        """JPEG thumbnail per key; keys without one are left out."""
        response = self._call(
            self.stub.GetThumbnails, pb.GetThumbnailsRequest(keys=list(keys)), timeout
        )
        return {t.key: t.jpeg for t in response.thumbnails if t.jpeg}

    def report(self, timeout: float | None = None) -> pb.GetReportResponse:
        """The latest evaluation report (its page, metrics and folder name)."""
        return self._call(self.stub.GetReport, pb.GetReportRequest(), timeout)

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """SERVING, NOT_SERVING or SERVICE_UNKNOWN (health needs no token)."""
        response = self._call(
            self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Poll health until SERVING (a server loading a large bank takes a while)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.health(timeout=2.0)
                if last == "SERVING":
                    return
            except RemoteError as e:
                last = str(e)
            time.sleep(0.05)
        raise RemoteError(grpc.StatusCode.DEADLINE_EXCEEDED, f"not serving after {timeout}s: {last}")

    # ------------------------------------------------------------------ banks

    def banks(self, timeout: float | None = None) -> list[pb.BankState]:
        """Every bank the server serves, with its state (opens none of them)."""
        return list(self._call(self.stub.GetInfo, pb.GetInfoRequest(), timeout).banks)

    def create_bank(
        self, name: str, *, dim: int = 0, backbone: str = "", weights: str = "",
        dtype: str = "", image_size: int = 0, timeout: float | None = None, **spec: Any,
    ) -> pb.BankState:
        """A new bank on the server: of `dim` imported vectors, or of `backbone`'s features."""
        message = pb.Spec(backbone=backbone, weights=weights, dim=dim, dtype=dtype,
                          input_height=image_size, input_width=image_size, **spec)
        return self._call(self.stub.CreateBank, pb.CreateBankRequest(name=name, spec=message), timeout)

    def drop_bank(self, name: str, force: bool = False, timeout: float | None = None) -> None:
        """Remove a bank and its folder (refused while replicas follow it, unless `force`)."""
        self._call(self.stub.DropBank, pb.DropBankRequest(name=name, force=force), timeout)

    def set_alias(self, alias: str, bank: str, timeout: float | None = None) -> str:
        """Point `alias` at `bank` ("" removes it); what it pointed to before."""
        request = pb.SetAliasRequest(alias=alias, bank=bank)
        return self._call(self.stub.SetAlias, request, timeout).previous

    # ------------------------------------------------------------------ writes

    def upsert(
        self, items: Iterable[pb.UpsertItem | Mapping[str, Any]], timeout: float | None = None
    ) -> pb.UpsertResponse:
        """Items as UpsertItem or dicts {key, image|vector, label?, split?, uri?, metadata?}."""
        return self._call(self.stub.Upsert, _upsert_stream(items), timeout)

    def set_labels(
        self, labels: Mapping[str, str | None], timeout: float | None = None
    ) -> pb.SetLabelsResponse:
        request = pb.SetLabelsRequest(
            labels=[pb.LabelAssignment(key=k, label=v or "") for k, v in labels.items()]
        )
        return self._call(self.stub.SetLabels, request, timeout)

    def delete(
        self, keys: Sequence[str], ignore_missing: bool = False, timeout: float | None = None
    ) -> pb.DeleteResponse:
        request = pb.DeleteRequest(keys=list(keys), ignore_missing=ignore_missing)
        return self._call(self.stub.Delete, request, timeout)

    def set_splits(
        self, splits: Mapping[str, str], timeout: float | None = None
    ) -> pb.SetSplitsResponse:
        """Move items to other splits (train, val, test or none)."""
        request = pb.SetSplitsRequest(
            splits=[pb.SplitAssignment(key=k, split=v) for k, v in splits.items()]
        )
        return self._call(self.stub.SetSplits, request, timeout)

    def keep_finding(
        self, kind: str, keys: Sequence[str], timeout: float | None = None
    ) -> pb.KeepFindingResponse:
        """Remember a Quality finding as kept, so later calls do not list it again:
        ("label", [key]), ("duplicate", [a, b]) (a leak too) or ("outlier", [key])."""
        request = pb.KeepFindingRequest(kind=kind, keys=list(keys))
        return self._call(self.stub.KeepFinding, request, timeout)

    def rebuild_index(
        self,
        *,
        factory: str | None = None,
        metric: str | None = None,
        transform: str | None = None,
        target_recall: float | None = None,
        memory_budget: str | None = None,
        k: int | None = None,
        allow_below_target: bool = False,
        ondisk: bool | None = None,
        retrain_head: bool = False,
        head_hidden: int | None = None,
        head_epochs: int | None = None,
        wait: bool = False,
        poll_s: float = 0.2,
        timeout: float | None = None,
    ) -> pb.Operation:
        """Start a rebuild; with `wait`, poll until it is done and return the final state.

        `head_hidden` / `head_epochs` / `ondisk` left None keep the live values."""
        request = pb.RebuildIndexRequest(
            factory=factory or "", metric=metric or "", transform=transform or "",
            target_recall=target_recall or 0.0, memory_budget=memory_budget or "", k=k or 0,
            retrain_head=retrain_head, head_hidden=head_hidden, head_epochs=head_epochs,
            allow_below_target=allow_below_target, ondisk=ondisk,
        )
        op = self._call(self.stub.RebuildIndex, request, timeout)
        if wait:
            op = self.wait_operation(op.id, poll_s=poll_s, timeout=timeout)
        return op

    def get_operation(self, op_id: str, timeout: float | None = None) -> pb.Operation:
        return self._call(self.stub.GetOperation, pb.GetOperationRequest(id=op_id), timeout)

    def wait_operation(
        self, op_id: str, poll_s: float = 0.2, timeout: float | None = None
    ) -> pb.Operation:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            op = self.get_operation(op_id)
            if op.done:
                return op
            if deadline is not None and time.monotonic() > deadline:
                raise RemoteError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"operation {op_id} still running ({op.stage}, {op.progress:.0%})",
                )
            time.sleep(poll_s)


def search_request(
    input: pb.Input,  # noqa: A002 - the request field's name
    *,
    k: int = 0,
    labels: Sequence[str] = (),
    include_metadata: bool = False,
    filter: str = "",  # noqa: A002 - the request field's name
    score_threshold: float | None = None,
    group_by: str = "",
    group_size: int = 0,
) -> pb.SearchRequest:
    """A SearchRequest (for `search` and `search_batch`)."""
    return pb.SearchRequest(
        input=input, k=k, labels=list(labels), include_metadata=include_metadata, filter=filter,
        score_threshold=score_threshold, group_by=group_by, group_size=group_size,
    )


def _mode(mode: str | None) -> pb.Mode.ValueType:
    if mode is None or mode == "":
        return pb.MODE_UNSPECIFIED
    try:
        return MODE_VALUES[mode.lower()]
    except KeyError:
        raise InvalidInput(f"unknown mode {mode!r}: use one of {', '.join(MODE_VALUES)}") from None


def _strategy(strategy: str) -> pb.Strategy.ValueType:
    try:
        return STRATEGY_VALUES[strategy.lower()]
    except KeyError:
        raise InvalidInput(
            f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGY_VALUES)}"
        ) from None


def _upsert_stream(items: Iterable[pb.UpsertItem | Mapping[str, Any]]) -> Iterator[pb.UpsertItem]:
    for item in items:
        if isinstance(item, pb.UpsertItem):
            yield item
            continue
        out = pb.UpsertItem(
            key=str(item["key"]), label=item.get("label") or "", split=item.get("split") or "",
            uri=item.get("uri") or "", thumbnail=bool(item.get("thumbnail")),
        )
        if item.get("metadata"):
            out.metadata.update(dict(item["metadata"]))
        if item.get("image") is not None:
            out.image = _image_bytes(item["image"])
        elif item.get("vector") is not None:
            out.vector.values.extend(np.asarray(item["vector"], dtype=np.float32).ravel().tolist())
        yield out
