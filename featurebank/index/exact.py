"""Exact search from the store, for a bank none of whose index generations is intact.

Indexes are derived state: the store holds every vector, so when each published
generation is damaged a server can still answer, exactly, from a flat index built in
memory over the store (no file is written). The params are the newest readable
manifest's, so the metric and transform are the ones the bank was served with; the
transform is the damaged generation's own when its file still loads, else fitted again
on the store as a rebuild would. The generation number is 0: nothing is published, and
the manifest says why (`exact_from_store`) until a repair or rebuild publishes a real one.
"""

from __future__ import annotations

import logging
from typing import Any

import faiss
import numpy as np

from featurebank.core.bank import Bank, newest_manifest
from featurebank.core.errors import DamagedFile
from featurebank.core.params import IndexParams
from featurebank.core.vocabulary import metric as metric_named
from featurebank.index import transforms
from featurebank.index.families import family_of
from featurebank.index.views import Generation
from featurebank.store import Store

log = logging.getLogger(__name__)

EXACT_GENERATION = 0


def exact_generation(bank: Bank, store: Store, reason: str) -> Generation:
    """A flat in-memory index over every live store vector, searched like a generation."""
    recorded = newest_manifest(bank.indexes_dir)
    params = IndexParams.from_manifest(recorded[1] if recorded else None)
    metric = metric_named(params.metric)
    items = store.to_numpy()
    dim = int(store.spec.dim)
    vectors = transforms.as_vectors(items.vectors, dim, f"store vectors in {bank.root}")
    fitted, how = _transform(bank, recorded, params, vectors)
    xt = fitted.apply(vectors)
    base = faiss.IndexFlatIP(fitted.out_dim) if metric.faiss_kind == "ip" else faiss.IndexFlatL2(
        fitted.out_dim
    )
    index = faiss.IndexIDMap2(base)
    ids = np.asarray(items.ids, dtype=np.int64)
    if len(ids):
        index.add_with_ids(xt, ids)
    manifest = {
        "factory": "Flat",
        "metric": metric.name,
        "dim": dim,
        "index_dim": fitted.out_dim,
        "transform": fitted.to_dict(),
        "transform_source": how,
        "index_params": params.to_dict(),
        "store_generation": int(store.generation),
        "ntotal": int(index.ntotal),
        "k": params.k,
        "exact_from_store": reason,
    }
    log.warning("%s; searching exactly from the store (%d vectors, %s)", reason, len(ids), how)
    return Generation(EXACT_GENERATION, bank.indexes_dir, manifest, index, fitted,
                      np.sort(ids), family_of(index))  # fmt: skip


def _transform(
    bank: Bank, recorded: tuple[int, dict[str, Any]] | None, params: IndexParams, vectors: np.ndarray
) -> tuple[transforms.Transform, str]:
    """The recorded generation's transform if its file loads, else fitted on the store."""
    if recorded is not None:
        try:
            fitted = transforms.Transform.load(bank.indexes_dir / str(recorded[0]))
            if fitted.in_dim == vectors.shape[1]:
                return fitted, f"the transform of index generation {recorded[0]}"
        except DamagedFile:
            pass
    if not len(vectors):  # nothing to fit on, and nothing to search either
        return transforms.Transform.identity(vectors.shape[1]), "no transform (the store is empty)"
    spec = params.resolved_transform
    unit = metric_named(params.metric).unit_vectors
    return transforms.fit(spec, vectors, normalize_output=unit), f"transform {spec} fitted on the store"
