"""Connecting to a Ray cluster (or starting a local one) for featurebank's batch jobs.

Ray is imported here and in the modules that run on it (`ray_job`, `index.ray_build`)
only, so importing the store, the index or the server never imports Ray. Unless the
user asks for it (--verbose), Ray's start-up lines, its per-dataset log lines and the
workers' output stay out of featurebank's output (they remain in Ray's log folder).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from featurebank.core.errors import FailedPrecondition, InvalidInput

log = logging.getLogger(__name__)

# CPUs left to Ray Data's own tasks (splitting input blocks, moving results): an actor pool
# holding every CPU of the cluster stalls the dataset.
RESERVED_CPUS = 0.5
_QUIET_LOGGERS = ("ray", "ray.data", "ray.util")


def import_ray() -> Any:
    """`import ray` with a clear error when the extra is not installed."""
    try:
        import ray
    except ImportError as e:
        raise FailedPrecondition("the Ray engine needs Ray: pip install 'featurebank[ray]'") from e
    return ray


@contextmanager
def session(
    address: str | None = None, verbose: bool = False, num_cpus: int | None = None
) -> Iterator[Any]:
    """Ray connected for the block: to `address`, to the session already running in this
    process, or to a local cluster of `num_cpus` CPUs started (and stopped) here."""
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        if not verbose:
            os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        try:
            with _stderr_hidden(not verbose):
                ray.init(
                    address=address,
                    num_cpus=num_cpus if address is None else None,
                    include_dashboard=False,
                    log_to_driver=verbose,
                    logging_level=logging.INFO if verbose else logging.ERROR,
                )
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise FailedPrecondition(
                f"could not connect to Ray at {address or 'local'}: {e}"
            ) from e
        started = True
    quiet_data(verbose)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


@contextmanager
def _stderr_hidden(hide: bool) -> Iterator[None]:
    """Ray's C++ core prints a line on start-up (the log level it read) straight to file
    descriptor 2, before any Python logging applies; a failing start still raises."""
    if not hide:
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet_data(verbose: bool) -> None:
    """No Ray Data progress bars or per-execution log lines (featurebank shows its own)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    ctx.enable_auto_log_stats = False
    if not verbose:
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


def resources(ray: Any) -> tuple[float, float]:
    """(CPUs, GPUs) of the cluster as it is now."""
    res = ray.cluster_resources()
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))


def fit_workers(
    ray: Any, workers: tuple[int, int], cpus_per_worker: float, gpus_per_worker: float
) -> tuple[int, int]:
    """The actor pool's (min, max) size, checked against the cluster and capped so that
    `RESERVED_CPUS` stay free; a pool that cannot start at all is an error naming why."""
    lo, hi = workers
    if lo < 1 or hi < lo:
        raise InvalidInput(f"--workers MIN,MAX needs 1 <= MIN <= MAX, got {lo},{hi}")
    if cpus_per_worker <= 0 or gpus_per_worker < 0:
        raise InvalidInput(
            f"--cpus-per-worker must be positive and --gpus-per-worker not negative, "
            f"got {cpus_per_worker} and {gpus_per_worker}"
        )
    cpus, gpus = resources(ray)
    room = int((cpus - RESERVED_CPUS) // cpus_per_worker)
    if gpus_per_worker > 0:
        room = min(room, int(gpus // gpus_per_worker))
    if room < lo:
        raise InvalidInput(
            f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs: {lo} workers of "
            f"{cpus_per_worker:g} CPUs and {gpus_per_worker:g} GPUs do not fit while leaving "
            f"{RESERVED_CPUS:g} CPU to Ray Data (lower --cpus-per-worker or --workers)"
        )
    if hi > room:
        log.warning(
            "capping the worker pool at %d workers (cluster: %g CPUs, %g GPUs)", room, cpus, gpus
        )
        hi = room
    return lo, hi


def parse_workers(text: str) -> tuple[int, int]:
    """'4' -> (4, 4); '2,8' -> (2, 8) (an autoscaling pool)."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise InvalidInput(f"--workers takes N or MIN,MAX (e.g. 4 or 2,8), got {text!r}")
    return parts[0], parts[1]
