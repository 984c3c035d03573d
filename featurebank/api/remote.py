"""A bank served over gRPC, answering the same calls with the same results as one in process.

Wraps featurebank.server.client.FeatureBankClient: inputs become `Input` messages (image
arrays as lossless PNG, so the server embeds exactly the pixels given), answers become
the dataclasses of featurebank.api.results.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict

from featurebank.api.base import FeatureBank, check_options
from featurebank.api.inputs import IMAGES, KEYS, VECTORS, Query, check_dim, encoded
from featurebank.api.results import (
    Classification,
    Duplicate,
    Finding,
    Hits,
    Info,
    Item,
    Kept,
    Leak,
    Neighbor,
    Outlier,
    Page,
    Published,
    Quality,
    SplitCheck,
    Suggestion,
    Written,
)
from featurebank.core.errors import InvalidInput
from featurebank.server.client import FeatureBankClient, RemoteError, make_input
from featurebank.server.wire import MODE_NAMES
from featurebank.v1 import featurebank_pb2 as pb

# One request carries at most this many inputs or bytes (well under the 16 MiB message limit).
CHUNK_ITEMS = 256
CHUNK_BYTES = 4 << 20
# Calls with one input each (Search, Embed) go out this many at a time: the server batches them.
CONCURRENT_CALLS = 8
INDEX_PARAMS = ("factory", "metric", "transform", "target_recall", "memory_budget", "k",
                "allow_below_target", "ondisk")  # fmt: skip
HEAD_PARAMS = {"hidden": "head_hidden", "epochs": "head_epochs"}  # HeadParams -> RebuildIndex


class RemoteBank(FeatureBank):
    """A bank behind a featurebank server (`featurebank.connect`): see FeatureBank.

    `client` is the underlying FeatureBankClient, for what only gRPC has (health,
    thumbnails, reports, operations).
    """

    def __init__(self, client: FeatureBankClient) -> None:
        self.client = client
        self.address = client.target
        self._dim: int | None = None

    def __repr__(self) -> str:
        bank = f", bank={self.client.bank!r}" if self.client.bank else ""
        return f"RemoteBank({self.address!r}{bank})"

    @property
    def dim(self) -> int:
        """The dimension of the bank's vectors (asked once: a bank's spec never changes)."""
        if self._dim is None:
            self._dim = int(self.client.info().spec.dim)
        return self._dim

    # ------------------------------------------------------------------ reads

    def _inputs(self, q: Query) -> list[dict[str, Any]]:
        """One `make_input` argument per input: image bytes, a vector or a key."""
        if q.kind == IMAGES:
            return [{"image": encoded(item)} for item in q.images]
        if q.kind == VECTORS:
            return [{"vector": v} for v in self._vectors(q)]
        return [{"key": k} for k in q.keys]

    def _embed(self, q: Query) -> np.ndarray:
        if q.kind == KEYS:
            raise InvalidInput(
                "a server does not return stored vectors: embed images or vectors, "
                "or search by featurebank.keys(...)"
            )
        if q.kind == VECTORS:
            return self._vectors(q)
        return np.stack(_each(lambda item: self.client.embed(encoded(item)), q.images))

    def _search(
        self, q: Query, k: int, labels: list[str] | None, options: dict[str, Any]
    ) -> list[Hits]:
        def one(given: dict[str, Any]) -> Hits:
            response = self.client.search(
                **given, k=k, labels=labels or (), filter=options["filter"],
                score_threshold=options["score_threshold"], group_by=options["group_by"] or "",
                group_size=options["group_size"] if options["group_by"] else 0,
                include_metadata=options["include_metadata"],
            )
            return Hits([_neighbor(n) for n in response.neighbors], response.index_generation)

        return _each(one, self._inputs(q))

    def _recommend(self, pos: Query, neg: Query | None, options: dict[str, Any]) -> Hits:
        negatives = [] if neg is None else [make_input(**g) for g in self._inputs(neg)]
        r = self.client.recommend(
            [make_input(**g) for g in self._inputs(pos)], negatives, strategy=options["strategy"],
            k=options["k"], filter=options["filter"], score_threshold=options["score_threshold"],
            include_metadata=options["include_metadata"],
        )
        return Hits([_neighbor(n) for n in r.neighbors], r.index_generation)

    def _scroll(self, filter_text: str, limit: int, token: str, vectors: bool) -> Page:
        r = self.client.scroll(filter_text, limit=limit, page_token=token, include_vectors=vectors)
        items = [
            Item(i.key, i.label or None, i.split, MessageToDict(i.metadata),
                 list(i.vector.values) if vectors else None)
            for i in r.items
        ]
        return Page(items, r.next_page_token or None, int(r.store_generation))

    def _count(self, filter_text: str) -> int:
        return self.client.count(filter_text)

    def _set_metadata(self, metadata: dict[str, dict[str, Any]], replace: bool) -> Written:
        r = self.client.set_metadata(metadata, replace=replace)
        return Written(r.store_generation, updated=r.updated)

    def _classify(self, q: Query, options: dict[str, Any]) -> list[Classification]:
        out: list[Classification] = []
        for chunk in _chunks([make_input(**given) for given in self._inputs(q)]):
            responses = self.client.classify_batch(
                chunk, mode=options["mode"], k=options["k"] or 0, top_n=options["top_n"],
                include_neighbors=options["include_neighbors"],
                abstain_below=options["abstain_below"] or 0.0, filter=options["filter"],
            )
            out.extend(_classification(r) for r in responses)
        return out

    def _suggest(self, n: int, strategy: str, label: str | None, filter: str) -> list[Suggestion]:
        response = self.client.suggest(n, strategy=strategy, label=label, filter=filter)
        return [
            Suggestion(s.key, s.score, [p.label for p in s.labels], [p.probability for p in s.labels])
            for s in response.suggestions
        ]

    def _audit(self, n: int, filter: str) -> list[Finding]:
        return [_finding(f) for f in self.client.audit(n, filter=filter).findings]

    def _quality(self, n: int, precision: float | None) -> Quality:
        return _quality(self.client.quality(precision=precision or 0.0, n=n))

    def _keep(self, kind: str, keys: list[str]) -> Kept:
        kept = self.client.keep_finding(kind, keys)
        return Kept(kept.kind, list(kept.keys), kept.label or None)

    def info(self) -> Info:
        """What the server says of its bank (GetInfo), in the same form as a bank in process."""
        r = self.client.info()
        s = r.spec
        self._dim = int(s.dim)
        return Info(
            bank=r.bank,
            spec={
                "backbone": s.backbone, "weights": s.weights,
                "input_size": [s.input_height, s.input_width] if s.input_height else None,
                "resize": s.resize, "preprocessing": s.preprocessing, "pooling": s.pooling,
                "dim": int(s.dim), "dtype": s.dtype, "layer": s.layer or None,
            },
            dim=int(s.dim),
            count=int(r.count),
            labelled=int(r.labelled),
            labels=list(r.labels),
            store_generation=int(r.store_generation),
            labels_generation=int(r.labels_generation),
            index_generation=int(r.index.generation) or None,
            head_generation=int(r.head.generation) or None,
            default_mode=MODE_NAMES.get(r.default_mode),
        )

    # ------------------------------------------------------------------ writes

    def _upsert(
        self, q: Query, keys: list[str], labels: list[str | None] | None, splits: list[str] | None,
        metadata: list[Mapping[str, Any] | None] | None,
    ) -> Written:
        items: list[dict[str, Any]] = []
        data: list[Any] = (
            [encoded(i) for i in q.images] if q.kind == IMAGES else list(self._vectors(q))
        )
        field = "image" if q.kind == IMAGES else "vector"
        for i, (key, value) in enumerate(zip(keys, data, strict=True)):
            items.append({"key": key, field: value, "label": labels[i] if labels else None,
                          "split": splits[i] if splits else None,
                          "metadata": metadata[i] if metadata else None})  # fmt: skip
        added = replaced = 0
        store_gen, index_gen = 0, 0
        for chunk in _chunks(items):
            r = self.client.upsert(chunk)
            added, replaced = added + r.added, replaced + r.replaced
            store_gen, index_gen = r.store_generation, r.index_generation
        return Written(store_gen, added=added, replaced=replaced, index_generation=index_gen or None)

    def _vectors(self, q: Query) -> np.ndarray:
        assert q.vectors is not None
        check_dim(q.vectors, self.dim)
        return q.vectors

    def _set_labels(self, labels: dict[str, str | None]) -> Written:
        r = self.client.set_labels(labels)
        return Written(r.store_generation, updated=r.updated)

    def _delete(self, keys: list[str], ignore_missing: bool) -> Written:
        r = self.client.delete(keys, ignore_missing=ignore_missing)
        return Written(r.store_generation, deleted=r.deleted)

    def build_index(self, **params: Any) -> Published:
        """RebuildIndex, waited for: the server keeps answering while it builds."""
        unknown = sorted(set(params) - set(INDEX_PARAMS))
        if unknown:
            raise InvalidInput(f"unknown index parameter(s): {', '.join(unknown)}")
        if params.get("memory_budget") is not None:
            params["memory_budget"] = str(params["memory_budget"])
        return self._rebuild(**params)

    def train_head(self, **params: Any) -> Published:
        """RebuildIndex with a head retrained (the index is rebuilt too, with its live params).

        A server sets `hidden` and `epochs` of the head; the rest keep the live head's values.
        """
        unknown = sorted(set(params) - set(HEAD_PARAMS))
        if unknown:
            raise InvalidInput(
                f"a server trains the head with {' and '.join(HEAD_PARAMS)} only, "
                f"not {', '.join(unknown)}"
            )
        return self._rebuild(retrain_head=True, **{HEAD_PARAMS[k]: v for k, v in params.items()})

    def _rebuild(self, **request: Any) -> Published:
        op = self.client.rebuild_index(**request)
        op = self.client.wait_operation(op.id)
        if op.error.code:
            code = getattr(grpc.StatusCode, op.error.code, grpc.StatusCode.UNKNOWN)
            raise RemoteError(code, op.error.message, "RebuildIndex")
        return Published(
            int(op.index_generation) or None, int(op.head_generation) or None,
            MessageToDict(op.result),
        )

    def close(self) -> None:
        """Close the connection."""
        self.client.close()


def _finding(f: pb.Finding) -> Finding:
    return Finding(
        f.key, f.label, f.suggested, f.confidence, f.p_label, f.p_suggested,
        f.head_p_label if f.has_head else None, f.head_p_suggested if f.has_head else None,
        [_neighbor(nb) for nb in f.neighbors],
    )


def _quality(r: pb.QualityResponse) -> Quality:
    return Quality(
        items=r.items, labelled=r.labelled,
        estimated_wrong=r.estimated_wrong if r.has_labels else None,
        wrong_per_class={c.label: c.wrong for c in r.classes},
        swapped=[(s.a, s.b, s.count) for s in r.swaps],
        label_errors=[_finding(f) for f in r.label_errors],
        duplicates=[
            Duplicate([m.key for m in g.members], [m.split for m in g.members], g.exact,
                      min(p.distance for p in g.pairs), max(p.match for p in g.pairs))
            for g in r.duplicates
        ],
        leaks=[Leak(x.train, x.held_out, x.split, x.distance, x.exact, x.match) for x in r.leaks],
        outliers=[Outlier(o.key, o.score, o.distance, [(nb.key, nb.distance) for nb in o.neighbors])
                  for o in r.outliers],
        splits=[SplitCheck(c.split, c.items, c.uncovered, list(c.uncovered_keys), c.label_distance,
                           list(c.missing_labels), list(c.unseen_labels)) for c in r.splits],
        counts=dict(r.counts), index_generation=r.index_generation,
        labels_generation=r.labels_generation, seconds=r.seconds,
    )


def _neighbor(n: pb.Neighbor) -> Neighbor:
    meta = MessageToDict(n.metadata) if n.HasField("metadata") else None
    return Neighbor(n.key, n.label or None, n.score, meta)


def _classification(r: pb.ClassifyResponse) -> Classification:
    labels = [p.label for p in r.labels]
    probs = [p.probability for p in r.labels]
    return Classification(
        label="unknown" if r.abstained or not labels else labels[0],
        probability=probs[0] if probs else 0.0,
        labels=labels,
        probabilities=probs,
        abstained=r.abstained,
        mode=MODE_NAMES.get(r.mode, ""),
        index_generation=int(r.index_generation),
        head_generation=int(r.head_generation) or None,
        neighbors=[_neighbor(n) for n in r.neighbors],
    )


def _each(call: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """`call` on every item, a few calls in flight at once, results in the items' order."""
    if len(items) == 1:
        return [call(items[0])]
    with ThreadPoolExecutor(min(CONCURRENT_CALLS, len(items)), thread_name_prefix="fb-call") as pool:
        return list(pool.map(call, items))


def _chunks(items: list[Any]) -> Iterator[list[Any]]:
    """Requests of at most CHUNK_ITEMS inputs and about CHUNK_BYTES."""
    chunk: list[Any] = []
    size = 0
    for item in items:
        n = item.ByteSize() if hasattr(item, "ByteSize") else _size(item)
        if chunk and (len(chunk) >= CHUNK_ITEMS or size + n > CHUNK_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += n
    if chunk:
        yield chunk


def _size(item: dict[str, Any]) -> int:
    value = item.get("image")
    return len(value) if value is not None else 4 * len(item["vector"])


def connect(
    target: str,
    *,
    token: str | None = None,
    tls: bool | str | os.PathLike[str] = False,
    timeout: float | None = 60.0,
    bank: str = "",
    **options: Any,
) -> RemoteBank:
    """A client of the featurebank server at `target` ("host:port").

    `token`: the bearer token the server asks for; `tls`: True for TLS with the system's
    roots, or the path of a CA certificate (PEM) to trust; `timeout`: seconds per call;
    `bank`: the bank (or alias) to use on a server of many banks ("": its default bank);
    `options`: FeatureBankClient's (tls_cert, tls_key, tls_server_name, max_message_bytes).
    """
    if not isinstance(target, str) or ":" not in target:
        raise InvalidInput(f"connect takes 'host:port', got {target!r}")
    fixed = {"self", "target", "token", "tls", "tls_ca", "timeout", "bank"}
    check_options(options, set(inspect.signature(FeatureBankClient).parameters) - fixed, "connect")
    ca = None if isinstance(tls, bool) else tls
    client = FeatureBankClient(target, token=token, tls_ca=ca, tls=bool(tls), timeout=timeout,
                               bank=bank, **options)  # fmt: skip
    return RemoteBank(client)
