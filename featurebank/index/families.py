"""Index families: what featurebank knows about each kind of FAISS index, in one place.

Each family (Flat, HNSW, IVF) says how much memory it needs, which knobs trade recall
for speed (and the grid the tuner tries), how a tuned knob is set, and how one search
call carries an id selector with those knobs; `family_of(index)` finds an index's
family, the one lookup the chooser, the tuner, the builders and the searcher share.
Wrappers are not families: IDMap and PreTransform are looked through, a Refine
(re-ranking) adds its own knob, `k_factor_rf`, whatever family it wraps.

Memory per vector (bytes; d = dimension, m = PQ code bytes), what the families count.
An IVF keeps each store id beside its code in the inverted lists (8 bytes); every other
index sits behind an ``IndexIDMap2`` (index/stored_ids.py): an int64 id per vector plus a
reverse hash map, measured at about 44 bytes per entry (std::unordered_map node + bucket,
libstdc++), so ``ID_MAP_BYTES`` = 52 bytes per vector:

    Flat              4d + 52
    HNSW32            4d + 52 + 3 * 32 * 4   (level-0 links 2M ints, upper levels ~M ints)
    IVF{K},Flat       4d + 8                 (+ K * 4d for the centroids)
    IVF{K},PQ{2m}x4fs  m + 8                 (+ K * 4d centroids, an HNSW over them from 2^14;
                                             RStore re-ranks from the store, no extra memory)

e.g. 10^9 vectors with PQ32 codes need ~40 GB, 8 of them for the ids; behind an id map
they would need ~92 GB (docs/scale.md). With ``ondisk`` the lists are a memory-mapped file.
"""

from __future__ import annotations

import contextlib
from typing import Any

import faiss

FAISS: Any = faiss  # faiss' bundled stubs miss SearchParametersHNSW and keyword constructors

HNSW_M = 32
HNSW_COARSE_MIN_NLIST = 16_384  # from this many lists on, the coarse quantiser is an HNSW
ID_BYTES = 8  # an int64 id: IndexIDMap2's id_map, and each inverted-list entry
REV_MAP_BYTES = 44  # IndexIDMap2's reverse map, per entry (measured, see the docstring)
ID_MAP_BYTES = ID_BYTES + REV_MAP_BYTES
MAX_EF_SEARCH = 2048  # a filtered search's boosted efSearch stops here
# Candidates kept while linking items appended onto a built graph (a fold). faiss' default,
# 40, is what a build uses (one `add` of everything links well); four 20k folds onto a 50k
# graph needed efSearch 20, 768, a rebuild and 112 with 40, and 20, 28, 28, 32 with 200, each
# fold 1.3-2.9 s (docs/scale.md, "Reads under writes").
APPEND_EF_CONSTRUCTION = 200
K_FACTORS = [1, 2, 4]  # re-ranking factors the tuner tries behind a Refine
# Re-ranking from the store (index/rerank.py): a knob of featurebank's, not of the faiss index.
STORE_FACTOR = "k_factor_store"
STORE_FACTORS = [1, 2, 4, 8]
EF_STEPS = (16, 20, 24, 28, 32, 36, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 256, 320, 384,
            512, 768, 1024)  # fmt: skip
NPROBE_STEPS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048)
EXHAUSTIVE_MAX_NLIST = 16_384  # lists up to which nprobe = nlist is tuned over too

_WRAPPERS = (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)


def unwrap(index: faiss.Index) -> faiss.Index:
    """The searching index inside IDMap / PreTransform / Refine wrappers, downcast."""
    while True:
        if isinstance(index, _WRAPPERS):
            index = faiss.downcast_index(index.index)
        elif isinstance(index, faiss.IndexRefine):
            index = faiss.downcast_index(index.base_index)
        else:
            return index


def has_refine(index: faiss.Index) -> bool:
    """Whether candidates are re-ranked (an IndexRefine under the IDMap/PreTransform)."""
    while isinstance(index, _WRAPPERS):
        index = faiss.downcast_index(index.index)
    return isinstance(index, faiss.IndexRefine)


class Family:
    """The fallback for indexes featurebank does not know: no knobs, the selector only."""

    name = "other"
    graph = False  # vectors added in one call; tight filters searched exactly
    mergeable = False  # shards of it can be built apart and merged (index build --engine ray)

    def matches(self, index: faiss.Index) -> bool:
        return True

    def knobs(self, index: faiss.Index, k: int) -> dict[str, list[int]]:
        """The knobs that trade recall for speed, each with the grid the tuner tries."""
        return {}

    def set(self, index: faiss.Index, name: str, value: int) -> None:
        """Set one tuned knob on `index` (through its wrappers)."""
        faiss.ParameterSpace().set_index_parameter(index, name, value)

    def search_parameters(
        self, index: faiss.Index, sel: Any, tuned: dict[str, int], boost: float
    ) -> Any:
        """One search call's parameters: the selector, the tuned knobs scaled by `boost`
        (a tight selector leaves fewer visited items that count, so it explores more)."""
        return FAISS.SearchParameters(sel=sel)

    def appending(self, index: faiss.Index) -> dict[str, int]:
        """Ready `index` for items appended after its build; returns what it set."""
        return {}


class Flat(Family):
    """Exhaustive scans over stored codes (Flat, PQ, SQ): exact over its codes, no knob."""

    name = "flat"
    mergeable = True

    def matches(self, index: faiss.Index) -> bool:
        return isinstance(unwrap(index), faiss.IndexFlatCodes)

    @staticmethod
    def memory(count: int, dim: int) -> int:
        return count * (dim * 4 + ID_MAP_BYTES)


class HNSW(Family):
    """A navigable graph; efSearch (candidates kept while walking it) is the knob."""

    name = "hnsw"
    graph = True

    def matches(self, index: faiss.Index) -> bool:
        return isinstance(unwrap(index), faiss.IndexHNSW)

    @staticmethod
    def memory(count: int, dim: int, m: int = HNSW_M) -> int:
        """Raw vectors + level-0 links (2M ints) + M ints for upper levels (a bound: ~M/(M-1)
        used)."""
        return Flat.memory(count, dim) + count * (2 * m + m) * 4

    @staticmethod
    def grid(k: int) -> list[int]:
        return sorted({max(k, v) for v in EF_STEPS})

    def knobs(self, index: faiss.Index, k: int) -> dict[str, list[int]]:
        return {"efSearch": self.grid(k)}

    def search_parameters(
        self, index: faiss.Index, sel: Any, tuned: dict[str, int], boost: float
    ) -> Any:
        ef = min(tuned.get("efSearch", 16) * boost, MAX_EF_SEARCH)
        return FAISS.SearchParametersHNSW(sel=sel, efSearch=int(ef))

    def appending(self, index: faiss.Index) -> dict[str, int]:
        graph: Any = unwrap(index)
        graph.hnsw.efConstruction = APPEND_EF_CONSTRUCTION
        return {"efConstruction": APPEND_EF_CONSTRUCTION}


class IVF(Family):
    """Inverted lists (any codes, any coarse quantiser); nprobe (lists visited) is the knob."""

    name = "ivf"
    mergeable = True

    def matches(self, index: faiss.Index) -> bool:
        return faiss.try_extract_index_ivf(index) is not None

    @staticmethod
    def nlist(index: faiss.Index) -> int:
        ivf: Any = faiss.try_extract_index_ivf(index)
        return int(ivf.nlist)

    @staticmethod
    def memory(count: int, dim: int, nlist: int, code_bytes: int) -> int:
        centroids = nlist * dim * 4
        coarse = HNSW.memory(nlist, dim) if nlist >= HNSW_COARSE_MIN_NLIST else centroids
        return count * (code_bytes + ID_BYTES) + coarse  # ids live in the lists

    @staticmethod
    def grid(nlist: int) -> list[int]:
        """nprobe values to tune over; every list only where that is still a few steps on
        (past EXHAUSTIVE_MAX_NLIST it scans every code for every query: slower than a flat
        scan, never the fastest setting, and minutes a point at 10M)."""
        every = [nlist] if nlist <= EXHAUSTIVE_MAX_NLIST else []
        return [p for p in NPROBE_STEPS if p < nlist] + every

    def knobs(self, index: faiss.Index, k: int) -> dict[str, list[int]]:
        return {"nprobe": self.grid(self.nlist(index))}

    def set(self, index: faiss.Index, name: str, value: int) -> None:
        super().set(index, name, value)
        if name == "nprobe":
            # An HNSW coarse quantiser must explore at least as many lists as it probes.
            with contextlib.suppress(RuntimeError):
                super().set(index, "quantizer_efSearch", max(2 * value, 64))

    def search_parameters(
        self, index: faiss.Index, sel: Any, tuned: dict[str, int], boost: float
    ) -> Any:
        nprobe = min(tuned.get("nprobe", 1) * boost, self.nlist(index))
        return FAISS.SearchParametersIVF(sel=sel, nprobe=int(nprobe))


# Looked up in order: an IVF over flat codes is an IVF; anything else is the fallback.
FAMILIES: dict[str, Family] = {f.name: f for f in (IVF(), HNSW(), Flat(), Family())}


def family_of(index: faiss.Index) -> Family:
    """The family of `index` (behind any wrappers)."""
    return next(f for f in FAMILIES.values() if f.matches(index))


def tunable(index: faiss.Index, k: int, from_store: bool = False) -> dict[str, list[int]]:
    """What this index trades recall for speed with, and the grids (main knob first);
    `from_store`: its candidates are re-ranked from the store (index/rerank.py)."""
    grid = family_of(index).knobs(index, k)
    if grid and has_refine(index):
        grid["k_factor_rf"] = list(K_FACTORS)
    if grid and from_store:
        grid[STORE_FACTOR] = list(STORE_FACTORS)
    return grid


def set_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Set tuned parameters on the index (through IDMap/PreTransform wrappers); the store
    re-ranking factor is the searcher's, not the index's."""
    family = family_of(index)
    for name, value in params.items():
        if name != STORE_FACTOR:
            family.set(index, name, value)


def search_parameters(index: faiss.Index, sel: Any, tuned: dict[str, int], boost: float) -> Any:
    """Per-call parameters carrying `sel` down every wrapper below the IDMap to the family.

    `sel` must already speak the inner index's positions (the IDMap only translates the
    selector of the outermost parameters); also returned: every parameter object made, which
    must stay alive while the search runs.
    """
    keep: list[Any] = []

    def nested(index: Any) -> Any:
        if isinstance(index, faiss.IndexRefine):
            inner = nested(faiss.downcast_index(index.base_index))
            p = FAISS.IndexRefineSearchParameters(
                k_factor=float(tuned.get("k_factor_rf", 1)), base_index_params=inner
            )
        elif isinstance(index, faiss.IndexPreTransform):
            inner = nested(faiss.downcast_index(index.index))
            p = FAISS.SearchParametersPreTransform(index_params=inner)
        else:
            p = family_of(index).search_parameters(index, sel, tuned, boost)
        keep.append(p)
        return p

    return nested(index), keep
