"""`featurebank serve`: run the gRPC service over one bank, or many by name, until SIGTERM."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from featurebank.cli import Commands
from featurebank.cli import args as args_
from featurebank.core.vocabulary import DEVICES, PRECISIONS


def register(commands: Commands) -> None:
    p = commands.command("serve", "serve a bank over gRPC (classify, search, upsert, rebuild)", _serve)
    p.add_argument("--bank", action="append", default=[], metavar="[NAME=]PATH",
                   help="a bank directory: PATH is the default bank (requests naming no bank), "
                   "NAME=PATH serves it by NAME; repeat for more")
    p.add_argument("--banks", type=Path, default=None, metavar="DIR",
                   help="serve every bank under DIR by its folder name (and CreateBank there)")
    p.add_argument("--default-bank", default=None, metavar="NAME",
                   help="which named bank answers requests that name none")
    p.add_argument("--idle-close-s", type=float, default=300.0,
                   help="close a bank no call has named for this many seconds (the default "
                   "bank stays open)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=args_.port, default=50051, help="gRPC port (0 = any free port)")
    p.add_argument("--metrics-port", type=args_.port, default=None, help="Prometheus metrics port")
    p.add_argument("--max-batch-size", type=int, default=64,
                   help="largest dynamic batch (1 turns batching off)")
    p.add_argument("--batch-timeout-ms", type=float, default=2.0,
                   help="how long a batch waits for more requests")
    p.add_argument("--max-concurrent-rpcs", type=int, default=256,
                   help="calls beyond this get RESOURCE_EXHAUSTED")
    p.add_argument("--max-message-mb", type=float, default=16.0, help="largest message, MiB")
    p.add_argument("--max-upsert-stream-mb", type=float, default=256.0,
                   help="most one Upsert stream may hold before it commits, MiB (it commits "
                   "all at once; past this the call fails with RESOURCE_EXHAUSTED)")
    p.add_argument("--max-upsert-inflight-mb", type=float, default=1024.0,
                   help="most all Upsert streams together may hold, MiB")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds in-flight calls get to finish on SIGTERM")
    p.add_argument("--tokens", type=Path, default=None,
                   help="file of 'ROLE TOKEN' lines (roles read, write, replicate); also "
                   "FEATUREBANK_READ_TOKEN / FEATUREBANK_WRITE_TOKEN / FEATUREBANK_REPLICATE_TOKEN")
    p.add_argument("--tls-cert", type=Path, default=None, help="server certificate (PEM)")
    p.add_argument("--tls-key", type=Path, default=None, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path, default=None,
                   help="CA that client certificates must chain to (mutual TLS)")
    p.add_argument("--checkpoint-items", type=int, default=20_000,
                   help="fold items written since the index into a new generation once this "
                   "many are pending (0: no item limit)")
    p.add_argument("--checkpoint-mb", type=float, default=64.0,
                   help="... or once they take this many MiB in memory (0: no limit)")
    p.add_argument("--checkpoint-seconds", type=float, default=300.0,
                   help="... or once the oldest is this old (0: no time limit)")
    p.add_argument("--max-queued-items", type=int, default=100_000,
                   help="items waiting for the writer beyond which Upserts get "
                   "RESOURCE_EXHAUSTED with a retry hint")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback address without TLS or tokens")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where images are embedded (auto: every local GPU if any, else the "
                   "CPU; gpu: fail if there is none)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="compute precision for images (auto: mixed on GPUs, float32 on the CPU)")
    p.add_argument("--replica", action="store_true",
                   help="read replica: open the bank read-only, follow its primary, refuse writes")
    p.add_argument("--primary", default=None,
                   help="a replica's primary (host:port), named when it refuses a write")
    p.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="a replica on another host: its own folder, copied from --primary over "
                   "gRPC when empty, then kept on the primary's commits (docs/scale.md); token "
                   "for the primary from FEATUREBANK_PRIMARY_TOKEN (replicate or write role)")
    p.add_argument("--primary-bank", default="", metavar="NAME",
                   help="with --data: the bank to copy, by its name on the primary (default: "
                   "the primary's default bank)")
    p.add_argument("--primary-tls-ca", type=Path, default=None, metavar="PEM",
                   help="with --data: reach the primary over TLS, its certificate checked "
                   "against this CA")
    p.add_argument("--log-retention", type=int, default=None, metavar="GENERATIONS",
                   help="a primary keeps its change log for replicas on other hosts at most "
                   "this many generations back (older ones copy a snapshot again)")
    p.add_argument("--follow-interval", type=float, default=None,
                   help="seconds between a replica's looks for new commits and generations; "
                   "bounds its staleness (see README, Read replicas)")


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import os

    # gRPC's core repeats in its own words what the error line says (a port in use); -v
    # shows it. Read once, when grpc is first imported below.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR" if args.verbose else "NONE")

    from featurebank import store as store_mod
    from featurebank.core.errors import InvalidInput
    from featurebank.core.memory import fix_mmap_threshold, limit_arenas
    from featurebank.index.checkpoint import CheckpointPolicy
    from featurebank.server.app import ServeConfig, serve
    from featurebank.server.banks import parse_bank_option

    # Before any thread starts (TensorFlow's included): resident memory follows what is in
    # use through rebuilds and folds (see memory).
    limit_arenas(2)
    fix_mmap_threshold()
    default, named = None, {}
    primary_token = os.environ.get("FEATUREBANK_PRIMARY_TOKEN") or None
    if args.data is not None:
        default = _bootstrap(args, primary_token)
    for value in args.bank:
        name, path = parse_bank_option(value)
        if name is None:
            if default is not None:
                raise InvalidInput(f"--bank {value}: only one --bank PATH is the default bank "
                                   "(name the others: --bank NAME=PATH)")
            default = path
        else:
            named[name] = path
    config = ServeConfig(bank=default, named_banks=named, banks_dir=args.banks,
                         default_bank=args.default_bank, idle_close_s=args.idle_close_s)
    table, default_name = config.bank_table()
    has_model = False
    for path in table.values():
        with store_mod.open(path, readonly=True) as st:
            has_model = has_model or st.spec.has_model
    if has_model:  # TensorFlow starts now, quietly, rather than inside the server
        from featurebank.embedder.devices import load_tensorflow

        load_tensorflow(verbose=args.verbose > 0)
    from featurebank.server.auth import Tokens

    config = replace(
        config,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        max_batch_size=args.max_batch_size,
        batch_timeout_ms=args.batch_timeout_ms,
        tokens=Tokens.load(args.tokens),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        insecure=args.insecure,
        max_message_bytes=int(args.max_message_mb * (1 << 20)),
        max_upsert_stream_bytes=int(args.max_upsert_stream_mb * (1 << 20)),
        max_upsert_inflight_bytes=int(args.max_upsert_inflight_mb * (1 << 20)),
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        grace_s=args.grace,
        device=args.device,
        precision=args.precision,
        checkpoint=CheckpointPolicy(
            max_items=args.checkpoint_items, max_bytes=int(args.checkpoint_mb * (1 << 20)),
            max_seconds=args.checkpoint_seconds,
        ),
        max_queued_rows=args.max_queued_items,
        replica=args.replica,
        primary=args.primary,
        data=args.data,
        primary_bank=args.primary_bank,
        primary_token=primary_token,
        primary_tls_ca=args.primary_tls_ca,
    )
    if args.log_retention is not None:
        config.log_retention = args.log_retention
    if args.follow_interval is not None:
        config.follow_interval_s = args.follow_interval

    def started(server: Any) -> None:
        metrics = f", metrics on port {server.metrics_port}" if server.metrics_port else ""
        role = f"read replica of {args.primary or 'its primary'} " if args.replica else ""
        engine = server.engine
        if engine is None:
            what = f"{len(table)} banks from {args.banks}" if args.banks else f"{len(table)} banks"
            state = "no default bank (requests name one); banks open on first use"
            images = ""
        else:
            what = str(table[str(default_name)])
            if len(table) > 1:
                what += f" (default) and {len(table) - 1} more bank(s)"
            state = (
                "serving" if engine.ready
                else f"NOT_SERVING: {engine.load_error}" if "damaged" in str(engine.load_error)
                else "NOT_SERVING until an index is built"
            )
            if engine.ready and engine.degraded:
                state += f" DEGRADED: {'; '.join(engine.degraded)} ({engine.repair_state})"
            images = f"; images: {engine.device_report()['description']}"
        print(
            f"featurebank: {role}{what} on {args.host}:{server.port} "
            f"({config.transport}, {config.auth}{metrics}); {state}{images}",
            flush=True,
        )

    asyncio.run(serve(config, on_started=started))
    print("featurebank: stopped", file=sys.stderr, flush=True)
    return 0


def _bootstrap(args: argparse.Namespace, token: str | None) -> Path:
    """Copy the primary's bank into --data (resuming a copy left half done), with progress."""
    import time

    from featurebank.server.app import check_data_options
    from featurebank.server.replication_copy import PrimaryLink, bootstrap, read_state

    check_data_options(args.replica, args.primary, bool(args.bank or args.banks))
    if read_state(args.data) is not None:
        return Path(args.data)
    shown = [0.0]

    def progress(held: int, total: int) -> None:
        if time.monotonic() - shown[0] >= 2 or held == total:
            shown[0] = time.monotonic()
            print(f"featurebank: copying from {args.primary}: {held / 2**20:.1f} of "
                  f"{total / 2**20:.1f} MiB", flush=True)

    link = PrimaryLink(args.primary, args.primary_bank, token, args.primary_tls_ca)
    state = bootstrap(link, args.data, progress)
    print(f"featurebank: copied {state['bootstrap_bytes'] / 2**20:.1f} MiB from {args.primary} "
          f"in {state['bootstrap_seconds']:.2f}s into {args.data}", flush=True)
    return Path(args.data)
