"""Searching the live index generation, with labels held in memory.

Why this shape:
- The loaded index generation, the label table and the segment form one immutable
  *view*; a search takes the current view once and uses it from start to end, a
  refresh builds the next view and swaps the reference (one atomic assignment), so
  a search never sees half an update and neither waits for the other (a lock here
  made every search queue behind each write's swap).
- FAISS ids are store item ids, so labels come from the store's label table
  (one array, refreshed when the store's generation moves): a relabel is
  visible to the next query without touching the index.
- Items deleted from the store but still in the index (HNSW cannot remove) are
  filtered out at search time with an id selector.
- Items the store holds beyond the generation live in the view's mutable segment
  (index/segment.py), searched exactly beside the generation: a committed write is
  searchable at once, without an index file being written.
- OpenMP's thread count is per calling thread: each thread sets its own, so
  several server threads do not each use every core.

It is over 400 lines because the view, its refresh and the search that reads it must
be read together to see why a search never needs a lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import faiss
import numpy as np

from featurebank import store as store_mod
from featurebank.core.bank import Bank, current_generation
from featurebank.core.errors import DamagedFile, FailedPrecondition, InvalidInput, NotFound, shown
from featurebank.core.params import IndexParams
from featurebank.core.vocabulary import metric as metric_named
from featurebank.index import families, filters, rerank, stored_ids
from featurebank.index.cluster_scan import Planner
from featurebank.index.segment import Segment, member, merge
from featurebank.index.subset import TUNE_QUERIES, SubsetCache, SubsetIndex, outside_sample
from featurebank.index.transforms import as_vectors
from featurebank.index.views import (
    Generation,
    View,
    advanced,
    caught_up,
    codes_of,
    label_mask,
    load_generation,
    load_live_generation,
    make_view,
)
from featurebank.store import BankLike, Store

log = logging.getLogger(__name__)

SELECTOR_CACHE = 16
KEY_CACHE_MAX = 50_000  # hits' keys kept per searcher (a few MB)
KEYS_AFTER_MISSES = 16  # misses after which a generation that fits has all its keys read


class SearchResult:
    """Neighbours of each query: ids (n, k) int64 with -1 padding, scores higher = closer.

    `label_codes` are the codes that vote (-1 for unlabelled neighbours and for
    held-out test-split items, whose labels only score predictions, never make
    them); `labels` shows every neighbour's label. Both `labels` and `keys` are
    built on first access: a kNN vote only needs `label_codes`, keys cost a
    store lookup.
    """

    def __init__(
        self,
        ids: np.ndarray,
        scores: np.ndarray,
        label_codes: np.ndarray,
        vocabulary: list[str],
        key_lookup: Callable[[np.ndarray], dict[int, str]],
        display_codes: np.ndarray | None = None,
    ) -> None:
        self.ids = ids
        self.scores = scores
        self.label_codes = label_codes
        self.display_codes = label_codes if display_codes is None else display_codes
        self.vocabulary = vocabulary
        self._key_lookup = key_lookup
        self._labels: list[list[str | None]] | None = None
        self._keys: list[list[str]] | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def labels(self) -> list[list[str | None]]:
        if self._labels is None:
            vocab: list[str | None] = [*self.vocabulary, None]
            self._labels = [[vocab[c] for c in row] for row in self.display_codes.tolist()]
        return self._labels

    @property
    def keys(self) -> list[list[str]]:
        if self._keys is None:
            names = self._key_lookup(self.ids)
            self._keys = [[names.get(i, "") for i in row] for row in self.ids.tolist()]
        return self._keys


def drop_excluded(
    ids: np.ndarray, dist: np.ndarray, exclude: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's excluded id (leave-one-out), keeping the first k of the rest."""
    keep = ids != exclude[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, 1), np.take_along_axis(dist, order, 1)


def to_scores(dist: np.ndarray, ids: np.ndarray, metric: str) -> np.ndarray:
    """FAISS distances -> similarity scores (higher = closer); padding rows get -inf."""
    scores = metric_named(metric).scores(dist)
    scores[ids < 0] = -np.inf
    return scores.astype(np.float32, copy=False)


def check_k(k: object, available: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InvalidInput(f"k must be an integer, got {k!r}")
    if k <= 0:
        raise InvalidInput(f"k must be positive, got {k}")
    if available == 0:
        raise FailedPrecondition("the index holds no live items: add vectors and rebuild")
    if k > available:
        raise InvalidInput(f"k={k} is more than the {available} items in the index")
    return int(k)


class Searcher:
    """Thread-safe search over a bank's live index generation."""

    def __init__(
        self,
        bank: Bank,
        store: Store,
        owns_store: bool,
        threads: int | None = None,
        exact_fallback: bool = False,
    ) -> None:
        self.bank = bank
        self.store = store
        self._owns_store = owns_store
        self._refresh_mutex = threading.Lock()
        self._key_cache: dict[int, str] = {}  # id -> key of recent hits (see _keys)
        self._key_misses = (-1, 0)  # (generation, searches that missed the key cache)
        self._local = threading.local()
        self.threads = threads
        self._table: filters.Table | None = None
        self._table_mutex = threading.Lock()
        self._matched: dict[Any, np.ndarray] = {}
        self._subsets = SubsetCache()
        self._planner = Planner()  # flat generations whose data clusters skip far clusters
        try:
            gen, self.damaged = load_live_generation(bank)
        except DamagedFile as e:  # every generation damaged: the store still holds each vector
            if not exact_fallback:
                raise
            from featurebank.index.exact import exact_generation

            gen, self.damaged = exact_generation(bank, store, str(e)), [str(e)]
        self._check_spec(gen)
        self._view = make_view(gen, *caught_up(store, gen, None, None))

    @classmethod
    def load(
        cls, bank: BankLike, threads: int | None = None, exact_fallback: bool = False
    ) -> Searcher:
        """Open the live index of `bank` (FailedPrecondition if none was built yet).

        An open Store is used as it is (and stays open after close()); a path is
        opened read-only and closed with the searcher. `threads`: OpenMP threads per
        search call; None = all cores when called from the main thread, 1 from other
        threads (servers run many at once). `exact_fallback`: when no generation is
        intact, search exactly from the store (index/exact.py) instead of raising.
        """
        owns = not isinstance(bank, Store)
        store = bank if isinstance(bank, Store) else store_mod.open(bank, readonly=True)
        try:
            return cls(store.bank, store, owns, threads, exact_fallback)
        except BaseException:
            if owns:
                store.close()
            raise

    def close(self) -> None:
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_spec(self, gen: Generation) -> None:
        dim = int(self.store.spec.dim)
        if dim and dim != gen.dim:
            raise FailedPrecondition(
                f"index generation {gen.number} was built for dimension {gen.dim}, "
                f"but the store holds dimension {dim}: rebuild the index"
            )

    # -- what the view says --------------------------------------------------
    @property
    def generation(self) -> int:
        return self._view.gen.number

    @property
    def manifest(self) -> dict[str, Any]:
        return self._view.gen.manifest

    @property
    def dim(self) -> int:
        return self._view.gen.dim

    @property
    def metric(self) -> str:
        return self._view.gen.metric

    @property
    def ntotal(self) -> int:
        """Live items a search can return (the generation's and the segment's)."""
        return self._view.live_count

    @property
    def segment(self) -> Segment:
        """Live items not yet folded into the loaded generation."""
        return self._view.segment

    @property
    def stale_count(self) -> int:
        """Items the loaded generation holds that the store deleted (filtered at search)."""
        return int(self._view.stale.size)

    @property
    def vocabulary(self) -> list[str]:
        return self._view.labels.vocabulary

    @property
    def store_generation(self) -> int:
        return self._view.labels.store_generation

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """What the index stores for `vectors` (validated, transformed)."""
        gen = self._view.gen
        return gen.transform.apply(as_vectors(vectors, gen.dim, "vectors"))

    # -- refreshing ------------------------------------------------------------
    def refresh(self) -> None:
        """Pick up a new CURRENT index generation and label/deletion changes in the store."""
        self._refresh(index_too=True)

    def catch_up(self) -> None:
        """Make everything committed to the store searchable (labels, deletions, new items)."""
        self._refresh(index_too=False)

    def _refresh(self, index_too: bool) -> None:
        with self._refresh_mutex:
            self._refresh_locked(index_too)

    def _refresh_locked(self, index_too: bool) -> None:
        view = self._view
        gen = view.gen
        if index_too:
            try:
                live = current_generation(self.bank.indexes_dir)
                if live is not None and live != gen.number:
                    gen = load_generation(self.bank, live)
                    self._check_spec(gen)
            except DamagedFile as e:  # keep answering from the generation already loaded
                log.warning("%s; still serving index generation %d", e, view.gen.number)
                self.damaged = [str(e)]
                gen = view.gen
        same_gen = gen is view.gen
        if same_gen and int(self.store.generation) == view.labels.store_generation:
            return
        new = None
        if same_gen:
            with contextlib.suppress(NotFound):
                new = advanced(self.store, view)
        if new is None:
            labels, segment = caught_up(
                self.store, gen, view.labels, view.segment if same_gen else None
            )
            new = make_view(gen, labels, segment)
        self._view = new
        log.log(
            logging.DEBUG if same_gen else logging.INFO,
            "searcher now on index generation %d, store generation %d (%d pending)",
            gen.number, new.labels.store_generation, new.segment.size,
        )

    def _labels_current(self) -> None:
        """Catch up before a search, unless another thread is catching up right now.

        A writer catches up before it acknowledges a write, so a search skipping a
        catch-up in progress still sees every acknowledged write; it only does not
        wait for writes still being committed.
        """
        if int(self.store.generation) == self._view.labels.store_generation:
            return
        if self._refresh_mutex.acquire(blocking=False):
            try:
                self._refresh_locked(index_too=False)
            finally:
                self._refresh_mutex.release()

    # -- searching -------------------------------------------------------------
    def _set_threads(self) -> None:
        want = self.threads
        if want is None:
            main = threading.current_thread() is threading.main_thread()
            want = (os.cpu_count() or 1) if main else 1
        if getattr(self._local, "threads", None) != want:
            faiss.omp_set_num_threads(want)
            self._local.threads = want

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        labels: Sequence[str] | None = None,
        exclude_ids: np.ndarray | None = None,
        voters_only: bool = False,
        where: filters.Node | None = None,
    ) -> SearchResult:
        """k nearest live items of each row of `vectors`, optionally only items with `labels`.

        `exclude_ids` (one id per row) leaves each row's own item out (leave-one-out).
        `voters_only` searches only the items whose label votes (labelled, not held out), so
        the unlabelled majority of a few-shot bank never crowds the vote out.
        `where`: a parsed filter (index/filters.py); only items passing it are returned.
        """
        self._labels_current()
        self._set_threads()
        view = self._view
        x = as_vectors(vectors, view.gen.dim, "query vectors")
        k = check_k(k, view.live_count)
        exclude = None
        if exclude_ids is not None:
            exclude = np.asarray(exclude_ids, dtype=np.int64).reshape(-1)
            if exclude.shape[0] != x.shape[0]:
                raise InvalidInput(
                    f"exclude_ids has {exclude.shape[0]} ids for {x.shape[0]} queries"
                )
        held = view.gen.index_ids.size + view.segment.size
        kk = k + 1 if exclude is not None and k < held else k
        kc = kk * view.gen.rerank_factor or kk  # candidates asked of the index
        xt = view.gen.transform.apply(x)
        segment = view.segment
        if labels is not None or voters_only or where is not None:
            key, matching = self._matching(view, labels, voters_only, where)
            dist, ids = self._search_subset(view, xt, kc, matching, key)
            segment = self._segment_for(view, matching, key)
        else:
            dist, ids = self._search_all(view, xt, kc)
        if view.gen.rerank_factor:
            dist, ids = rerank.rerank(xt, ids, kk, self._stored(view.gen), view.gen.index.metric_type)
        if segment.size:
            scores, ids = merge((dist, ids), segment.search(xt, kk), kk, view.gen.metric)
        else:
            scores = to_scores(dist, ids, view.gen.metric)
        if exclude is not None:
            ids, scores = drop_excluded(ids, scores, exclude, k)
        ids, scores = ids[:, :k], scores[:, :k]
        votes, display = codes_of(view.labels, ids)
        return SearchResult(ids, scores, votes, view.labels.vocabulary, self._keys, display)

    def matching_ids(self, where: filters.Node | None) -> np.ndarray:
        """Sorted ids of the live items passing `where` (all when None), at the store's
        current generation (the table of columns is read once per store generation)."""
        table = self._table
        gen = int(self.store.generation)
        if table is None or table.generation != gen:
            with self._table_mutex:
                table = self._table
                if table is None or table.generation != gen:
                    table = self._table = filters.Table.of_store(self.store)
                    self._matched.clear()
        if where is None:
            return table.ids
        with self._table_mutex:
            found = self._matched.get((table.generation, where))
        if found is None:
            found = table.matching(where)
            with self._table_mutex:
                self._matched[(table.generation, where)] = found
                while len(self._matched) > SELECTOR_CACHE:
                    self._matched.pop(next(iter(self._matched)))
        return found

    def _matching(
        self,
        view: View,
        labels: Sequence[str] | None,
        voters_only: bool,
        where: filters.Node | None,
    ) -> tuple[Any, np.ndarray]:
        """(cache key, sorted live ids) of what a filtered search may return."""
        wanted = None if labels is None else label_codes(view, labels)
        passing = None if where is None else self.matching_ids(where)
        key = (None if wanted is None else tuple(wanted.tolist()), voters_only, where)

        def make() -> np.ndarray:
            ids = view.labels.ids
            mask = label_mask(view.labels.codes, view.labels.vote_codes, wanted, voters_only)
            ids = ids if mask is None else ids[mask]
            return ids if passing is None else ids[member(ids, passing)]

        matching: np.ndarray = cached(view, ("matching", *key), make)
        return key, matching

    def _segment_for(self, view: View, matching: np.ndarray, key: Any) -> Segment:
        """The part of the segment a filtered search may return (memoised per view)."""
        if view.segment.size == 0:
            return view.segment
        make = lambda: view.segment.subset(member(view.segment.ids, matching))  # noqa: E731
        segment: Segment = cached(view, ("segment", *key), make)
        return segment

    def _search_all(self, view: View, xt: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = view.gen.index
        if view.stale.size == 0:
            scan = self._planner.scan_for(view.gen.number, index, k, xt.shape[0])
            return index.search(xt, k) if scan is None else scan.search(xt, k)
        inner = cached(view, "not-stale", lambda: faiss.IDSelectorBatch(view.stale))
        sel = faiss.IDSelectorNot(inner)
        params, keep = search_params(view, sel, 1.0)
        dist, ids = index.search(xt, k, params=params)
        del keep
        return dist, ids

    def _search_wide(
        self, view: View, xt: np.ndarray, k: int, fraction: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every live item, exploring 1/fraction more (efSearch, nprobe): the candidates a
        filter of that selectivity keeps must be as exact as the unfiltered top k."""
        if view.stale.size:
            inner = cached(view, "not-stale", lambda: faiss.IDSelectorBatch(view.stale))
            sel: Any = faiss.IDSelectorNot(inner)
        else:
            sel = faiss.IDSelectorAll()
        params, keep = search_params(view, sel, fraction)
        dist, ids = view.gen.index.search(xt, k, params=params)
        del keep
        return dist, ids

    def _search_subset(
        self, view: View, xt: np.ndarray, k: int, matching: np.ndarray, key: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search only `matching` ids, planned by the filter's selectivity (filters.py):
        small sets, and any set of an exact (flat) index, are scanned exactly from a copy
        (a selector on a flat index scans all of it, one pair at a time); filters passing nearly everything fetch unfiltered
        candidates and keep those passing; the rest, and queries a probe left with fewer
        than k (a filter excluding the query's own region), search an IVF over just the
        matching items (index/subset.py), so recall holds whatever the filter lines up with.
        Sets too large to copy use a selector on the index itself.
        """
        make = lambda: matching[member(matching, view.gen.index_ids)]  # noqa: E731
        allowed: np.ndarray = cached(view, ("allowed", *key), make)
        indexed = int(view.gen.index_ids.size - view.stale.size)
        if allowed.size == indexed:
            return self._search_all(view, xt, k)  # every indexed item passes
        n = xt.shape[0]
        if allowed.size == 0:
            return np.full((n, k), np.nan, np.float32), np.full((n, k), -1, np.int64)
        fraction = allowed.size / max(indexed, 1)

        def selected(xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            sel = cached(view, ("sel", *key), lambda: faiss.IDSelectorBatch(allowed))
            params, keep = search_params(view, sel, fraction)
            found = view.gen.index.search(xs, k, params=params)
            del keep
            return found

        def inside(xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """Only matching items: a subset index when its copy fits, else a selector."""
            if allowed.size * xs.shape[1] * 4 > filters.SUBSET_MAX_BYTES:
                return selected(xs)
            make = lambda: subset_index(view, allowed)  # noqa: E731
            return self._subsets.get(view.gen.number, allowed, make).search(xs, k)

        flat = view.gen.family.name == "flat"
        if flat and allowed.size * xt.shape[1] * 4 > filters.SUBSET_MAX_BYTES:
            return selected(xt)  # an exact scan either way; a selector copies nothing
        if flat or allowed.size <= filters.EXACT_MAX:  # a copy of the subset scans in BLAS
            exact = lambda: exact_subset(view, allowed)  # noqa: E731
            return cached(view, ("exact", *key), exact)(xt, k)
        kp = min(filters.probe_k(k, fraction), indexed)
        if not kp:
            return inside(xt)
        dist, ids = self._search_wide(view, xt, kp, fraction)
        ids, dist, done = filters.first_passing(ids, dist, allowed, k)
        if not done.all():
            rest = np.flatnonzero(~done)
            dist[rest], ids[rest] = inside(xt[rest])
        return dist, ids

    def _stored(self, gen: Generation) -> rerank.VectorsOf:
        """The store's vectors of candidate ids, in `gen`'s space (what RStore re-ranks on)."""

        def read(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            found, vectors = self.store.vectors_of(ids.astype(np.uint64))
            return found, gen.transform.apply(as_vectors(vectors, gen.dim, "stored vectors"))

        return read

    def _keys(self, ids: np.ndarray) -> dict[int, str]:
        """id -> key of hits. An id names one key for good (a replaced item gets a new id),
        so hits' keys are kept: a store lookup per search would cost more than the search
        on a small bank. A generation that fits the cache has all its keys read at its
        KEYS_AFTER_MISSES-th miss: a lookup decodes whole blocks of keys anyway, and a bank
        that gets a tenth of a server's queries would otherwise miss for thousands of
        searches (a bank asked once, then closed, never holds them all)."""
        wanted = np.unique(ids[ids >= 0]).tolist()
        cache = self._key_cache
        found = {i: key for i in wanted if (key := cache.get(i)) is not None}
        missing = [i for i in wanted if i not in found]
        if missing:  # unknown to the store (deleted before it was ever a hit): left out
            asked = np.array(missing, dtype=np.uint64)
            gen = self._view.gen
            number, misses = self._key_misses
            self._key_misses = (gen.number, misses + 1 if number == gen.number else 1)
            if self._key_misses == (gen.number, KEYS_AFTER_MISSES) and gen.index_ids.size <= KEY_CACHE_MAX:
                asked = np.union1d(asked, gen.index_ids.astype(np.uint64))
            fetched = self.store.keys_of(asked)
            found.update({i: fetched[i] for i in missing if i in fetched})
            if len(cache) + len(fetched) > KEY_CACHE_MAX:
                cache.clear()
            cache.update(fetched)
        return found


def cached(view: View, key: Any, make: Callable[[], Any]) -> Any:
    """Per-view memo for selectors and filtered subsets (views are immutable)."""
    with view.cache_lock:
        if key in view.cache:
            view.cache.move_to_end(key)
            return view.cache[key]
    value = make()
    with view.cache_lock:
        view.cache[key] = value
        while len(view.cache) > SELECTOR_CACHE:
            view.cache.popitem(last=False)
    return value


def label_codes(view: View, labels: Sequence[str]) -> np.ndarray:
    """Codes of the named labels; an unknown name is an error naming it."""
    if isinstance(labels, str):
        labels = [labels]
    vocab = {name: i for i, name in enumerate(view.labels.vocabulary)}
    unknown = [name for name in labels if name not in vocab]
    if unknown:
        listed = ", ".join(shown(name) for name in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise InvalidInput(f"unknown labels {listed}{more}: the bank has {len(vocab)} labels")
    return np.array(sorted({vocab[name] for name in labels}), dtype=np.int32)


def exact_subset(
    view: View, allowed: np.ndarray
) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    """Exact search over a small filtered subset (graph search degrades under tight filters)."""
    vectors = stored_ids.reconstruct(view.gen.index, allowed)
    flat = faiss.IndexFlat(vectors.shape[1], view.gen.index.metric_type)
    flat.add(vectors)

    def run(xt: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dist, pos = flat.search(xt, k)
        ids = np.where(pos >= 0, allowed[np.maximum(pos, 0)], -1).astype(np.int64)
        return dist, ids

    return run


def subset_index(view: View, allowed: np.ndarray) -> SubsetIndex:
    """An IVF over the filter's indexed items, tuned on items passing and failing it."""
    index, manifest = view.gen.index, view.gen.manifest
    probes = outside_sample(view.gen.index_ids, allowed, TUNE_QUERIES)
    return SubsetIndex(
        allowed,
        stored_ids.reconstruct(index, allowed),
        index.metric_type,
        stored_ids.reconstruct(index, probes) if probes.size else np.zeros((0, index.d), np.float32),
        float(manifest.get("target_recall") or IndexParams.target_recall),
        int(manifest.get("k") or IndexParams.k),
    )


def search_params(view: View, sel: faiss.IDSelector, fraction: float) -> tuple[Any, list[Any]]:
    """Per-call parameters carrying the selector down every wrapper, and what must stay alive.

    An IndexIDMap2 only translates the selector of the outermost parameters, so the
    translation to internal positions is done here for the inner ones (an IVF holding
    store ids takes the selector as it is). Tight selectors get more exploration
    (efSearch/nprobe), as fewer visited items count.
    """
    gen = view.gen
    tuned = {k: int(v) for k, v in gen.manifest.get("params", {}).items()}
    translated = stored_ids.selector(gen.index, sel)
    inner = stored_ids.searching(gen.index)
    params, made = families.search_parameters(inner, translated, tuned, 1.0 / max(fraction, 1e-6))
    return params, [sel, translated, *made]
