"""A client over several servers: reads round-robin, retried elsewhere on UNAVAILABLE.

For applications that talk to read replicas without a load balancer in front. Each
target keeps a state that two things change: a health poll (grpc.health.v1, every
`health_interval_s`, in a background thread) and the calls themselves (UNAVAILABLE takes
a target out of the rotation at once; the next health poll that says SERVING puts it
back). Reads go to the serving targets in turn; a read that fails with UNAVAILABLE is
sent to the next target (reads are idempotent) until `retry_timeout_s` has passed. Other
errors are the caller's answer and are raised as they are. Writes go to `primary`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np

from featurebank.core.errors import FailedPrecondition, InvalidInput
from featurebank.server.client import FeatureBankClient, RemoteError
from featurebank.v1 import featurebank_pb2 as pb

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRIED = grpc.StatusCode.UNAVAILABLE


@dataclass
class Target:
    """One server and whether reads may go to it now."""

    client: FeatureBankClient
    serving: bool = True  # optimistic until the first health poll or failed call says otherwise

    @property
    def address(self) -> str:
        return self.client.target


class MultiTargetClient:
    """Blocking client over `targets` (replicas, optionally the primary too).

    `client_options` are FeatureBankClient's (token, TLS, timeout, ...), the same for every
    target. Use as a context manager or call `close()`.
    """

    def __init__(
        self,
        targets: Sequence[str],
        *,
        primary: str | None = None,
        retry_timeout_s: float = 10.0,
        health_interval_s: float = 0.5,
        **client_options: Any,
    ) -> None:
        if not targets:
            raise InvalidInput("MultiTargetClient needs at least one target")
        if len(set(targets)) != len(targets):
            raise InvalidInput(f"targets repeat an address: {', '.join(targets)}")
        if retry_timeout_s < 0 or health_interval_s <= 0:
            raise InvalidInput(
                f"retry_timeout_s must be >= 0 and health_interval_s > 0, got "
                f"{retry_timeout_s} and {health_interval_s}"
            )
        self.targets = [Target(FeatureBankClient(t, **client_options)) for t in targets]
        self._primary = FeatureBankClient(primary, **client_options) if primary else None
        self.retry_timeout_s = retry_timeout_s
        self.health_interval_s = health_interval_s
        self.retries = 0  # reads sent again to another target after UNAVAILABLE
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._health = threading.Thread(target=self._poll_health, name="fb-health", daemon=True)
        self._health.start()

    def __enter__(self) -> MultiTargetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        self._health.join()
        for t in self.targets:
            t.client.close()
        if self._primary is not None:
            self._primary.close()

    # ------------------------------------------------------------------ routing

    @property
    def primary(self) -> FeatureBankClient:
        """The client for writes (Upsert, SetLabels, Delete, RebuildIndex, GetOperation)."""
        if self._primary is None:
            raise FailedPrecondition("no primary given: pass primary='host:port' for writes")
        return self._primary

    def serving(self) -> list[str]:
        """Addresses reads go to now."""
        return [t.address for t in self.targets if t.serving]

    def _poll_health(self) -> None:
        while True:
            for t in self.targets:
                if self._closed.is_set():
                    return
                try:
                    t.serving = t.client.health(timeout=self.health_interval_s) == "SERVING"
                except RemoteError:
                    t.serving = False
            if self._closed.wait(self.health_interval_s):
                return

    def _next(self) -> Target:
        """The next serving target in turn; when none serves, the next one anyway (to probe)."""
        with self._lock:
            start = next(self._turn)
        n = len(self.targets)
        for i in range(n):
            t = self.targets[(start + i) % n]
            if t.serving:
                return t
        return self.targets[start % n]

    def _read(self, call: Callable[[FeatureBankClient], T]) -> T:
        deadline = time.monotonic() + self.retry_timeout_s
        pause = 0.01
        while True:
            target = self._next()
            try:
                return call(target.client)
            except RemoteError as e:
                if e.code != RETRIED or time.monotonic() >= deadline:
                    raise
                target.serving = False  # until its health says SERVING again
                log.debug("%s unavailable (%s): trying another target", target.address, e.details)
                with self._lock:
                    self.retries += 1
                if not any(t.serving for t in self.targets):
                    time.sleep(pause)  # everything is down: back off before probing again
                    pause = min(pause * 2, 0.5)

    # ------------------------------------------------------------------ reads

    def classify(self, *args: Any, **kwargs: Any) -> pb.ClassifyResponse:
        """FeatureBankClient.classify on the next serving target."""
        return self._read(lambda c: c.classify(*args, **kwargs))

    def classify_batch(self, *args: Any, **kwargs: Any) -> list[pb.ClassifyResponse]:
        """FeatureBankClient.classify_batch on the next serving target."""
        return self._read(lambda c: c.classify_batch(*args, **kwargs))

    def search(self, *args: Any, **kwargs: Any) -> pb.SearchResponse:
        """FeatureBankClient.search on the next serving target."""
        return self._read(lambda c: c.search(*args, **kwargs))

    def embed(self, *args: Any, **kwargs: Any) -> np.ndarray:
        """FeatureBankClient.embed on the next serving target."""
        return self._read(lambda c: c.embed(*args, **kwargs))

    def info(self, *args: Any, **kwargs: Any) -> pb.GetInfoResponse:
        """FeatureBankClient.info on the next serving target."""
        return self._read(lambda c: c.info(*args, **kwargs))
