"""Where an index keeps the store ids of its vectors, and how lists go to disk.

FAISS answers a search with the ids it holds, and featurebank's ids are store ids. Two
layouts, chosen by what the index can do:

- ``lists``: an IVF (possibly under a PreTransform) writes each id beside its code in its
  inverted list: 8 bytes a vector, and the lists can live in a memory-mapped file
  (``OnDiskInvertedLists``) larger than memory;
- ``map``: anything else (Flat, HNSW, an IVF under a re-ranking Refine, which looks its
  candidates up by position) sits behind an ``IndexIDMap2``: an int64 id per position plus
  a reverse hash map, about 52 bytes a vector, in memory.

Everything that turns an index's answers, selectors or removals into store ids asks here.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from featurebank.core.errors import DamagedFile
from featurebank.core.mapped_files import advise_random
from featurebank.index.families import FAISS

ONDISK_FILE = "index.ivfdata"
"""The inverted lists of an on-disk generation, beside its index file."""
IDS_FILE = "index.ids.npy"
"""An on-disk generation's sorted store ids, so that loading it reads none of the lists."""

_DIRECT_MAP_LOCK = threading.Lock()
_STDOUT_LOCK = threading.Lock()


def _ivf_below(index: faiss.Index) -> Any:
    """The IVF reached through PreTransforms only (None when anything else is in the way)."""
    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index if isinstance(index, faiss.IndexIVF) else None


def in_lists(index: faiss.Index) -> bool:
    """Whether the index's ids are store ids kept in its inverted lists (layout ``lists``)."""
    return _ivf_below(index) is not None


def make(factory: str, dim: int, metric: int) -> faiss.Index:
    """An untrained index for `factory` in the layout it can hold (RuntimeError: bad string)."""
    index = faiss.index_factory(dim, factory, metric)
    return index if in_lists(index) else faiss.index_factory(dim, f"IDMap2,{factory}", metric)


def searching(index: faiss.Index) -> faiss.Index:
    """The index a search's parameters are built for (below the IDMap2, if any)."""
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index


def selector(index: faiss.Index, sel: faiss.IDSelector) -> Any:
    """`sel` (on store ids) as the searching index must see it: positions behind an IDMap2."""
    if isinstance(index, faiss.IndexIDMap2):
        return FAISS.IDSelectorTranslated(index.id_map, sel)
    return sel


def ids_of(index: faiss.Index, folder: Path | None = None) -> np.ndarray:
    """Sorted store ids the index holds (from `folder`'s ids file when it has one)."""
    if folder is not None and (folder / IDS_FILE).exists():
        ids: np.ndarray = np.load(folder / IDS_FILE, allow_pickle=False)
        if ids.dtype != np.int64 or ids.shape != (index.ntotal,):
            raise DamagedFile(f"{folder / IDS_FILE} does not hold the index's {index.ntotal} ids")
        return ids
    if isinstance(index, faiss.IndexIDMap2):
        return np.sort(faiss.vector_to_array(index.id_map).astype(np.int64))
    ivf = _ivf_below(index)
    if ivf is None:
        raise TypeError(f"{type(index).__name__} holds no store ids")
    lists = ivf.invlists
    parts = []
    for i in range(ivf.nlist):
        n = lists.list_size(i)
        if n:
            ptr = lists.get_ids(i)
            parts.append(faiss.rev_swig_ptr(ptr, n).astype(np.int64))
            lists.release_ids(i, ptr)
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def reconstruct(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """The (transformed) vectors of `ids`; an IVF gets its id -> entry hash table on first use."""
    ivf = _ivf_below(index)
    if ivf is not None and ivf.direct_map.type == FAISS.DirectMap.NoMap:
        with _DIRECT_MAP_LOCK:
            if ivf.direct_map.type == FAISS.DirectMap.NoMap:
                ivf.set_direct_map_type(FAISS.DirectMap.Hashtable)
    out: np.ndarray = index.reconstruct_batch(np.asarray(ids, dtype=np.int64))
    return out


def merge(target: Any, other: Any) -> None:
    """Append `other` (a filled copy of the same trained index) to `target`.

    Lists layout: the entries carry their ids, so the lists move as they are. Map
    layout: faiss's IndexIDMap2.merge_from moves inverted lists without shifting their
    positions, which would point the second shard's entries at the first shard's ids;
    here the lists move with the shift (`IndexIVF.merge_from(other, add_id=ntotal)`) and
    the id maps are concatenated.
    """
    if in_lists(target):
        faiss.extract_index_ivf(target).merge_from(faiss.extract_index_ivf(other), 0)
        _set_ntotal(target, int(faiss.extract_index_ivf(target).ntotal))
        return
    n_t, n_o = int(target.ntotal), int(other.ntotal)
    ivf_t = faiss.try_extract_index_ivf(target)
    if ivf_t is None:  # flat codes: positions are implicit
        target.merge_from(other, 0)
        return
    ivf_o = faiss.try_extract_index_ivf(other)
    assert ivf_o is not None  # a copy of the same trained index
    ivf_t.merge_from(ivf_o, n_t)
    _set_ntotal(faiss.downcast_index(target.index), n_t + n_o)
    both = np.concatenate([faiss.vector_to_array(target.id_map),
                           faiss.vector_to_array(other.id_map)])  # fmt: skip
    faiss.copy_array_to_vector(both, target.id_map)
    target.ntotal = n_t + n_o
    target.construct_rev_map()


def _set_ntotal(index: Any, ntotal: int) -> None:
    """Transforms above an IVF count its vectors too."""
    while not isinstance(index, faiss.IndexIVF):
        index.ntotal = ntotal
        index = faiss.downcast_index(index.index)


# ---- inverted lists on disk ----------------------------------------------------------------


def on_disk(index: faiss.Index) -> bool:
    """Whether the index's inverted lists live in a memory-mapped file."""
    ivf = _ivf_below(index)
    return ivf is not None and isinstance(
        faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists
    )


def lists_in_memory(index: faiss.Index) -> bool:
    """Whether the index's lists are plain arrays in memory (so entries can be removed)."""
    ivf = _ivf_below(index)
    return ivf is not None and isinstance(
        faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists
    )


def move_lists(index: faiss.Index, path: Path) -> None:
    """Put the index's inverted lists into a new file at `path` (list by list, never the
    whole index in memory at once) and make the index use it, writable."""
    ivf = _ivf_below(index)
    if ivf is None:
        raise TypeError(f"{type(index).__name__} has no inverted lists to put on disk")
    with _faiss_quiet():
        lists: Any = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(path))
        sources = FAISS.InvertedListsPtrVector()
        sources.push_back(ivf.invlists)
        ntotal = int(lists.merge_from_multiple(sources.data(), 1, False, False))
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    _set_ntotal(index, ntotal)
    ivf.ntotal = ntotal


def write_ids(index: faiss.Index, folder: Path) -> None:
    """Save the index's sorted store ids beside it (see IDS_FILE)."""
    np.save(folder / IDS_FILE, ids_of(index), allow_pickle=False)


def read(path: Path) -> faiss.Index:
    """Read an index file; on-disk lists beside it are mapped read-only from that folder,
    wherever the bank has moved (RuntimeError when faiss cannot read it)."""
    lists = path.parent / ONDISK_FILE
    if not lists.exists():
        return faiss.read_index(str(path))
    with _faiss_quiet():
        index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    # faiss starts 32 threads per search to prefetch the probed lists: more than the whole
    # search costs once they are cached, and the page faults do the reading anyway
    lists_read: Any = faiss.downcast_InvertedLists(_ivf_below(index).invlists)
    lists_read.prefetch_nthread = 0
    advise_random(lists)
    return index


@contextmanager
def adding(index: faiss.Index, path: Path) -> Iterator[faiss.Index]:
    """The index to add to, for `index` read from `path`: itself when its lists are in
    memory. An on-disk index's file is read-only (and faiss's on-disk lists cannot grow
    safely once merged): additions go to in-memory lists of a copy read without its data,
    and `index` searches both (an HStackInvertedLists) until `write_generation` puts them
    into one new file. Call `sync_ntotal(index)` after adding."""
    if not on_disk(index):
        yield index
        return
    ivf = _ivf_below(index)
    old = ivf.invlists
    adder = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_IVF_DATA)
    part_ivf = _ivf_below(adder)
    part: Any = faiss.ArrayInvertedLists(part_ivf.nlist, part_ivf.code_size)
    part_ivf.replace_invlists(part, True)
    part.this.disown()
    _set_ntotal(adder, 0)
    part_ivf.ntotal = 0
    sources = FAISS.InvertedListsPtrVector()
    sources.push_back(old)
    sources.push_back(part_ivf.invlists)
    stack = FAISS.HStackInvertedLists(2, sources.data())
    ivf.own_invlists = False
    old.this.acquire()  # freed with this frame, after the stack that reads it
    ivf.replace_invlists(stack, False)
    try:
        yield adder
    finally:
        if isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.HStackInvertedLists):
            old.this.disown()  # never written: the index gets its own lists back
            ivf.replace_invlists(old, True)
        del stack, adder


def sync_ntotal(index: faiss.Index) -> None:
    """Recount an IVF's vectors from its lists (after additions through `adding`)."""
    ivf = _ivf_below(index)
    if ivf is not None:
        n = int(ivf.invlists.compute_ntotal())
        _set_ntotal(index, n)
        ivf.ntotal = n


@contextmanager
def _faiss_quiet() -> Iterator[None]:
    """faiss prints its on-disk lists' resizing and renaming to C stdout: keep it off ours."""
    libc = ctypes.CDLL(None)
    with _STDOUT_LOCK:
        sys.stdout.flush()
        libc.fflush(None)
        saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        try:
            yield
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)
