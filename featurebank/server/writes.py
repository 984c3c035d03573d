"""The server's writes: Upsert, SetLabels, SetSplits, Delete and KeepFinding, all on the
one writer thread.

Writes only commit to the store and catch the live searcher up (new items become
searchable from its in-memory segment); index files are written off the write path, by
checkpoints and rebuilds (server/indexing.py). Upserts are committed in groups
(server/group_commit.py, which also states Upsert's deadline contract); the writer is
one thread, so every write stays ordered (and a kept label is the label the item has
after every write before it).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from featurebank.classify.quality import decisions
from featurebank.core.errors import InvalidInput, NotFound, shown
from featurebank.server.batching import run_in
from featurebank.server.group_commit import GroupWriter, UpsertRow
from featurebank.server.live import Live

if TYPE_CHECKING:
    from featurebank.store import Store


class Writes:
    """The write use cases over the live bank, run on the `writer` executor."""

    def __init__(self, live: Live, writer: ThreadPoolExecutor, max_queued_rows: int) -> None:
        self.live = live
        self.writer = writer
        self.group = GroupWriter(writer, self._commit_upsert, self._after_writes, max_queued_rows)

    async def upsert(self, rows: Sequence[UpsertRow], deadline: float | None = None) -> dict[str, int]:
        """Commit rows (grouped with concurrent Upserts); see server/group_commit.py.

        `deadline` is a time.monotonic() value: a call whose commit has not started by
        then is not committed (DeadlineExceeded).
        """
        if not rows:
            raise InvalidInput("Upsert got no items")
        return await asyncio.wrap_future(self.group.submit(list(rows), deadline))

    def _commit_upsert(self, rows: list[UpsertRow]) -> tuple[set[str], int]:
        keys = [r.key for r in rows]
        store = self.live.opened()
        present = set(keys) - set(store.missing(keys))
        store.put_batch(  # one commit: replaced items are never missing in between
            keys,
            np.stack([r.vector for r in rows]).astype(np.float32),
            labels=[r.label for r in rows],
            splits=[r.split for r in rows],
            meta=[r.meta for r in rows],
            replace=True,
            thumbnails=[r.thumbnail for r in rows] if any(r.thumbnail for r in rows) else None,
        )
        return present, int(store.generation)

    def _after_writes(self) -> int:
        """Make committed writes searchable: catch the searcher up (or build the first index)."""
        if self.live.searcher() is None and self.live.keeper is not None:
            self.live.keeper.ensure_index()
        self.live.catch_up()
        return self.live.index_generation()

    async def set_labels(self, mapping: dict[str, str | None]) -> dict[str, int]:
        return await run_in(self.writer, self._set_labels, mapping)

    def _set_labels(self, mapping: dict[str, str | None]) -> dict[str, int]:
        store = self._with_keys(list(mapping))
        updated = int(store.set_labels(mapping))
        self.live.catch_up()  # labels only: no index is touched, no build is waited for
        return {"updated": updated, "store_generation": int(store.generation)}

    async def set_splits(self, mapping: dict[str, str]) -> dict[str, int]:
        return await run_in(self.writer, self._set_splits, mapping)

    def _set_splits(self, mapping: dict[str, str]) -> dict[str, int]:
        store = self._with_keys(list(mapping))
        updated = int(store.set_splits(mapping))
        self.live.catch_up()  # who votes changed (test items do not): the labels reload
        return {"updated": updated, "store_generation": int(store.generation)}

    async def keep_finding(self, kind: str, keys: Sequence[str]) -> decisions.Kept:
        """Remember a finding as kept (BANK/quality/decisions.json)."""
        return await run_in(self.writer, self._keep_finding, kind, list(keys))

    def _keep_finding(self, kind: str, keys: list[str]) -> decisions.Kept:
        return decisions.keep(self.live.opened(), kind, keys)

    def _with_keys(self, keys: list[str]) -> Store:
        """The open store, after checking that it holds every key (NotFound names them)."""
        store = self.live.opened()
        missing = store.missing(keys)
        if missing:
            raise NotFound(_unknown_keys(missing))
        return store

    async def delete(self, keys: Sequence[str], ignore_missing: bool) -> dict[str, int]:
        return await run_in(self.writer, self._delete, list(keys), ignore_missing)

    def _delete(self, keys: list[str], ignore_missing: bool) -> dict[str, int]:
        store = self.live.opened()
        missing = store.missing(keys)
        if missing and not ignore_missing:
            raise NotFound(_unknown_keys(missing))
        gone = set(missing)
        present = [k for k in keys if k not in gone]
        deleted = int(store.delete(present)) if present else 0
        if deleted:
            self.live.catch_up()
        return {"deleted": deleted, "store_generation": int(store.generation)}


def image_meta(image: bytes, uri: str) -> dict[str, Any]:
    """Source metadata the store keeps for an image item."""
    meta: dict[str, Any] = {"sha256": hashlib.sha256(image).hexdigest(), "size": len(image)}
    if uri:
        meta["uri"] = uri
    return meta


def thumbnail_of(image: bytes) -> bytes:
    """The small JPEG the labelling page shows for an upserted image (decoded once more:
    the embedder keeps only the model's input)."""
    from featurebank.embedder.images import decode, thumbnail_jpeg

    return thumbnail_jpeg(decode(image))


def _unknown_keys(keys: Sequence[str]) -> str:
    listed = ", ".join(shown(k) for k in keys[:5])
    more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
    return f"unknown key{'s' if len(keys) > 1 else ''} {listed}{more}"

