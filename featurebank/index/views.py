"""The immutable views a Searcher searches, and how they follow the store.

A view is one loaded index generation, the store's label table at one store
generation, and the mutable segment (index/segment.py) of live items the
generation lacks. `advanced` moves a view forward by the store's change log in
time proportional to the changes (appends and deletions); `caught_up` rebuilds
labels and segment from the store's live ids when only that will do (relabels,
new label names, a compacted change log, a new generation).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from featurebank.core.bank import Bank, load_newest_intact
from featurebank.core.errors import DamagedFile, FailedPrecondition, FeaturebankError, NotFound
from featurebank.core.integrity import read_json
from featurebank.core.vocabulary import HELD_OUT_SPLIT
from featurebank.index import rerank, stored_ids
from featurebank.index.families import Family, family_of, set_params
from featurebank.index.segment import Segment, Spare, appended, member
from featurebank.index.transforms import Transform, as_vectors
from featurebank.store import Store

INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"


@dataclass
class Generation:
    """One loaded index generation (immutable once loaded)."""

    number: int
    directory: Path
    manifest: dict[str, Any]
    index: faiss.Index
    transform: Transform
    index_ids: np.ndarray  # sorted int64 ids held by the index
    family: Family  # what kind of index it is (flat, hnsw, ivf, other)
    rerank_factor: int = 0  # candidates per result re-ranked from the store (0: none)

    @property
    def metric(self) -> str:
        return str(self.manifest["metric"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])


@dataclass
class Labels:
    """The store's label table at one store generation."""

    store_generation: int
    ids: np.ndarray  # sorted int64 ids of live items
    codes: np.ndarray  # int32, -1 = unlabelled
    vocabulary: list[str]
    vote_codes: np.ndarray  # codes, with -1 for held-out (test split) items
    spare: dict[str, Spare] = field(default_factory=dict, repr=False, compare=False)


@dataclass
class View:
    """A generation with the labels it is searched with, and what follows from both."""

    gen: Generation
    labels: Labels
    segment: Segment  # live store items the generation does not hold
    stale: np.ndarray  # ids in the index that the store no longer has
    live_count: int  # live items a search can return (generation and segment)
    cache: OrderedDict[Any, Any] = field(default_factory=OrderedDict)
    cache_lock: threading.Lock = field(default_factory=threading.Lock)


def read_manifest(directory: Path) -> dict[str, Any]:
    """An index generation's manifest (DamagedFile when missing or unreadable)."""
    return read_json(directory / MANIFEST_FILE, "the index manifest")


def index_ids(index: faiss.Index, directory: Path | None = None) -> np.ndarray:
    """Sorted store ids the index holds (`directory`: its generation folder, if read)."""
    return stored_ids.ids_of(index, directory)


def load_generation(bank: Bank, number: int) -> Generation:
    """Read one index generation from disk; DamagedFile naming a file that cannot be read."""
    directory = bank.indexes_dir / str(number)
    if not directory.is_dir():
        raise DamagedFile(f"index generation {directory} is missing")
    manifest = read_manifest(directory)
    try:
        index = stored_ids.read(directory / INDEX_FILE)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise DamagedFile(f"{directory / INDEX_FILE} is damaged ({reason})") from None
    if not isinstance(index, faiss.IndexIDMap2) and not stored_ids.in_lists(index):
        raise DamagedFile(f"{directory / INDEX_FILE} is not an id-mapped featurebank index")
    params = {k: int(v) for k, v in manifest.get("params", {}).items()}
    if params:
        set_params(index, params)
    return Generation(
        number=int(directory.name),
        directory=directory,
        manifest=manifest,
        index=index,
        transform=Transform.load(directory),
        index_ids=index_ids(index, directory),
        family=family_of(index),
        rerank_factor=rerank.factor(manifest),
    )


def load_live_generation(bank: Bank) -> tuple[Generation, list[str]]:
    """The live index generation, or the newest intact one when it is damaged.

    Returns it with what was found damaged on the way ([] normally); FailedPrecondition
    when no index was ever built, DamagedFile when none is intact.
    """
    found = load_newest_intact(bank.indexes_dir, lambda n: load_generation(bank, n), "index")
    if found is None:
        raise FailedPrecondition(f"no index yet in {bank.root}: build one first")
    _, gen, damaged = found
    return gen, damaged


def load_labels(store: Store) -> Labels:
    """The label table; test-split items keep their labels for display but never vote."""
    generation = int(store.generation)
    ids, codes, vocabulary = store.label_table()
    ids = np.asarray(ids, dtype=np.int64)
    codes = np.asarray(codes, dtype=np.int32)
    vote_codes = codes
    held = np.asarray(store.ids_in_split(HELD_OUT_SPLIT), dtype=np.int64)
    if held.size:
        vote_codes = np.where(np.isin(ids, held), -1, codes).astype(np.int32)
    return Labels(generation, ids, codes, list(vocabulary), vote_codes)


def make_view(gen: Generation, labels: Labels, segment: Segment) -> View:
    stale = gen.index_ids[~member(gen.index_ids, labels.ids)]
    return View(gen, labels, segment, stale, int(gen.index_ids.size - stale.size) + segment.size)


def segment_reader(store: Store, gen: Generation) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Reads stored items as the generation indexes them: (ids, transformed vectors)."""

    def read(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        items = store.get(ids.astype(np.uint64))
        vectors = as_vectors(items.vectors, gen.dim, "stored vectors")
        return np.asarray(items.ids, dtype=np.int64), gen.transform.apply(vectors)

    return read


def advanced(store: Store, view: View) -> View | None:
    """The view moved forward by the store's change log, in time proportional to the changes.

    None when only a full reload will do: a relabel, a label new to the vocabulary,
    or a change log compacted past the view's generation.
    """
    labels, gen = view.labels, view.gen
    try:
        changes = store.changes_since(labels.store_generation)
    except FeaturebankError:
        return None
    if changes.relabelled.size:
        return None
    added = np.asarray(changes.added, dtype=np.int64)
    deleted = np.asarray(changes.deleted, dtype=np.int64)
    if added.size and labels.ids.size and added.min() <= labels.ids[-1]:
        return None
    same = labels.vote_codes is labels.codes  # no held-out items: one array serves both
    ids, codes, votes = labels.ids, labels.codes, labels.vote_codes
    if deleted.size:
        keep = ~member(ids, deleted)
        ids, codes = ids[keep], codes[keep]
        votes = codes if same else votes[keep]
    seg_ids = np.zeros(0, np.int64)
    seg_vectors = np.zeros((0, view.segment.vectors.shape[1]), np.float32)
    spare: dict[str, Spare] = {}
    if added.size:
        items = store.get(added.astype(np.uint64))  # NotFound: deleted meanwhile (caller retries)
        vocab = {name: i for i, name in enumerate(labels.vocabulary)}
        if any(lab is not None and lab not in vocab for lab in items.labels):
            return None
        new_codes = np.array([-1 if lab is None else vocab[lab] for lab in items.labels], np.int32)
        held = np.array([sp == HELD_OUT_SPLIT for sp in items.splits], dtype=bool)
        grow = labels.spare if not deleted.size else {}
        ids, spare["ids"] = appended(ids, added, grow.get("ids"))
        old_codes = codes
        codes, spare["codes"] = appended(codes, new_codes, grow.get("codes"))
        if same and not held.any():
            votes = codes
        else:
            old_votes = old_codes if same else votes
            new_votes = np.where(held, -1, new_codes).astype(np.int32)
            votes, spare["votes"] = appended(old_votes, new_votes, grow.get("votes"))
        fresh = ~member(added, gen.index_ids)
        seg_ids = added[fresh]
        if seg_ids.size:
            vectors = as_vectors(items.vectors[fresh], gen.dim, "stored vectors")
            seg_vectors = gen.transform.apply(vectors)
    new_labels = Labels(int(changes.generation), ids, codes, labels.vocabulary, votes,
                        spare if added.size else {})
    segment = view.segment.applied(seg_ids, seg_vectors, deleted)
    gone = deleted[member(deleted, gen.index_ids)] if deleted.size else deleted
    stale = np.union1d(view.stale, gone) if gone.size else view.stale
    new = View(gen, new_labels, segment, stale, int(gen.index_ids.size - stale.size) + segment.size)
    if not deleted.size and seg_ids.size == added.size:  # appended, none of them indexed
        tail = slice(labels.ids.size, None)
        new.cache = grown_memo(view, added, codes[tail], votes[tail])
    return new


def grown_memo(
    old: View, added: np.ndarray, codes: np.ndarray, votes: np.ndarray
) -> OrderedDict[Any, Any]:
    """What of `old`'s memo (index/searcher.py `cached`) still holds once `added` ids
    (with their label and vote codes) were appended, none deleted, relabelled or indexed.

    Why: every commit makes a new view, and at a few hundred writes a second each search
    would otherwise rebuild its filtered id sets, O(bank) each, from nothing. Entries:
    ("matching", wanted, voters_only, where) the live ids a search may return, grown by
    the added ids that pass (in place where it can, `segment.appended`, its capacity kept
    as ("spare", "matching", ...)); ("allowed" | "sel" | "exact", ...) those of them the
    index holds, unchanged; "not-stale", unchanged. Entries with a metadata filter
    (`where`) and the segment's subsets are made again.
    """
    with old.cache_lock:
        entries = dict(old.cache)
    memo: OrderedDict[Any, Any] = OrderedDict()
    for key, value in entries.items():
        unfiltered = isinstance(key, tuple) and key[-1] is None
        if key == "not-stale" or (unfiltered and key[0] in ("allowed", "sel", "exact")):
            memo[key] = value
        elif unfiltered and key[0] == "matching":
            mask = label_mask(codes, votes, key[1], key[2])
            memo[key], memo[("spare", *key)] = appended(
                value, added if mask is None else added[mask], entries.get(("spare", *key))
            )
    return memo


def label_mask(
    codes: np.ndarray, votes: np.ndarray, wanted: Any, voters_only: bool
) -> np.ndarray | None:
    """Which items a search restricted to the `wanted` label codes (None: any) or to voters
    may return, from their label and vote codes; None when every item may."""
    if wanted is None and not voters_only:
        return None
    c = votes if voters_only else codes
    return c >= 0 if wanted is None else np.isin(c, wanted)


def caught_up(
    store: Store, gen: Generation, labels: Labels | None, segment: Segment | None
) -> tuple[Labels, Segment]:
    """Labels at the store's generation and the segment that goes with them.

    `labels` None (or older than the store) reloads them; an item deleted by another
    writer between reading the labels and the vectors makes it read both again.
    """
    if segment is None:
        segment = Segment.empty(int(gen.index.d), int(gen.index.metric_type))
    for _ in range(5):
        if labels is None or labels.store_generation != int(store.generation):
            labels = load_labels(store)
        try:
            return labels, segment.caught_up(labels.ids, gen.index_ids, segment_reader(store, gen))
        except NotFound:
            labels = None
    raise FailedPrecondition("the store changed too fast to catch the index up; retry")


def codes_of(labels: Labels, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(voting, shown) label code of each id (-1: unlabelled, deleted, padding; held out)."""
    if labels.ids.size == 0:
        none = np.full(ids.shape, -1, dtype=np.int32)
        return none, none
    pos = np.searchsorted(labels.ids, ids)
    pos = np.minimum(pos, labels.ids.size - 1)
    found = (labels.ids[pos] == ids) & (ids >= 0)
    shown = np.where(found, labels.codes[pos], -1).astype(np.int32)
    if labels.vote_codes is labels.codes:
        return shown, shown
    return np.where(found, labels.vote_codes[pos], -1).astype(np.int32), shown
