"""Dynamic batching, as TF Serving and Triton do it.

Concurrent requests are queued; a collector takes the first waiting item, then
keeps taking more until `max_batch_size` items or `timeout_ms` have passed, and
hands the batch to an executor thread (Keras and FAISS are much faster per item
on a batch, and never block the event loop). While batches run, new requests
queue up, so batches grow with load by themselves. `max_batch_size=1` turns
batching off (each request runs alone, still off the loop). With several batches
allowed at once, another one starts beside a running batch only when the queue
holds a quarter of a full batch: a second batch of a few items would only split
what one batch amortises (per-search costs, a bank's scan), and both threads
would contend for the interpreter; a queue that outgrows one thread starts it.

A batch function gets the list of items and returns one result or exception per
item, so one bad input fails only its own request (`isolate` helps with that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

from featurebank.core.errors import InvalidInput

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

BatchFn = Callable[[list[T]], Sequence["R | BaseException"]]


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]


class Batcher(Generic[T, R]):
    """Queue of single requests that runs them as batches in an executor."""

    def __init__(
        self,
        name: str,
        run: BatchFn[T, R],
        executor: Executor,
        *,
        max_batch_size: int = 64,
        timeout_ms: float = 2.0,
        max_inflight: int = 1,
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise InvalidInput(f"max batch size must be >= 1, got {max_batch_size}")
        if timeout_ms < 0:
            raise InvalidInput(f"batch timeout must be >= 0 ms, got {timeout_ms}")
        self.name = name
        self.run = run
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.timeout = timeout_ms / 1000.0
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Pending[T, R]] | None = None
        self._slots: asyncio.Semaphore | None = None
        self._max_inflight = max(1, max_inflight)
        self._collector: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._overlap_at = max(2, max_batch_size // 4)  # queued items worth a batch beside a running one
        self._moved: asyncio.Event | None = None  # set when an item is queued or a batch ends

    def _start(self) -> None:
        self._queue = asyncio.Queue()
        self._slots = asyncio.Semaphore(self._max_inflight)
        self._moved = asyncio.Event()
        self._collector = asyncio.get_running_loop().create_task(self._collect())

    def _enqueue(self, item: T) -> asyncio.Future[R]:
        """Queue one item; its future gets the result (or its exception)."""
        if self._collector is None:
            self._start()
        assert self._queue is not None and self._moved is not None
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(item, future))
        self._moved.set()
        return future

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its result (raises its exception)."""
        return await self._enqueue(item)

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        """Queue several items at once (they batch with everyone else's).

        The callers wait on the items' futures themselves, no task each: a cancelled
        caller cancels them, and a batch skips an item whose future is done.
        """
        futures = [self._enqueue(i) for i in items]
        if len(futures) == 1:
            return [await futures[0]]
        return list(await asyncio.gather(*futures))

    async def _collect(self) -> None:
        assert self._queue is not None and self._slots is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()  # wait for a free slot first: the queue grows meanwhile
            await self._worth_another()
            first = await self._queue.get()
            batch = [first]
            deadline = loop.time() + self.timeout
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            task = loop.create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    async def _worth_another(self) -> None:
        """Return once no batch runs, or the queue could fill a batch of its own."""
        assert self._queue is not None and self._moved is not None
        while self._running and self._queue.qsize() < self._overlap_at:
            self._moved.clear()
            await self._moved.wait()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        assert self._moved is not None
        self._moved.set()

    async def _execute(self, batch: list[_Pending[T, R]]) -> None:
        assert self._slots is not None
        try:
            live = [p for p in batch if not p.future.done()]  # skip callers that gave up
            if not live:
                return
            if self.on_batch is not None:
                self.on_batch(self.name, len(live))
            items = [p.item for p in live]
            loop = asyncio.get_running_loop()
            try:
                results = await loop.run_in_executor(self.executor, self._call, items)
            except Exception as e:  # noqa: BLE001 - delivered to every caller
                results = [e] * len(live)
            for p, r in zip(live, results, strict=True):
                if p.future.done():
                    continue
                if isinstance(r, BaseException):
                    p.future.set_exception(r)
                else:
                    p.future.set_result(r)
        finally:
            self._slots.release()

    def _call(self, items: list[T]) -> Sequence[R | BaseException]:
        started = time.perf_counter()
        out = self.run(items)
        if len(out) != len(items):
            raise RuntimeError(f"{self.name}: {len(out)} results for {len(items)} items")
        log.debug(
            "%s batch of %d in %.1f ms", self.name, len(items),
            1000 * (time.perf_counter() - started),
        )
        return out

    async def close(self) -> None:
        """Stop collecting; batches already running finish."""
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
            self._collector = None
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)


def isolate(fn: Callable[[list[T]], Sequence[R]], items: list[T]) -> list[R | BaseException]:
    """Run `fn` on the whole batch; if one item is invalid, rerun one by one to find it.

    So a request with an undecodable image fails alone instead of taking its
    batch neighbours down with it.
    """
    try:
        return list(fn(items))
    except InvalidInput as e:
        if len(items) == 1:
            return [e]
    out: list[R | BaseException] = []
    for item in items:
        try:
            out.extend(fn([item]))
        except Exception as e:  # noqa: BLE001 - each caller gets its own error
            out.append(e)
    return out


async def run_in(executor: Executor, fn: Callable[..., R], *args: object) -> R:
    """`fn(*args)` on `executor`, awaited from the event loop (never blocking it)."""
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
