"""Filters, thresholds, groups, batches, scrolling, counting, recommending and metadata
over gRPC: the edge checks and the use cases of those requests.

Why one module beside reads/writes: these requests share the parsed filter
(index/filters.py) and the table of every live item's columns it is applied to, and
they are answered from the same live searcher and store as Search.
"""

from __future__ import annotations

import base64
import bisect
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from google.protobuf import json_format

from featurebank.core.errors import InvalidInput, NotFound, shown
from featurebank.index import filters
from featurebank.index.searcher import to_scores
from featurebank.server.batching import run_in
from featurebank.server.hits import MAX_CANDIDATES
from featurebank.store import Store
from featurebank.store.metadata import check_user_meta
from featurebank.v1 import featurebank_pb2 as pb

if TYPE_CHECKING:
    from featurebank.index.searcher import Searcher
    from featurebank.server.reads import Hit, SearchJob

DEFAULT_SCROLL_LIMIT = 100
MAX_SCROLL_LIMIT = 10_000
MAX_SEARCH_BATCH = 256
MAX_EXAMPLES = 64  # positives plus negatives of one Recommend
MAX_METADATA_ITEMS = 10_000
GROUP_FIELDS = ("label",)  # besides meta.NAME
STRATEGIES = ("average", "best_score")


# ---- edge checks ---------------------------------------------------------------------------


def check_filter(text: str, where: str = "filter") -> filters.Node | None:
    """A request's filter string parsed (None when empty); errors name the position."""
    try:
        return filters.parse(text)
    except InvalidInput as e:
        raise InvalidInput(str(e).replace("filter", where, 1)) from None


def check_threshold(has: bool, value: float) -> float | None:
    if not has:
        return None
    if not np.isfinite(value):
        raise InvalidInput(f"score_threshold must be a finite number, got {value}")
    return float(value)


def check_group(group_by: str, group_size: int) -> tuple[str | None, int]:
    """(field, hits per group); group_size without group_by is an error, not ignored."""
    if not group_by:
        if group_size:
            raise InvalidInput("group_size needs group_by (label or meta.NAME)")
        return None, 1
    if group_by not in GROUP_FIELDS and not (group_by.startswith("meta.") and len(group_by) > 5):
        raise InvalidInput(f"group_by must be label or meta.NAME, got {shown(group_by)}")
    if group_size > 1024:
        raise InvalidInput(f"group_size={group_size} is out of range: use 1..1024 (0 = 1)")
    return group_by, group_size or 1


def struct_meta(struct: Any, key: str) -> dict[str, Any]:
    """A request's metadata Struct as the store's user map (values checked, named by key)."""
    value = json_format.MessageToDict(struct)
    return check_user_meta(key, value)


def check_metadata_request(request: pb.SetMetadataRequest) -> dict[str, dict[str, Any]]:
    if not request.items:
        raise InvalidInput("SetMetadata got no items")
    if len(request.items) > MAX_METADATA_ITEMS:
        raise InvalidInput(f"SetMetadata takes at most {MAX_METADATA_ITEMS} items per call")
    out: dict[str, dict[str, Any]] = {}
    for i, a in enumerate(request.items):
        if not a.key:
            raise InvalidInput(f"items[{i}].key is empty")
        if a.key in out:
            raise InvalidInput(f"items[{i}]: key {shown(a.key)} appears twice")
        out[a.key] = struct_meta(a.metadata, a.key)
    return out


def check_scroll(request: pb.ScrollRequest) -> tuple[int, str | None]:
    limit = request.limit or DEFAULT_SCROLL_LIMIT
    if limit > MAX_SCROLL_LIMIT:
        raise InvalidInput(f"limit={limit} is out of range: use 1..{MAX_SCROLL_LIMIT} (0 = 100)")
    return limit, decode_token(request.page_token)


def check_strategy(strategy: str) -> str:
    name = strategy or "average"
    if name not in STRATEGIES:
        raise InvalidInput(f"strategy must be one of {', '.join(STRATEGIES)}, got {shown(strategy)}")
    return name


# ---- page tokens -----------------------------------------------------------------------

_TOKEN_PREFIX = b"k1:"


def encode_token(last_key: str) -> str:
    """Opaque to clients: the last key returned (keys never change, so a page never repeats)."""
    return base64.urlsafe_b64encode(_TOKEN_PREFIX + last_key.encode()).decode()


def decode_token(token: str) -> str | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token.encode())
        if not raw.startswith(_TOKEN_PREFIX):
            raise ValueError
        return raw[len(_TOKEN_PREFIX):].decode()
    except (ValueError, UnicodeError):
        raise InvalidInput("page_token is not one this server gave out: pass next_page_token as it came") from None


# ---- the item table, once per store generation ---------------------------------------------


@dataclass
class _Snapshot:
    table: filters.Table
    order: np.ndarray  # positions of the table's rows in key order
    sorted_keys: list[str]
    matched: dict[filters.Node | None, np.ndarray]


class Tables:
    """The filter table of the live store and its key order, rebuilt when the store moves
    (one snapshot swapped whole, so a reader never mixes two generations)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snap: _Snapshot | None = None

    def snapshot(self, store: Store) -> _Snapshot:
        gen = int(store.generation)
        snap = self._snap
        if snap is not None and snap.table.generation == gen:
            return snap
        table = filters.Table.of_store(store)
        keys = table.column("key")
        order = np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)
        snap = _Snapshot(table, order, [keys[i] for i in order.tolist()], {})
        self._snap = snap
        return snap

    def get(self, store: Store) -> filters.Table:
        return self.snapshot(store).table

    def in_key_order(self, store: Store, where: filters.Node | None) -> tuple[_Snapshot, np.ndarray]:
        """(snapshot, positions into its sorted keys that pass `where`)."""
        snap = self.snapshot(store)
        with self._lock:
            found = snap.matched.get(where)
        if found is None:
            mask = np.ones(len(snap.table.ids), bool) if where is None else snap.table.mask(where)
            found = np.flatnonzero(mask[snap.order])
            with self._lock:
                snap.matched[where] = found
        return snap, found


@dataclass(frozen=True)
class Page:
    keys: list[str]
    next_token: str
    generation: int


def scroll_page(tables: Tables, store: Store, where: filters.Node | None, limit: int,
                after: str | None) -> Page:
    """One page of passing keys after `after`, in key order."""
    snap, passing = tables.in_key_order(store, where)
    keys = snap.sorted_keys
    start = 0 if after is None else bisect.bisect_right(keys, after)
    first = int(np.searchsorted(passing, start))
    chosen = passing[first : first + limit]
    page = [keys[int(i)] for i in chosen]
    more = first + limit < len(passing)
    return Page(page, encode_token(page[-1]) if more and page else "", snap.table.generation)


def page_items(store: Store, page: Page) -> Any:
    """The page's items as they are stored now (one deleted meanwhile is left out)."""
    gone = set(store.missing(page.keys)) if page.keys else set()
    keys = [k for k in page.keys if k not in gone]
    return store.get_by_keys(keys) if keys else None


def scroll_items(store: Store, page: Page, include_vectors: bool) -> list[pb.Item]:
    items = page_items(store, page)
    out: list[pb.Item] = []
    for i, key in enumerate([] if items is None else items.keys):
        item = pb.Item(key=key, label=items.labels[i] or "", split=items.splits[i])
        item.metadata.update(items.meta[i])
        if include_vectors:
            item.vector.values.extend(np.asarray(items.vectors[i], np.float32).tolist())
        out.append(item)
    return out


def count(tables: Tables, store: Store, where: filters.Node | None) -> tuple[int, int]:
    table = tables.get(store)
    return (len(table.ids) if where is None else int(table.mask(where).sum())), table.generation


# ---- recommend -------------------------------------------------------------------------


def average_query(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Qdrant's average_vector: avg(pos) + (avg(pos) - avg(neg)), or avg(pos) alone."""
    p = pos.mean(axis=0)
    return p if not len(neg) else p + (p - neg.mean(axis=0))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (x / (1.0 + np.abs(x)) + 1.0)


def best_scores(sim_pos: np.ndarray, sim_neg: np.ndarray) -> np.ndarray:
    """Qdrant's best_score: a candidate nearer a positive than every negative scores by its
    best positive (scaled to (0.5, 1)); otherwise minus its best negative (below 0)."""
    best_p = sim_pos.max(axis=0)
    best_n = sim_neg.max(axis=0) if len(sim_neg) else np.full_like(best_p, -np.inf)
    finite = np.finfo(np.float32).max
    p, n = np.clip(best_p, -finite, finite), np.clip(best_n, -finite, finite)
    return np.where(best_p > best_n, _sigmoid(p), -_sigmoid(n)).astype(np.float32)


def similarities(searcher: Searcher, examples: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(examples, candidates) similarity as the index scores it (same transform, metric)."""
    a, b = searcher.transform(examples), searcher.transform(vectors)
    if searcher.metric == "l2":
        dist = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2.0 * a @ b.T
    else:
        dist = a @ b.T
    return to_scores(dist.astype(np.float32), np.zeros(dist.shape, np.int64), searcher.metric)


async def set_metadata(writes: Any, mapping: dict[str, dict[str, Any]], replace: bool) -> dict[str, int]:
    """SetMetadata on the writer thread, ordered with the other writes."""

    def run() -> dict[str, int]:
        store: Store = writes.live.opened()
        missing = store.missing(list(mapping))
        if missing:
            listed = ", ".join(shown(k) for k in missing[:5])
            raise NotFound(f"unknown key{'s' if len(missing) > 1 else ''} {listed}")
        updated = int(store.set_meta(mapping, merge=not replace))
        writes.live.catch_up()
        return {"updated": updated, "store_generation": int(store.generation)}

    result: dict[str, int] = await run_in(writes.writer, run)
    return result


# ---- the calls -------------------------------------------------------------------------


def search_job(request: pb.SearchRequest, vector: np.ndarray, own: int | None,
               labels: tuple[str, ...], k: int, where: str = "") -> SearchJob:
    """A Search request's job (its input already turned into a vector)."""
    from featurebank.server.reads import SearchJob

    group_by, group_size = check_group(request.group_by, request.group_size)
    return SearchJob(
        vector, k, labels, own, request.include_metadata,
        where=check_filter(request.filter, f"{where}filter"),
        score_threshold=check_threshold(request.HasField("score_threshold"), request.score_threshold),
        group_by=group_by, group_size=group_size,
    )


class Queries:
    """Scroll, Count, Recommend and SetMetadata over the engine's live bank."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.tables = Tables()

    async def scroll(self, request: pb.ScrollRequest) -> pb.ScrollResponse:
        limit, after = check_scroll(request)
        where = check_filter(request.filter)
        store = self.engine.live.opened()

        def run() -> pb.ScrollResponse:
            page = scroll_page(self.tables, store, where, limit, after)
            items = scroll_items(store, page, request.include_vectors)
            return pb.ScrollResponse(items=items, next_page_token=page.next_token,
                                     store_generation=page.generation)

        response: pb.ScrollResponse = await run_in(self.engine.reads.compute, run)
        return response

    async def count(self, request: pb.CountRequest) -> pb.CountResponse:
        where = check_filter(request.filter)
        store = self.engine.live.opened()
        n, gen = await run_in(self.engine.reads.compute, count, self.tables, store, where)
        return pb.CountResponse(count=n, store_generation=gen)

    async def set_metadata(self, request: pb.SetMetadataRequest) -> pb.SetMetadataResponse:
        mapping = check_metadata_request(request)
        return pb.SetMetadataResponse(**await set_metadata(self.engine.writes, mapping, request.replace))

    def recommend(
        self, pos: np.ndarray, neg: np.ndarray, own: Sequence[int], strategy: str, k: int,
        where: filters.Node | None, threshold: float | None, include_metadata: bool,
    ) -> tuple[list[Hit], int]:
        searcher = self.engine.live.current().searcher
        hits = recommend(searcher, self.engine.live.opened(), pos, neg, own, strategy, k, where,
                         threshold, include_metadata)
        return hits, int(searcher.generation)


def recommend(
    searcher: Searcher, store: Store, pos: np.ndarray, neg: np.ndarray, own: Sequence[int],
    strategy: str, k: int, where: filters.Node | None, threshold: float | None,
    include_metadata: bool,
) -> list[Hit]:
    """Hits like the positives and unlike the negatives, the examples themselves left out."""
    from featurebank.server.reads import Hit

    mine = set(own)
    want = max(1, min(int(searcher.ntotal), k + len(mine), MAX_CANDIDATES))
    if strategy == "average":
        res = searcher.search(average_query(pos, neg)[None, :], want, where=where)
        ids, scores = res.ids[0], res.scores[0]
    else:  # best_score: candidates near each positive, rescored against every example
        res = searcher.search(pos, min(int(searcher.ntotal), want * 4), where=where)
        ids = np.unique(res.ids[res.ids >= 0])
        scores = np.zeros(0, np.float32)
        if ids.size:
            vectors = store.get(ids.astype(np.uint64)).vectors
            against = similarities(searcher, neg, vectors) if len(neg) else np.zeros((0, ids.size))
            scores = best_scores(similarities(searcher, pos, vectors), against)
            order = np.argsort(-scores, kind="stable")
            ids, scores = ids[order], scores[order]
    keep = [i for i in range(len(ids)) if ids[i] >= 0 and int(ids[i]) not in mine]
    if threshold is not None:
        keep = [i for i in keep if scores[i] >= threshold]
    keep = keep[:k]
    chosen = ids[keep].astype(np.uint64)
    if not len(chosen):
        return []
    items = store.get(chosen)
    return [
        Hit(items.keys[j], items.labels[j], float(scores[i]),
            dict(items.meta[j]) if include_metadata else None)
        for j, i in enumerate(keep)
    ]
