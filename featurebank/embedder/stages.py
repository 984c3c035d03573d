"""The stages of a batch embedding job, shared by both runners (local and Ray).

A job is reader -> mapper -> model -> writer:
- reader: a `sources.Source` and the records still to embed (the local runner's `plan`,
  or one shard of the Ray runner's plan, see `shards`);
- mapper: `Loader`, which reads and decodes one record to pixels at the model's size and
  keeps failures instead of raising;
- model: anything with `spec`, `input_size` and `forward(pixels) -> vectors` (an
  `Embedder` in production, see `load_model`);
- writer: the local runner commits batches straight into the store (`pipeline.Writer`);
  the Ray runner writes one Parquet shard per task (`shards.write_shard`).

Keeping the mapper and the model here is what makes the Ray path give the same vectors
as the local one: both call the same decode and the same compiled forward pass.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from featurebank.core.spec import Spec
from featurebank.embedder import images, sources


class Model(Protocol):
    """The model stage: uint8 pixels (n, h, w, 3) at `input_size` -> float32 vectors (n, dim)."""

    spec: Spec

    @property
    def input_size(self) -> tuple[int, int]: ...

    def forward(self, pixels: np.ndarray) -> np.ndarray: ...


def load_model(spec: Spec) -> Model:
    """The production model stage: the bank's exact extractor, compiled once."""
    from featurebank.embedder.embedding import Embedder

    return Embedder.from_spec(spec)


NONFINITE_REASON = "embedding has NaN or infinite values in {dtype}"


def finite_rows(vectors: np.ndarray, dtype: str) -> np.ndarray:
    """Which rows stay finite once stored in `dtype` (the others are recorded as failures)."""
    with np.errstate(over="ignore"):
        return np.isfinite(np.asarray(vectors, dtype)).all(axis=1)


@dataclass
class Timings:
    """Seconds spent per stage; reading is summed over the parallel decoders."""

    reading: float = 0.0
    inferring: float = 0.0
    writing: float = 0.0
    waiting: float = 0.0  # the model idle, waiting for decoded batches
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_reading(self, dt: float) -> None:
        with self.lock:
            self.reading += dt


class Loader:
    """Reads and decodes one record by position; failures are kept, never raised."""

    def __init__(
        self,
        source: sources.Source,
        todo: list[sources.Record],
        size: tuple[int, int],
        resize: str,
        max_pixels: int,
        timings: Timings,
        thumbnails: bool = False,
    ) -> None:
        self.source = source
        self.todo = todo
        self.size = size
        self.resize = resize
        self.max_pixels = max_pixels
        self.timings = timings
        self.meta: dict[int, dict[str, Any]] = {}
        self.failures: dict[int, str] = {}
        self.thumbs: dict[int, bytes] | None = {} if thumbnails else None
        self._blank = np.zeros((*size, 3), np.uint8)

    def __call__(self, i: int) -> tuple[np.ndarray, bool]:
        if not getattr(_thread_state, "lowered", False):
            _lower_thread_priority()
        t = time.perf_counter()
        rec = self.todo[i]
        try:
            pixels, meta = self.source.load(rec, self.size, self.resize, self.max_pixels)
            self.meta[i] = {**rec.meta, **meta}  # the store's source fields are never a user's
            if self.thumbs is not None:
                self.thumbs[i] = images.thumbnail_jpeg(pixels)
            ok = True
        except images.ImageError as e:
            self.failures[i] = e.reason
            pixels, ok = self._blank, False
        except Exception as e:  # never let one input stop (or hang) the job
            self.failures[i] = f"could not read: {type(e).__name__}: {e}"
            pixels, ok = self._blank, False
        self.timings.add_reading(time.perf_counter() - t)
        return pixels, ok


_thread_state = threading.local()
DECODE_NICENESS = 5


def _lower_thread_priority() -> None:
    """Decoders yield to the model's threads: decoding needs a few percent of the CPU, and a
    model thread preempted mid-operation stalls its partner threads too."""
    _thread_state.lowered = True
    # Not Linux, or not allowed: decode at normal priority.
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICENESS)


def decoded_batches(
    loader: Loader, batch_size: int, threads: int = 2
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(pixels, positions) of the decodable records in order, decoded on `threads` threads.

    The Ray runner's mapper (one shard at a time, no TensorFlow input pipeline needed):
    the next batch is decoded while the model runs on this one.
    """
    n = len(loader.todo)
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="decode") as pool:

        def submit(start: int) -> Any:
            return pool.map(loader, range(start, min(start + batch_size, n)))

        pending = submit(0) if n else None
        for start in range(0, n, batch_size):
            decoded = list(pending) if pending is not None else []
            nxt = start + batch_size
            pending = submit(nxt) if nxt < n else None
            ok = [i for i, (_, good) in enumerate(decoded) if good]
            if ok:
                pixels = np.stack([decoded[i][0] for i in ok])
                yield pixels, np.asarray(ok, np.int64) + start
