"""Choosing a FAISS index for a bank: pure functions of (count, dimension, memory budget).

Why pure functions: the choice must be explainable and testable without building
anything, and the same inputs must always give the same index (the manifest
records the choice and the reason). The rules, in order (like autofaiss):

1. ``count <= FLAT_MAX_COUNT`` -> ``Flat``: exact search costs a few milliseconds
   per query batch at this size, so approximation buys nothing and loses recall.
2. HNSW (``HNSW32``) when its memory (raw float vectors + graph links) fits the
   budget and ``count <= HNSW_MAX_COUNT``: the best recall/latency trade-off for
   banks that fit in RAM; above a few million vectors its build time dominates.
   Embeddings have a low intrinsic dimension: when ``PCA_VARIANCE`` of the
   variance lies in at most half the dimensions (``pca_dim_for``) and the metric
   is a distance (l2, or cosine on unit vectors), the graph is built on the PCA
   projection and the candidates are re-ranked on the full vectors
   (``PCA{D},HNSW32,RFlat``): each graph step costs D/dim of a full distance,
   the build gets as much faster, and re-ranking restores exact distances.
3. ``IVF{nlist},Flat`` when the raw vectors fit but the graph does not (or the
   bank is too big for HNSW build times). ``nlist ~ 4 sqrt(count)`` rounded to a
   power of two; from ``HNSW_COARSE_MIN_NLIST`` lists on, the coarse quantiser is
   itself an HNSW (``IVF{nlist}_HNSW32``) so assigning a query stays cheap.
4. ``IVF{nlist}[_HNSW32],PQ{2m}x4fs,RStore`` when raw vectors do not fit: 4-bit
   fast-scan product codes (``m`` bytes per vector, the largest that fits), scanned in
   SIMD registers, whose candidates are re-ranked on the store's exact vectors
   (index/rerank.py): the codes only need to find the neighbours, not to order them.
   A dimension with no such split gets 8-bit codes after an OPQ rotation
   (``OPQ{m}_{D},IVF{nlist},PQ{m},RStore``).
5. Nothing fits -> ``InvalidInput`` naming the budget and the smallest need.

Sharded builds (``index build --engine ray``) skip rule 2: a graph cannot be built in
pieces and merged, inverted lists can. From a million vectors on, ``nlist`` follows faiss's
guidelines ("Guidelines to choose an index", faiss wiki): 2^16 lists for 1M-10M vectors,
2^18 for 10M-100M, 2^20 beyond (still at least ``MIN_POINTS_PER_LIST`` points per list),
trained on ``train_size_for(nlist)`` vectors (faiss asks for 30 to 256 per list), in two
levels from 4,096 lists on (`coarse`: minutes where one k-means would take hours).

What each index needs in memory is its family's (`families`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from featurebank.core.errors import InvalidInput
from featurebank.index.families import (
    HNSW,
    HNSW_COARSE_MIN_NLIST,
    HNSW_M,
    ID_MAP_BYTES,
    IVF,
    K_FACTORS,
    STORE_FACTOR,
    STORE_FACTORS,
    Flat,
)
from featurebank.index.rerank import SUFFIX

FLAT_MAX_COUNT = 20_000
HNSW_MAX_COUNT = 5_000_000
MIN_POINTS_PER_LIST = 39  # faiss warns below this many training points per centroid
FAISS_NLIST = ((1_000_000, 1 << 16), (10_000_000, 1 << 18), (100_000_000, 1 << 20))
TRAIN_MAX = 262_144  # vectors used to train IVF/PQ/OPQ at most sizes
TRAIN_PER_LIST = 64  # training vectors per IVF list for larger nlist (faiss: 30 to 256)
PCA_VARIANCE = 0.99
PCA_DIMS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


@dataclass(frozen=True)
class Choice:
    """The chosen factory string, why, and what the tuner may vary."""

    factory: str
    reason: str
    memory_bytes: int
    tunable: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def nlist_for(count: int) -> int:
    """Number of IVF lists: ~4 sqrt(count) as a power of two (faiss's table from 1M vectors
    on), with enough points to train each."""
    target = 4 * math.sqrt(max(count, 1))
    nlist = 2 ** max(0, round(math.log2(target)))
    for lowest, lists in FAISS_NLIST:
        if count >= lowest:
            nlist = lists
    while nlist > 1 and count < nlist * MIN_POINTS_PER_LIST:
        nlist //= 2
    return max(nlist, 1)


def train_size_for(nlist: int, count: int) -> int:
    """Training sample for an index of `nlist` lists: TRAIN_MAX, more for many lists."""
    return min(count, max(TRAIN_MAX, TRAIN_PER_LIST * nlist))


def pq_sizes(dim: int) -> list[tuple[int, int]]:
    """(m bytes per vector, OPQ output dimension) candidates, largest code first."""
    ms = {m for m in (128, 96, 64, 48, 32, 24, 16, 8, 4) if m <= max(4, dim // 2)}
    return [(m, (dim // m) * m) for m in sorted(ms, reverse=True)]


def pq_codes(dim: int) -> list[tuple[int, str]]:
    """(bytes per vector, codes) candidates, largest first: 4-bit fast-scan codes of 2m
    sub-quantisers where they split `dim` evenly, else 8-bit codes after OPQ."""
    out = []
    for m, rotated in pq_sizes(dim):
        fast = 2 * m <= dim and dim % (2 * m) == 0
        out.append((m, f"PQ{2 * m}x4fs" if fast else f"OPQ{m}_{rotated},PQ{m}"))
    return out


def pca_dim_for(eigenvalues: Sequence[float] | np.ndarray, dim: int) -> int | None:
    """Smallest candidate D keeping PCA_VARIANCE of the variance, if D <= dim / 2 (else None)."""
    vals = np.sort(np.maximum(np.asarray(eigenvalues, dtype=np.float64), 0.0))[::-1]
    total = float(vals.sum())
    if total <= 0:
        return None
    kept = np.cumsum(vals) / total
    for d in PCA_DIMS:
        if d > dim // 2:
            return None
        if d <= len(kept) and kept[d - 1] >= PCA_VARIANCE:
            return d
    return None


def choose_factory(
    count: int,
    dim: int,
    memory_budget: int,
    k: int = 10,
    pca_dim: int | None = None,
    metric: str = "l2",
    sharded: bool = False,
    ondisk: bool = False,
) -> Choice:
    """Apply the rules in the module docstring; raise InvalidInput when nothing fits.

    `pca_dim` is `pca_dim_for` of the bank's spectrum (None: no useful projection);
    `sharded`: only indexes that can be built in shards and merged (no graph);
    `ondisk`: inverted lists of raw vectors in a memory-mapped file (the budget holds
    only the centroids).
    """
    if count <= 0:
        raise InvalidInput("cannot choose an index for an empty bank")
    if dim <= 0:
        raise InvalidInput(f"dimension must be positive, got {dim}")
    if memory_budget <= 0:
        raise InvalidInput(f"memory budget must be positive, got {memory_budget}")
    nlist = nlist_for(count)
    coarse = f"IVF{nlist}_HNSW32" if nlist >= HNSW_COARSE_MIN_NLIST else f"IVF{nlist}"
    tunable = {"nprobe": IVF.grid(nlist)}
    if ondisk:
        need = IVF.memory(0, dim, nlist, dim * 4)
        return Choice(f"{coarse},Flat", "on disk: inverted lists of raw vectors, memory-mapped",
                      need, tunable)  # fmt: skip
    if count <= FLAT_MAX_COUNT:
        need = Flat.memory(count, dim)
        if need <= memory_budget:
            return Choice("Flat", f"{count} <= {FLAT_MAX_COUNT} vectors: exact search", need)
    graph = not sharded and count <= HNSW_MAX_COUNT
    if pca_dim is not None and metric != "ip" and graph:
        need = Flat.memory(count, dim) + HNSW.memory(count, pca_dim) - ID_MAP_BYTES * count
        if need <= memory_budget:
            return Choice(
                f"PCA{pca_dim},HNSW{HNSW_M},RFlat",
                f"HNSW fits the budget and {PCA_VARIANCE:.0%} of the variance lies in "
                f"{pca_dim} of {dim} dimensions: graph on the projection, exact re-ranking",
                need,
                {"efSearch": HNSW.grid(k), "k_factor_rf": K_FACTORS},
            )
    need = HNSW.memory(count, dim)
    if graph and need <= memory_budget:
        return Choice(
            f"HNSW{HNSW_M}",
            f"HNSW graph fits the budget ({need} <= {memory_budget} bytes)",
            need,
            {"efSearch": HNSW.grid(k)},
        )
    need = IVF.memory(count, dim, nlist, dim * 4)
    if need <= memory_budget:
        why = (
            "a graph cannot be built in shards" if sharded and count <= HNSW_MAX_COUNT
            else "too many vectors for an HNSW build" if count > HNSW_MAX_COUNT
            else "graph too big"
        )  # fmt: skip
        return Choice(f"{coarse},Flat", f"raw vectors fit, {why}: inverted lists", need, tunable)
    smallest = need
    for m, codes in pq_codes(dim):
        need = IVF.memory(count, dim, nlist, m)
        smallest = min(smallest, need)
        if need <= memory_budget:
            rotation, _, codes = codes.rpartition(",")
            return Choice(
                ",".join(filter(None, (rotation, coarse, codes, SUFFIX))),
                f"raw vectors do not fit: {m}-byte PQ codes in memory, candidates re-ranked "
                "on the stored vectors",
                need,
                {**tunable, STORE_FACTOR: STORE_FACTORS},
            )
    raise InvalidInput(
        f"memory budget {memory_budget} bytes is too small for {count} x {dim} vectors "
        f"(the smallest index considered needs about {smallest} bytes)"
    )
