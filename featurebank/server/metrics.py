"""Prometheus metrics of one server, exposed on their own port.

Each server gets its own registry so several servers (tests, benchmarks) can
live in one process without clashing metric names.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """Counters and gauges the servicer, batcher and auth interceptor update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "featurebank_requests", "RPCs handled, by method and status code",
            ["method", "code"], registry=r,
        )
        self.latency = Histogram(
            "featurebank_request_seconds", "RPC latency in seconds, by method and status code",
            ["method", "code"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge(
            "featurebank_requests_in_flight", "RPCs being handled now, by method",
            ["method"], registry=r,
        )
        self.batch_size = Histogram(
            "featurebank_batch_size", "Items per dynamic batch, by kind (embed, classify, search)",
            ["kind"], buckets=_BATCH_BUCKETS, registry=r,
        )
        self.bank_items = Gauge("featurebank_bank_items", "Live items in the store", registry=r)
        self.index_items = Gauge("featurebank_index_items", "Vectors in the live index", registry=r)
        self.store_generation = Gauge(
            "featurebank_store_generation", "Last committed store generation", registry=r
        )
        self.index_generation = Gauge(
            "featurebank_index_generation", "Index generation being served", registry=r
        )
        self.head_generation = Gauge(
            "featurebank_head_generation", "Head generation being served (0 = none)", registry=r
        )
        self.replica_generations_behind = Gauge(
            "featurebank_replica_generations_behind",
            "Store generations a read replica has not applied yet (replicas only)", registry=r,
        )
        self.replica_seconds_behind = Gauge(
            "featurebank_replica_seconds_behind",
            "Seconds since a read replica was last caught up with its bank, 0 when it is "
            "(replicas only)", registry=r,
        )
        self.follower_generations_behind = Gauge(
            "featurebank_follower_generations_behind",
            "Store generations a replica on another host has not applied yet (primaries only)",
            ["replica"], registry=r,
        )
        self._server: Any = None

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method, code).observe(seconds)

    def set_sizes(
        self,
        *,
        bank_items: int,
        index_items: int,
        store_generation: int,
        index_generation: int,
        head_generation: int | None,
    ) -> None:
        self.bank_items.set(bank_items)
        self.index_items.set(index_items)
        self.store_generation.set(store_generation)
        self.index_generation.set(index_generation)
        self.head_generation.set(head_generation or 0)

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
