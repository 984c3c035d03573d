"""Read-your-writes: `min_store_generation` on a read request (docs/scale.md).

A client that wrote through the primary passes the Upsert's `store_generation`; a server
(a replica still applying it) waits up to the call's deadline before answering, then
answers UNAVAILABLE so the client retries elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from featurebank.core.errors import FeaturebankError
from featurebank.server.batching import run_in

if TYPE_CHECKING:
    from featurebank.server.engine import Engine

POLL_S = 0.005
MAX_WAIT_S = 10.0  # how long a read without a deadline waits for min_store_generation


def searchable_generation(engine: Engine) -> int:
    """The store generation reads answer from now: the searcher's (it may trail the store
    while a replica's follower applies a commit), or the store's when there is no index."""
    searcher = engine.live.searcher()
    if searcher is None:
        return int(engine.live.opened().generation)
    return int(searcher.store_generation)


async def reach_generation(engine: Engine, generation: int, time_left: float | None) -> None:
    """Return once reads answer from store `generation` or later; GenerationNotReached
    (UNAVAILABLE) at the deadline, so the client retries elsewhere."""
    store = engine.live.opened()
    deadline = time.monotonic() + min(MAX_WAIT_S, time_left if time_left is not None else MAX_WAIT_S)
    while (held := searchable_generation(engine)) < generation:
        if time.monotonic() >= deadline:
            raise GenerationNotReached(
                f"min_store_generation {generation} not reached before the deadline: this server "
                f"holds store generation {held}; retry, or ask the primary"
            )
        if int(store.generation) >= generation:  # committed here: make it searchable now
            await run_in(engine.compute, engine.live.catch_up)
        else:
            await asyncio.sleep(POLL_S)


class GenerationNotReached(FeaturebankError):
    """A read asked for a store generation this server has not applied yet."""

    grpc_code = "UNAVAILABLE"
