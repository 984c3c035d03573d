"""A bare grpc.aio server in its own process: the framework's floor that benchmarks time
featurebank against (the same method sizes with no work behind them)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Sequence
from typing import Any


def serve_forever(handler: Any, port: int, options: Sequence[tuple[str, Any]] = ()) -> int:
    """Serve one generic handler on loopback `port` until killed."""
    import asyncio

    from grpc import aio

    async def run() -> None:
        server = aio.server(options=list(options))
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())
    return 0


def wait_for_port(port: int, proc: subprocess.Popen[Any], what: str, seconds: float = 60) -> None:
    """Return once something listens on loopback `port`; SystemExit when `proc` (the
    server meant to) died or `seconds` passed."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"precondition failed: {what} did not start") from None
            time.sleep(0.1)
