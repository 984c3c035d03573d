"""The banks one server serves, by name: opened on first use, closed when idle.

Why a registry: a process per bank multiplies TensorFlow, models, ports and tokens. Here
a bank that no call has named for `idle_close_s` holds no store, index or model in
memory, only its entry (name, folder, state). A bank is opened by the first call naming
it (calls arriving meanwhile wait for that one open) and closed by the idle sweep once
no call is in flight; a call never sees a bank closed under it.

Names resolve through aliases first (`aliases.json` beside the banks of `--banks DIR`),
so `SetAlias` switches every later call at once while calls in flight finish on the
bank they started on. The default bank (empty name) is pinned open: a single-bank
server behaves as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featurebank.core.bank import Bank, write_atomic
from featurebank.core.errors import FailedPrecondition, InvalidInput, NotFound
from featurebank.server.status import hide_path, redacted

if TYPE_CHECKING:
    from featurebank.server.engine import Engine

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ALIASES_FILE = "aliases.json"
DEFAULT_IDLE_CLOSE_S = 300.0
MAX_NAMED = 10  # unknown-bank errors list at most this many of the server's names


def check_name(name: str, what: str = "bank name") -> str:
    """A bank or alias name: letters, digits, '.', '_', '-', at most 64, no path."""
    if not NAME.fullmatch(name):
        raise InvalidInput(
            f"{what} {name!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def is_bank(folder: Path) -> bool:
    """A folder holding a bank's store (what `--banks DIR` serves)."""
    return Bank(folder).store_dir.is_dir()


def discover(root: Path) -> dict[str, Path]:
    """name -> folder of every bank directly under `root`."""
    if not root.is_dir():
        raise NotFound(f"--banks {root} is not a folder")
    return {
        p.name: p for p in sorted(root.iterdir())
        if p.is_dir() and NAME.fullmatch(p.name) and is_bank(p)
    }


def parse_bank_option(value: str) -> tuple[str | None, Path]:
    """`--bank NAME=PATH` or `--bank PATH` (then the default bank, named by its folder)."""
    name, sep, path = value.partition("=")
    if not sep:
        return None, Path(value)
    if not path:
        raise InvalidInput(f"--bank {value}: expected NAME=PATH")
    return check_name(name), Path(path)


@dataclass
class Entry:
    """One bank of the server and, while open, its engine."""

    name: str
    path: Path
    pinned: bool = False  # the default bank: opened at start, never closed when idle
    engine: Engine | None = None
    state: str = "idle"
    error: str | None = None
    in_flight: int = 0
    opens: int = 0  # times opened since the server started
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    servicer: Any = None  # the servicer over `engine`, made by the router

    def describe(self, now: float) -> dict[str, Any]:
        engine = self.engine
        error = self.error
        if engine is not None and error is None and not engine.ready:
            error = redacted(engine.load_error or "no index yet: run RebuildIndex first")
        return {
            "name": self.name,
            "state": self.state,
            "error": error or "",
            "idle_s": 0.0 if self.in_flight else max(0.0, now - self.last_used),
        }


EngineFactory = Callable[[str, Path], "Engine"]  # (bank name, folder)


class Banks:
    """name -> Entry, with aliases, lazy opening and the idle sweep."""

    def __init__(
        self,
        banks: dict[str, Path],
        make_engine: EngineFactory,
        *,
        default: str | None = None,
        root: Path | None = None,
        idle_close_s: float = DEFAULT_IDLE_CLOSE_S,
    ) -> None:
        if idle_close_s <= 0:
            raise InvalidInput(f"--idle-close-s must be > 0, got {idle_close_s}")
        if default is not None and default not in banks:
            raise NotFound(f"default bank {default!r} is not among the banks served")
        self.make_engine = make_engine
        self.root = root
        self.idle_close_s = idle_close_s
        self.default = default
        self.entries: dict[str, Entry] = {}
        for name, path in banks.items():
            self._add(name, path, pinned=name == default)
        self.aliases: dict[str, str] = self._load_aliases()
        self._sweeper: asyncio.Task[None] | None = None

    def _add(self, name: str, path: Path, pinned: bool = False) -> Entry:
        hide_path(path)
        entry = Entry(check_name(name), Path(path), pinned=pinned)
        self.entries[name] = entry
        return entry

    # ------------------------------------------------------------------ names

    def resolve(self, name: str) -> Entry:
        """The entry a request's `bank` names (alias or bank; empty = the default)."""
        if not name:
            if self.default is None:
                raise InvalidInput(
                    f"this server serves {len(self.entries)} banks and none is the default: "
                    "name one in the request's bank field (GetInfo lists them)"
                )
            return self.entries[self.default]
        target = self.aliases.get(name, name)
        entry = self.entries.get(target)
        if entry is None:
            if name in self.aliases:
                raise NotFound(f"alias {name!r} points to bank {target!r}, which this server no longer serves")
            raise NotFound(f"no bank {name!r} on this server (banks: {self._names()})")
        return entry

    def _names(self) -> str:
        names = sorted(self.entries)
        shown = ", ".join(names[:MAX_NAMED])
        return shown + (f", ... {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else "")

    def aliases_of(self, name: str) -> list[str]:
        return sorted(a for a, b in self.aliases.items() if b == name)

    def state(self, entry: Entry) -> dict[str, Any]:
        """One bank's state as GetInfo lists it (BankState's fields)."""
        return {**entry.describe(time.monotonic()), "is_default": entry.name == self.default,
                "aliases": self.aliases_of(entry.name)}

    def states(self) -> list[dict[str, Any]]:
        """Every bank's state, without opening any (GetInfo)."""
        return [self.state(self.entries[name]) for name in sorted(self.entries)]

    # ------------------------------------------------------------------ aliases

    def _load_aliases(self) -> dict[str, str]:
        path = None if self.root is None else self.root / ALIASES_FILE
        if path is None or not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in data.items()
            ):
                raise ValueError("expected an object of alias -> bank names")
        except (OSError, ValueError) as e:
            raise InvalidInput(f"aliases file {path} is damaged: {e}") from None
        return {k: v for k, v in data.items() if k not in self.entries}

    def set_alias(self, alias: str, bank: str) -> str:
        """Point `alias` at `bank` ("" removes it), saved, then switched: the previous target."""
        check_name(alias, "alias")
        self.lifecycle_root("SetAlias")
        if alias in self.entries:
            raise FailedPrecondition(f"alias {alias!r} is the name of a bank: choose another name")
        if bank and bank not in self.entries:
            raise NotFound(f"no bank {bank!r} on this server (banks: {self._names()})")
        aliases = dict(self.aliases)
        previous = aliases.pop(alias, "")
        if bank:
            aliases[alias] = bank
        self._save_aliases(aliases, "SetAlias")
        log.info("alias %s -> %s (was %s)", alias, bank or "(removed)", previous or "(new)")
        return previous

    def _save_aliases(self, aliases: dict[str, str], what: str) -> None:
        """Write the aliases file, then switch: one assignment, so a call resolves against
        the old map or the new one, never a mix."""
        path = self.lifecycle_root(what) / ALIASES_FILE
        write_atomic(path, json.dumps(aliases, indent=1, sort_keys=True).encode())
        self.aliases = aliases

    def lifecycle_root(self, what: str) -> Path:
        if self.root is None:
            raise FailedPrecondition(f"{what} needs a server started with --banks DIR")
        return self.root

    # ------------------------------------------------------------------ lifecycle

    def add(self, name: str, path: Path) -> Entry:
        """Serve a bank created under the root (CreateBank)."""
        if name in self.entries or name in self.aliases:
            raise FailedPrecondition(f"bank {name!r} already exists on this server")
        return self._add(name, path)

    async def remove(self, name: str) -> Entry:
        """Stop serving `name` (DropBank): waits for its calls, closes it, forgets its aliases."""
        entry = self.entries.get(name)
        if entry is None:
            raise NotFound(f"no bank {name!r} on this server (banks: {self._names()})")
        if entry.pinned:
            raise FailedPrecondition(f"bank {name!r} is the server's default bank: it cannot be dropped")
        async with entry.lock:
            del self.entries[name]
            while entry.in_flight:
                await asyncio.sleep(0.01)
            await self._close(entry)
        if any(b == name for b in self.aliases.values()):
            self._save_aliases({a: b for a, b in self.aliases.items() if b != name}, "DropBank")
        return entry

    def using(self, name: str) -> Using:
        """The open engine of the bank `name` resolves to, held open for the call
        (`async with banks.using(name) as (entry, engine)`)."""
        return Using(self, name)

    async def _opened(self, name: str) -> tuple[Entry, Engine]:
        entry = self.resolve(name)
        while entry.engine is None:
            async with entry.lock:
                if entry.engine is None:
                    if entry.name not in self.entries:
                        raise NotFound(f"bank {entry.name!r} was dropped")
                    await self._open(entry)
        engine = entry.engine
        entry.in_flight += 1  # no await since the check above: the sweep cannot close it now
        return entry, engine

    async def _open(self, entry: Entry) -> None:
        entry.state, entry.error = "loading", None
        engine = self.make_engine(entry.name, entry.path)
        try:
            await asyncio.get_running_loop().run_in_executor(None, engine.open)
        except BaseException as e:
            with contextlib.suppress(Exception):
                await engine.close()
            entry.state = "failed"
            entry.error = redacted(str(e) or type(e).__name__)
            log.warning("bank %s failed to open: %s", entry.name, e)
            raise
        entry.engine, entry.state = engine, "open"
        entry.opens += 1
        entry.last_used = time.monotonic()
        log.info("bank %s opened", entry.name)

    async def _close(self, entry: Entry) -> None:
        engine, entry.engine, entry.servicer = entry.engine, None, None
        if engine is not None:
            await engine.close()
            log.info("bank %s closed", entry.name)
        if entry.state != "failed":
            entry.state = "idle"

    def pin(self, engine: Engine) -> None:
        """Serve the default bank with `engine`, opened by `open_pinned` at start and kept
        open: until then its calls are answered UNAVAILABLE, as a single-bank server does."""
        assert self.default is not None
        entry = self.entries[self.default]
        entry.engine, entry.state = engine, "loading"

    async def open_pinned(self) -> None:
        """Open the default bank's engine (blocking work off the loop)."""
        if self.default is None:
            return
        entry = self.entries[self.default]
        assert entry.engine is not None
        try:
            await asyncio.get_running_loop().run_in_executor(None, entry.engine.open)
        except BaseException as e:
            entry.state, entry.error = "failed", redacted(str(e) or type(e).__name__)
            raise
        entry.state = "open"

    def start(self) -> None:
        """Begin the idle sweep (on the running loop)."""
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        interval = min(1.0, self.idle_close_s / 2)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001 - one bank's failed close must not stop the sweep
                log.exception("idle sweep failed")

    async def sweep(self) -> list[str]:
        """Close every unpinned bank idle for `idle_close_s`: the names closed.

        A closed engine's parts refer to each other (batchers hold their bank's methods),
        so its index is freed by the cycle collector, not at once; collecting and handing
        the freed heap back to the OS here is what makes an idle bank cost no memory."""
        closed: list[str] = []
        for entry in list(self.entries.values()):
            if entry.pinned or entry.engine is None or entry.in_flight:
                continue
            if time.monotonic() - entry.last_used < self.idle_close_s:
                continue
            async with entry.lock:
                idle = time.monotonic() - entry.last_used >= self.idle_close_s
                if entry.engine is not None and not entry.in_flight and idle:
                    await self._close(entry)
                    closed.append(entry.name)
        if closed:
            await asyncio.get_running_loop().run_in_executor(None, _free_memory)
        return closed

    def open_engines(self) -> Iterable[Engine]:
        return [e.engine for e in self.entries.values() if e.engine is not None]

    async def close(self) -> None:
        """Stop the sweep and close every open bank."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for entry in list(self.entries.values()):
            async with entry.lock:
                await self._close(entry)


def _free_memory() -> None:
    import gc

    from featurebank.core.memory import release_free_memory

    gc.collect()
    release_free_memory()


class Using:
    """A bank held open for one call (`Banks.using`): a class, not a generator, since every
    call enters one."""

    __slots__ = ("banks", "name", "entry")

    def __init__(self, banks: Banks, name: str) -> None:
        self.banks, self.name = banks, name
        self.entry: Entry | None = None

    async def __aenter__(self) -> tuple[Entry, Engine]:
        self.entry, engine = await self.banks._opened(self.name)
        return self.entry, engine

    async def __aexit__(self, *exc: object) -> None:
        assert self.entry is not None
        self.entry.in_flight -= 1
        self.entry.last_used = time.monotonic()
