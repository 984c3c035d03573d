"""The grpc.aio server around the servicer: limits, TLS, auth, health, reflection, shutdown.

Health (grpc.health.v1) means something: NOT_SERVING while the store and index
load, SERVING once classification can be answered, NOT_SERVING again as soon as
shutdown starts, so a load balancer drains the server before it goes away.
With `replica`, the server is a read replica of the bank (server/replica.py): a
read-only engine that follows the primary (with `data`, one on another machine, fed over
gRPC), and write RPCs refused before they are read.

Over 400 lines because it is the one place a server's parts are put together (its config,
engines per bank, interceptors, ports, health and shutdown order); each part it wires lives
in its own module.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from featurebank.core.bank import Bank
from featurebank.core.errors import FailedPrecondition, InvalidInput, NotFound
from featurebank.index.checkpoint import CheckpointPolicy
from featurebank.server.auth import AuthInterceptor, Tokens
from featurebank.server.banks import DEFAULT_IDLE_CLOSE_S, Banks, check_name, discover, is_bank
from featurebank.server.bounds import (
    DEFAULT_BATCH_TIMEOUT_MS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_QUEUED_ROWS,
    DEFAULT_SEARCH_THREADS,
    DEFAULT_STREAM_BYTES,
    DEFAULT_TOTAL_BYTES,
)
from featurebank.server.engine import Engine
from featurebank.server.limits import UpsertBudget
from featurebank.server.metrics import Metrics
from featurebank.server.reflection import enable_reflection
from featurebank.server.replica import DEFAULT_FOLLOW_INTERVAL_S, ReplicaEngine, ReplicaInterceptor
from featurebank.server.replication import DEFAULT_LOG_RETENTION
from featurebank.server.replication_copy import PrimaryLink, bootstrap
from featurebank.server.replication_follow import RemoteReplicaEngine
from featurebank.server.router import BankRouter
from featurebank.server.service import FeatureBankServicer
from featurebank.server.shared_batches import SharedBatches
from featurebank.server.shared_models import ModelPool
from featurebank.server.tls import server_credentials
from featurebank.store.header import read_only_fs
from featurebank.v1 import featurebank_pb2, featurebank_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = featurebank_pb2.DESCRIPTOR.services_by_name["FeatureBank"].full_name


@dataclass
class ServeConfig:
    """Everything `featurebank serve` can set; defaults are safe for a laptop."""

    bank: Path | None = None  # the default bank (answers requests that name none)
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = None
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_timeout_ms: float = DEFAULT_BATCH_TIMEOUT_MS
    tokens: Tokens | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    insecure: bool = False
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_concurrent_rpcs: int = 256
    grace_s: float = 10.0
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    max_upsert_stream_bytes: int = DEFAULT_STREAM_BYTES
    max_upsert_inflight_bytes: int = DEFAULT_TOTAL_BYTES
    device: str = "auto"  # where images are embedded: auto, cpu or gpu
    precision: str = "auto"  # auto (mixed on GPUs), mixed or float32
    checkpoint: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    max_queued_rows: int = DEFAULT_MAX_QUEUED_ROWS
    replica: bool = False  # open the bank read-only and follow its primary
    primary: str | None = None  # the primary's address, named when a replica refuses a write
    follow_interval_s: float = DEFAULT_FOLLOW_INTERVAL_S
    data: Path | None = None  # a replica on another host: its own copy of the primary's bank
    primary_bank: str = ""  # the bank it copies, by its name on the primary ("" = its default)
    primary_token: str | None = None  # what it presents to the primary (replicate or write role)
    primary_tls_ca: Path | None = None  # the CA the primary's TLS certificate chains to
    log_retention: int = DEFAULT_LOG_RETENTION  # change log generations kept at most for replicas
    banks_dir: Path | None = None  # serve every bank under this folder, by folder name
    named_banks: dict[str, Path] = field(default_factory=dict)  # --bank NAME=PATH
    default_bank: str | None = None  # which named bank answers requests that name none
    idle_close_s: float = DEFAULT_IDLE_CLOSE_S  # close a bank no call named for this long

    def bank_table(self) -> tuple[dict[str, Path], str | None]:
        """name -> folder of every bank served, and the default bank's name (None: none)."""
        table: dict[str, Path] = {}
        if self.banks_dir is not None:
            table.update(discover(Path(self.banks_dir)))
        for name, path in self.named_banks.items():
            if name in table and Path(table[name]).resolve() != Path(path).resolve():
                raise InvalidInput(f"--bank {name}={path}: a bank named {name!r} is already under --banks")
            table[name] = Path(path)
        default = self.default_bank
        if self.bank is not None:
            name = check_name(Path(self.bank).resolve().name, "the default bank's folder name")
            if name in table and Path(table[name]).resolve() != Path(self.bank).resolve():
                raise InvalidInput(f"--bank {self.bank}: a bank named {name!r} is already served")
            table[name], default = Path(self.bank), name
        if default is None and len(table) == 1 and self.banks_dir is None:
            default = next(iter(table))
        if default is not None and default not in table:
            raise NotFound(f"--default-bank {default}: no bank of that name is served")
        for name, path in table.items():
            if not is_bank(path):
                raise NotFound(f"bank {name!r}: {path} holds no bank (no store/ folder)")
        if not table and self.banks_dir is None:
            raise InvalidInput("serve needs --bank PATH, --bank NAME=PATH or --banks DIR")
        return table, default

    def check(self) -> None:
        """Refuse configurations that would expose the bank by accident."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidInput("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidInput("--tls-client-ca needs --tls-cert and --tls-key")
        for flag, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key),
                           ("--tls-client-ca", self.tls_client_ca),
                           ("--primary-tls-ca", self.primary_tls_ca)):
            if path is None:
                continue
            if not Path(path).exists():
                raise NotFound(f"{flag} {path} does not exist")
            if Path(path).is_dir():
                raise InvalidInput(f"{flag} {path} is a folder, not a PEM file")
        if self.primary is not None and not self.replica:
            raise InvalidInput("--primary names the primary of a read replica: add --replica")
        if self.data is not None:
            other = self.banks_dir is not None or bool(self.named_banks) or (
                self.bank is not None and Path(self.bank).resolve() != Path(self.data).resolve())
            check_data_options(self.replica, self.primary, other)
        if self.replica and self.checkpoint != CheckpointPolicy():
            raise InvalidInput(
                "--checkpoint-* options are the primary's: a read replica publishes nothing, "
                "it loads the generations its primary's checkpoints publish"
            )
        if self.max_batch_size < 1:
            raise InvalidInput(f"--max-batch-size must be >= 1, got {self.max_batch_size}")
        if self.batch_timeout_ms < 0:
            raise InvalidInput(f"--batch-timeout-ms must be >= 0, got {self.batch_timeout_ms}")
        self.upsert_budget()  # refuses bounds that are not positive or not ordered
        if self.max_queued_rows < 1:
            raise InvalidInput(f"--max-queued-items must be >= 1, got {self.max_queued_rows}")
        secured = self.tls_cert is not None or (self.tokens is not None and self.tokens.enabled)
        if not is_loopback(self.host) and not secured and not self.insecure:
            raise FailedPrecondition(
                f"refusing to listen on {self.host} without TLS or tokens: pass "
                "--tls-cert/--tls-key or --tokens (or FEATUREBANK_*_TOKEN), or --insecure"
            )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def auth(self) -> str:
        """The authentication mode, as the startup line states it."""
        if self.tokens is None or not self.tokens.enabled:
            return "auth off"
        return f"auth by tokens ({self.tokens.describe()})"

    @property
    def transport(self) -> str:
        if not self.tls:
            return "plaintext"
        return "mutual TLS" if self.tls_client_ca is not None else "TLS"

    def upsert_budget(self) -> UpsertBudget:
        return UpsertBudget(self.max_upsert_stream_bytes, self.max_upsert_inflight_bytes)


def check_data_options(replica: bool, primary: str | None, other_banks: bool) -> None:
    """--data (a replica on another host) goes with --replica --primary, and no other bank."""
    if not replica or not primary:
        raise InvalidInput("--data DIR is a replica's own copy of its primary's bank: "
                           "add --replica --primary HOST:PORT")
    if other_banks:
        raise InvalidInput("--data DIR is the bank a replica serves: give no --bank or --banks")


def primary_link(config: ServeConfig) -> PrimaryLink:
    """How a replica on another host reaches its primary."""
    assert config.primary is not None
    return PrimaryLink(config.primary, config.primary_bank, config.primary_token,
                       config.primary_tls_ca)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class FeatureBankServer:
    """One running server: `await start()`, then `await stop()` (or run `serve`)."""

    def __init__(self, config: ServeConfig) -> None:
        config.check()
        if config.data is not None:  # copy the primary's bank first (no-op once copied)
            bootstrap(primary_link(config), Path(config.data))
            config.bank = Path(config.data)
        table, default = config.bank_table()
        if (not config.replica and len(table) == 1 and default is not None
                and read_only_fs(Bank(table[default]).store_dir)):
            log.warning("bank %s is on a read-only file system: serving it read-only "
                        "(writes are refused)", table[default])
            config.replica = True
        self.config = config
        self.metrics = Metrics()
        self.models = ModelPool()  # banks of one backbone share its model
        self.compute = ThreadPoolExecutor(DEFAULT_SEARCH_THREADS, thread_name_prefix="fb-search")
        self.batches = SharedBatches(  # calls of all banks batch together
            self.compute, max_batch_size=config.max_batch_size,
            batch_timeout_ms=config.batch_timeout_ms, search_threads=DEFAULT_SEARCH_THREADS,
            on_batch=self.metrics.observe_batch,
        )
        self.banks = Banks(
            table, self._make_engine, default=default, root=config.banks_dir,
            idle_close_s=config.idle_close_s,
        )
        self.engine: Engine | None = None  # the default bank's, opened at start
        if default is not None:
            self.engine = self._make_engine(default, table[default])
            self.banks.pin(self.engine)
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port: int | None = None
        self._server: aio.Server | None = None
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False

    def _make_engine(self, name: str, path: Path) -> Engine:
        """An engine for bank `name`, not yet open: a replica's or a primary's."""
        c = self.config
        options: dict[str, Any] = {
            "max_batch_size": c.max_batch_size,
            "batch_timeout_ms": c.batch_timeout_ms,
            "metrics": self.metrics.for_bank(name),
            "device": c.device,
            "precision": c.precision,
            "models": self.models,
            "compute": self.compute,
            "batches": self.batches,
        }
        if c.replica and c.data is not None:
            return RemoteReplicaEngine(
                path, link=primary_link(c), follow_interval_s=c.follow_interval_s, **options
            )
        read_only = not c.replica and read_only_fs(Bank(path).store_dir)
        if read_only:  # one of several banks on a read-only mount: read it, refuse writes
            log.warning("bank %s is on a read-only file system: serving it read-only", path)
        if c.replica or read_only:
            return ReplicaEngine(
                path, primary=c.primary, follow_interval_s=c.follow_interval_s, **options
            )
        return Engine(path, checkpoint=c.checkpoint, max_queued_rows=c.max_queued_rows, **options)

    def _grpc_server(self) -> aio.Server:
        c = self.config
        interceptors = []
        if c.tokens is not None and c.tokens.enabled:
            interceptors.append(AuthInterceptor(c.tokens, on_denied=self._denied))
        if c.replica:
            interceptors.append(ReplicaInterceptor(c.primary, on_refused=self._denied))
        options = [
            ("grpc.max_send_message_length", c.max_message_bytes),
            ("grpc.max_receive_message_length", c.max_message_bytes),
            ("grpc.keepalive_time_ms", int(c.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(c.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.so_reuseport", 0),
        ]
        return aio.server(
            interceptors=interceptors,
            options=options,
            maximum_concurrent_rpcs=c.max_concurrent_rpcs,
        )

    def _denied(self, method: str, code: grpc.StatusCode) -> None:
        self.metrics.observe(method.rsplit("/", 1)[-1], code.name, 0.0)

    async def start(self) -> None:
        """Bind and answer health (NOT_SERVING) at once, then load the bank and index."""
        c = self.config
        credentials = None
        if c.tls_cert is not None and c.tls_key is not None:  # checked before binding
            credentials = server_credentials(c.tls_cert, c.tls_key, c.tls_client_ca)
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = self._grpc_server()
        self._server = server
        budget = c.upsert_budget()  # one budget for the streams of every bank
        router = BankRouter(
            self.banks, lambda engine: FeatureBankServicer(engine, engine.metrics, budget),
            self.metrics, c.tokens, log_retention=c.log_retention,
        )
        featurebank_pb2_grpc.add_FeatureBankServicer_to_server(router, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        enable_reflection((SERVICE_NAME, health.SERVICE_NAME), server)
        await self._set_health(False)
        address = f"{c.host}:{c.port}" if ":" not in c.host else f"[{c.host}]:{c.port}"
        try:
            if credentials is not None:
                self.port = server.add_secure_port(address, credentials)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:  # gRPC says only "Failed to bind"
            self.port = 0
        if self.port == 0:
            raise FailedPrecondition(
                f"could not listen on {address}: the port is in use, or the host is not an "
                "address of this machine (--host, --port)"
            )
        await server.start()
        if c.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve(c.metrics_port, host=c.host)
            except OSError as e:
                await self.stop(grace=0)
                raise FailedPrecondition(
                    f"could not serve metrics on {c.host}:{c.metrics_port}: {e.strerror or e} "
                    "(--metrics-port)"
                ) from None
        if self.engine is not None:
            self.engine.on_ready = self._ready_changed
        try:
            await self.banks.open_pinned()
        except BaseException:
            await self.stop(grace=0)
            raise
        self.banks.start()
        await self._set_health(self.ready)
        log.info(
            "serving %d bank(s) on %s (%s, %s, ready=%s, %s)", len(self.banks.entries), address,
            c.transport, c.auth, self.ready, "read replica" if c.replica else "primary",
        )

    @property
    def ready(self) -> bool:
        """The default bank can classify; without a default bank, once started."""
        return self.engine.ready if self.engine is not None else self._server is not None

    def _ready_changed(self, ready: bool) -> None:
        """Called from engine threads after a (re)load; health follows on the loop."""
        loop = self._loop
        if loop is None or self._stopped or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(self._set_health(ready), loop)

    async def _set_health(self, serving: bool) -> None:
        if self._stopped:
            serving = False
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, let in-flight calls finish within the grace period, close the store."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        await self.banks.close()
        await self.batches.close()
        await asyncio.get_running_loop().run_in_executor(None, self.compute.shutdown)
        self.metrics.close()
        if self._stopping is not None:
            self._stopping.set()
        log.info("stopped")

    async def wait(self) -> None:
        """Until `stop` has finished."""
        assert self._stopping is not None
        await self._stopping.wait()


async def serve(config: ServeConfig, on_started: Callable[[FeatureBankServer], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = FeatureBankServer(config)
    loop = asyncio.get_running_loop()
    stop_task: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        log.info("signal %d: shutting down (grace %.1fs)", signum, config.grace_s)
        if not stop_task:
            stop_task.append(loop.create_task(server.stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await server.start()
        if on_started is not None:
            on_started(server)
        await server.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.stop(grace=0)
