"""The Quality call: the data-quality pass over the served bank, as its message.

Runs on the engine's compute pool, over the live classifier, so the answer sees the
same index and labels as Classify; a pass never blocks writes. Each engine (one per
served bank) keeps its last pass (`classify.quality.Cache`): the next call applies
only the store's changes since that pass's generation.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import TYPE_CHECKING

from featurebank.server.responses import finding
from featurebank.server.validation import check_count
from featurebank.v1 import featurebank_pb2 as pb

if TYPE_CHECKING:
    from featurebank.classify.quality import Cache, Report
    from featurebank.server.engine import Engine

_caches: weakref.WeakKeyDictionary[Engine, Cache] = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


async def quality(engine: Engine, request: pb.QualityRequest) -> pb.QualityResponse:
    """Validate the request, run the pass on the compute pool, convert the report."""
    n = check_count(request.n, "n")
    precision = float(request.precision) if request.precision else None  # checked by the pass
    loop = asyncio.get_running_loop()
    report = await loop.run_in_executor(engine.compute, _run, engine, precision, n)
    return response(report)


def _run(engine: Engine, precision: float | None, n: int) -> Report:
    from featurebank.classify.quality import Cache

    with _caches_lock:
        cache = _caches.get(engine)
        if cache is None:
            cache = _caches[engine] = Cache()
    return cache.run(engine.live.current().classifier, precision=precision, limit=n)


def response(r: Report) -> pb.QualityResponse:
    """A `featurebank.classify.quality.Report` as its message."""
    d = r.duplicates
    out = pb.QualityResponse(
        items=r.items, labelled=r.labelled, has_labels=r.labels is not None,
        duplicate_threshold=d.threshold, outlier_cut=r.outlier_cut, counts=r.counts,
        seconds=r.seconds, index_generation=r.index_generation,
        labels_generation=r.labels_generation, incremental=r.changed is not None,
        changed_items=r.changed or 0,
        duplicates=[
            pb.DuplicateGroup(
                members=[pb.DuplicateMember(key=m.key, split=m.split, label=m.label or "")
                         for m in g.members],
                pairs=[pb.DuplicatePair(a=p.a, b=p.b, distance=p.distance, exact=p.exact,
                                        match=p.match)
                       for p in g.pairs],
                exact=g.exact,
            )
            for g in d.groups
        ],
        leaks=[
            pb.Leak(train=x.train, held_out=x.held_out, split=x.split, distance=x.distance,
                    exact=x.exact, match=x.match)
            for x in d.leaks
        ],
        outliers=[
            pb.Outlier(key=o.key, score=o.score, distance=o.distance,
                       neighbors=[pb.NearItem(key=k, distance=dist) for k, dist in o.neighbors])
            for o in r.outliers
        ],
        splits=[
            pb.SplitCheck(split=c.split, items=c.items, uncovered=c.uncovered,
                          uncovered_keys=c.uncovered_keys, label_distance=c.label_distance,
                          missing_labels=c.missing_labels, unseen_labels=c.unseen_labels)
            for c in r.splits
        ],
    )
    le = r.labels
    if le is not None:
        out.estimated_wrong = le.estimated_wrong
        out.classes.extend(
            pb.ClassEstimate(label=c.label, items=c.items, wrong=c.wrong) for c in le.classes
        )
        out.swaps.extend(pb.SwappedPair(a=s.a, b=s.b, count=s.count) for s in le.swaps)
        out.label_errors.extend(finding(f) for f in le.findings)
        out.label_candidates, out.label_selected = le.candidates, le.selected
        out.label_cut, out.label_estimated_precision = le.cut, le.estimated_precision
    return out
