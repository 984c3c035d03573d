"""The engine's results as proto messages (one function per message)."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np
from google.protobuf import struct_pb2

from featurebank.classify.published_heads import hybrid_mode
from featurebank.server.indexing import Operation
from featurebank.server.reads import Hit
from featurebank.server.wire import MODE_VALUES
from featurebank.v1 import featurebank_pb2 as pb

if TYPE_CHECKING:
    from featurebank.classify.audit import Finding
    from featurebank.classify.classifier import Prediction
    from featurebank.classify.suggest import Suggestion


def prediction(p: Prediction) -> pb.ClassifyResponse:
    """The classifier's answer as it is: its labels, neighbours, mode and generations."""
    return pb.ClassifyResponse(
        labels=[
            pb.LabelProbability(label=label, probability=prob)
            for label, prob in zip(p.labels, p.probs, strict=True)
        ],
        neighbors=[pb.Neighbor(key=n.key, label=n.label or "", score=n.score) for n in p.neighbors],
        index_generation=p.index_generation,
        head_generation=p.head_generation or 0,  # 0: the mode used no head
        mode=MODE_VALUES[p.mode],
        abstained=p.abstained,
    )


def suggestion(s: Suggestion) -> pb.Suggestion:
    return pb.Suggestion(
        key=s.key, score=s.score,
        labels=[
            pb.LabelProbability(label=label, probability=p)
            for label, p in zip(s.labels, s.probs, strict=True)
        ],
    )


def hit(h: Hit) -> pb.Neighbor:
    n = pb.Neighbor(key=h.key, label=h.label or "", score=h.score)
    if h.meta is not None:
        n.metadata.CopyFrom(to_struct(h.meta))
    return n


def finding(f: Finding) -> pb.Finding:
    """An audit finding (featurebank.classify.audit.Finding) as its message."""
    return pb.Finding(
        key=f.key, label=f.label, suggested=f.suggested, confidence=f.confidence,
        p_label=f.p_label, p_suggested=f.p_suggested, has_head=f.head_p_suggested is not None,
        head_p_label=f.head_p_label or 0.0, head_p_suggested=f.head_p_suggested or 0.0,
        neighbors=[pb.Neighbor(key=nb.key, label=nb.label or "", score=nb.score) for nb in f.neighbors],
    )


def operation(op: Operation) -> pb.Operation:
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


def info_response(info: dict[str, Any]) -> pb.GetInfoResponse:
    spec = info["spec"]
    size = spec.input_size or (0, 0)
    out = pb.GetInfoResponse(
        bank=info["bank"],
        spec=pb.Spec(
            backbone=spec.identity()["backbone"], weights=spec.weights,  # never a server path
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
    out.index.damaged = info["damaged"]["index"]
    out.head.damaged = info["damaged"]["head"]
    if "replica" in info:  # only a read replica reports how far behind it is
        out.replica.CopyFrom(pb.ReplicaInfo(**info["replica"]))
    return out

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
