"""The batch size a job runs with: the user's on the CPU, the largest that fits on a device.

On a GPU the largest batch that fits is found as a user would by hand (start big, halve on
out-of-memory), once: what fitted and what did not is remembered in the bank's job record
per kind of hardware and precision, so later jobs start at the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from featurebank.core.bank import Bank
from featurebank.core.errors import DeviceUnavailable, InvalidInput

if TYPE_CHECKING:
    from featurebank.embedder.embedding import Embedder

log = logging.getLogger(__name__)

CPU_BATCH = 64  # the CPU default: larger batches are no faster there
DEVICE_START = 512  # per device: where the search starts when the user gives no batch size
JOB = "embed"


def largest_batch(try_batch: Callable[[int], Any], start: int) -> tuple[int, list[int]]:
    """The first of start, start/2, start/4, ... that `try_batch` runs without running out of
    memory, and the sizes tried. A batch of 1 that does not fit is a DeviceUnavailable."""
    import tensorflow as tf

    if start < 1:
        raise InvalidInput(f"batch size must be at least 1, got {start}")
    tried: list[int] = []
    n = start
    while True:
        tried.append(n)
        try:
            try_batch(n)
            return n, tried
        except (tf.errors.ResourceExhaustedError, MemoryError) as e:
            if n == 1:
                raise DeviceUnavailable(
                    f"out of memory with a batch of one image ({type(e).__name__}): the model "
                    "does not fit on this device"
                ) from e
            log.info("batch of %d does not fit in memory; trying %d", n, n // 2)
            n //= 2


def choose(bank: Bank, embedder: Embedder, requested: int | None) -> tuple[int, str]:
    """The batch size for a job and where it came from (given, default, searched, remembered).

    The caller holds the bank's writer lock (a search updates the job record).
    """
    if requested is not None and requested < 1:
        raise InvalidInput(f"batch size must be at least 1, got {requested}")
    if not embedder.placement.on_accelerator:
        return (requested, "given") if requested else (CPU_BATCH, "default")
    want = requested or DEVICE_START * embedder.placement.replicas
    size, source = fitted(bank, embedder, want)
    return size, "given" if source == "remembered" and size == requested else source


def fitted(bank: Bank, embedder: Embedder, want: int) -> tuple[int, str]:
    """`want`, or the largest batch below it that fits in the devices' memory.

    Answered from the bank's job record when it settles the question (what fitted before,
    the smallest size that did not), else searched with `largest_batch` and recorded.
    """
    placement = embedder.placement
    record = bank.read_job_record(JOB)
    known = record.get("batch_sizes", {}).get(placement.key, {})
    fits, fails = int(known.get("fits", 0)), known.get("fails")
    if want <= fits:
        return want, "remembered"
    if fails is not None and want >= int(fails):
        return fits, "remembered"
    h, w = embedder.input_size

    def try_batch(n: int) -> None:
        embedder.forward(np.zeros((n, h, w, 3), np.uint8))

    size, tried = largest_batch(try_batch, want)
    failed = [t for t in tried if t > size]
    record.setdefault("batch_sizes", {})[placement.key] = {
        "fits": max(size, fits),
        "fails": min(failed) if failed else fails,
        "tried": tried,
    }
    bank.write_job_record(JOB, record)
    log.info("largest batch that fits on %s: %d (tried %s)", placement.describe(), size, tried)
    return size, "searched"
