"""One classify and one search batcher for every bank of a server.

Why: a batch amortises the hop to a search thread and FAISS's per-call cost over its
items, and each bank batching only its own calls makes small batches when the load is
spread over many banks. Here calls of all banks queue together; a batch runs on one
search thread as one group per bank (each bank answers its own jobs from its own
snapshot, exactly as its own batcher would). Each group's size is observed as the batch
kind `search_bank` / `classify_bank`: what one bank's search actually amortises over,
which is smaller than the batch when the load is spread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

from featurebank.server.batching import Batcher

Reads = Any  # a bank's server/reads.Reads (not imported: it imports this module)
Run = Callable[[Reads, list[Any]], Sequence[Any]]


def by_bank(
    run: Run, items: list[tuple[Reads, Any]], on_group: Callable[[int], None] | None = None,
) -> list[Any]:
    """`run(reads, jobs)` once per bank in the batch; results back in the batch's order.
    `on_group` is told each bank's number of jobs."""
    groups: dict[int, tuple[Reads, list[int]]] = {}
    for i, (reads, _) in enumerate(items):
        groups.setdefault(id(reads), (reads, []))[1].append(i)
    out: list[Any] = [None] * len(items)
    for reads, positions in groups.values():
        if on_group is not None:
            on_group(len(positions))
        try:
            answers: Sequence[Any] = run(reads, [items[i][1] for i in positions])
        except Exception as e:  # noqa: BLE001 - fails this bank's jobs only
            answers = [e] * len(positions)
        for i, answer in zip(positions, answers, strict=True):
            out[i] = answer
    return out


class SharedBatches:
    """The server-wide batchers a bank's `Reads` submits to (with itself beside each job)."""

    def __init__(
        self, compute: Executor, *, max_batch_size: int, batch_timeout_ms: float,
        search_threads: int, on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        options: dict[str, Any] = {
            "max_batch_size": max_batch_size, "timeout_ms": batch_timeout_ms,
            "max_inflight": search_threads, "on_batch": on_batch,
        }

        def grouped(kind: str, run: Run) -> Callable[[list[tuple[Reads, Any]]], list[Any]]:
            def observe(jobs: int) -> None:
                if on_batch is not None:
                    on_batch(f"{kind}_bank", jobs)

            return lambda items: by_bank(run, items, observe)

        self.classify: Batcher[tuple[Reads, Any], Any] = Batcher(
            "classify", grouped("classify", lambda r, jobs: r._classify_batch(jobs)),
            compute, **options,
        )
        self.search: Batcher[tuple[Reads, Any], Any] = Batcher(
            "search", grouped("search", lambda r, jobs: r._search_batch(jobs)),
            compute, **options,
        )

    async def close(self) -> None:
        for b in (self.classify, self.search):
            await b.close()
