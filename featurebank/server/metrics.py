"""Prometheus metrics of one server, exposed on their own port.

Each server gets its own registry so several servers (tests, benchmarks) can
live in one process without clashing metric names. Every series about a bank carries a
`bank` label (the bank's name; "" for what happens before a call reaches a bank, such as a
refused token or an unknown bank), so one server of many banks is watched per bank; the
batch sizes are the server's own, since all banks batch together.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """Counters and gauges the servicer, batcher and auth interceptor update.

    A `Metrics` is the server's (bank "") or, from `for_bank`, one bank's view of the same
    families: updates through a view carry its bank label.
    """

    def __init__(self) -> None:
        self.bank = ""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "featurebank_requests", "RPCs handled, by method and status code",
            ["bank", "method", "code"], registry=r,
        )
        self.latency = Histogram(
            "featurebank_request_seconds", "RPC latency in seconds, by method and status code",
            ["bank", "method", "code"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge(
            "featurebank_requests_in_flight", "RPCs being handled now, by method",
            ["bank", "method"], registry=r,
        )
        self.batch_size = Histogram(
            "featurebank_batch_size", "Items per dynamic batch, by kind (embed, classify, search)",
            ["kind"], buckets=_BATCH_BUCKETS, registry=r,
        )
        self.bank_items = Gauge("featurebank_bank_items", "Live items in the store", ["bank"], registry=r)
        self.index_items = Gauge("featurebank_index_items", "Vectors in the live index", ["bank"], registry=r)
        self.store_generation = Gauge(
            "featurebank_store_generation", "Last committed store generation", ["bank"], registry=r
        )
        self.index_generation = Gauge(
            "featurebank_index_generation", "Index generation being served", ["bank"], registry=r
        )
        self.head_generation = Gauge(
            "featurebank_head_generation", "Head generation being served (0 = none)", ["bank"], registry=r
        )
        self.replica_generations_behind = Gauge(
            "featurebank_replica_generations_behind",
            "Store generations a read replica has not applied yet (replicas only)", ["bank"],
            registry=r,
        )
        self.replica_seconds_behind = Gauge(
            "featurebank_replica_seconds_behind",
            "Seconds since a read replica was last caught up with its bank, 0 when it is "
            "(replicas only)", ["bank"], registry=r,
        )
        self.follower_generations_behind = Gauge(
            "featurebank_follower_generations_behind",
            "Store generations a replica on another host has not applied yet (primaries only)",
            ["bank", "replica"], registry=r,
        )
        self._server: Any = None
        self._series: dict[tuple[str, ...], Any] = {}  # per-call series by labels, all views

    def for_bank(self, name: str) -> Metrics:
        """This server's families, updated with `bank=name`."""
        view = copy.copy(self)
        view.bank = name
        return view

    def observe(self, method: str, code: str, seconds: float) -> None:
        key = (self.bank, method, code)
        series = self._series.get(key)
        if series is None:  # a labels() lookup costs more than the update: once per series
            series = self._series[key] = (self.requests.labels(*key), self.latency.labels(*key))
        series[0].inc()
        series[1].observe(seconds)

    def in_flight_of(self, method: str) -> Any:
        """The in-flight gauge of `method` on this bank (inc/dec around a call)."""
        key = (self.bank, method)
        gauge = self._series.get(key)
        if gauge is None:
            gauge = self._series[key] = self.in_flight.labels(*key)
        return gauge

    def observe_batch(self, kind: str, size: int) -> None:
        self.batch_size.labels(kind).observe(size)

    def set_replica_lag(self, generations_behind: int | None, seconds_behind: float) -> None:
        """A replica's lag behind its bank (generations unknown while it cannot read it)."""
        if generations_behind is not None:
            self.replica_generations_behind.labels(self.bank).set(generations_behind)
        self.replica_seconds_behind.labels(self.bank).set(seconds_behind)

    def set_follower_lag(self, replica: str, generations_behind: int) -> None:
        """How far a replica on another host following this bank is behind it."""
        self.follower_generations_behind.labels(self.bank, replica).set(generations_behind)

    def forget_bank(self) -> None:
        """Drop this bank's gauges (a dropped bank leaves no stale sizes behind)."""
        for gauge in (self.bank_items, self.index_items, self.store_generation,
                      self.index_generation, self.head_generation,
                      self.replica_generations_behind, self.replica_seconds_behind):
            with contextlib.suppress(KeyError):  # never set for this bank
                gauge.remove(self.bank)
        self.follower_generations_behind.remove_by_labels({"bank": self.bank})  # every replica

    def set_sizes(
        self,
        *,
        bank_items: int,
        index_items: int,
        store_generation: int,
        index_generation: int,
        head_generation: int | None,
    ) -> None:
        b = self.bank
        self.bank_items.labels(b).set(bank_items)
        self.index_items.labels(b).set(index_items)
        self.store_generation.labels(b).set(store_generation)
        self.index_generation.labels(b).set(index_generation)
        self.head_generation.labels(b).set(head_generation or 0)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the HTTP exporter; returns the bound port (useful with port 0)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
