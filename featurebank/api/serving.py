"""Serving a bank from a notebook: the gRPC server on its own event-loop thread.

`featurebank serve` runs the same FeatureBankServer in the foreground; here it runs beside
the caller's code, so a notebook can serve its bank and connect to it in the next cell.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path
from typing import Any

from featurebank.api.base import check_options
from featurebank.server.app import FeatureBankServer, ServeConfig
from featurebank.server.auth import Tokens

START_TIMEOUT_S = 300.0  # building the model of a large backbone takes a while
STOP_TIMEOUT_S = 120.0


class Served:
    """A bank being served from this process; `stop()` (or leaving a `with` block) ends it."""

    def __init__(self, server: FeatureBankServer, loop: asyncio.AbstractEventLoop,
                 thread: threading.Thread, token: str | None) -> None:  # fmt: skip
        self._server = server
        self._loop = loop
        self._thread = thread
        self.token = token
        self.running = True

    @classmethod
    def start(
        cls, bank: Path, host: str, port: int, token: str | None, options: dict[str, Any]
    ) -> Served:
        """Bind, load the bank and wait until it answers (SERVING when it has an index)."""
        fixed = {"bank", "host", "port", "tokens"}
        check_options(options, {f.name for f in dataclasses.fields(ServeConfig)} - fixed, "serve")
        tokens = Tokens({"write": [token]}) if token else None
        config = ServeConfig(bank=Path(bank), host=host, port=port, tokens=tokens, **options)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="fb-served", daemon=True)
        thread.start()
        try:
            server = FeatureBankServer(config)
            asyncio.run_coroutine_threadsafe(server.start(), loop).result(START_TIMEOUT_S)
        except BaseException:
            _end(loop, thread)
            raise
        return cls(server, loop, thread, token)

    @property
    def address(self) -> str:
        """host:port to pass to `featurebank.connect`."""
        host = self._server.config.host
        return f"{f'[{host}]' if ':' in host else host}:{self._server.port}"

    def connect(self, **options: Any) -> Any:
        """A client of this server (`featurebank.connect(self.address, token=...)`)."""
        from featurebank.api.remote import connect

        return connect(self.address, token=self.token, **options)

    def stop(self, grace: float = 1.0) -> None:
        """Let calls in flight finish within `grace` seconds, then close the server's store."""
        if not self.running:
            return
        self.running = False
        try:
            asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop).result(
                STOP_TIMEOUT_S
            )
        finally:
            _end(self._loop, self._thread)

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Served({self.address!r}, running={self.running})"


def _end(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)
    loop.close()
