"""Argument types that refuse what a user can get wrong, as one line, before any work.

argparse turns the ArgumentTypeError of each into `featurebank CMD: error: argument
--port: ...`, so a port past 65535 is refused instead of wrapping around (70000 would
otherwise bind 4464) and a negative k is refused instead of failing inside protobuf.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

MAX_PORT = 65535


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def at_least(low: int) -> Callable[[str], int]:
    """An int type with a lower bound (1: a count; 0: 0 means the default)."""

    def parse(text: str) -> int:
        value = _int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


def port(text: str) -> int:
    """A TCP port to listen on: 0 (any free one) to 65535."""
    value = _int(text)
    if not 0 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"a port is 0 to {MAX_PORT}, got {value}")
    return value


def server_address(text: str) -> str:
    """HOST:PORT of a server, or several separated by commas (each port 1 to 65535)."""
    for target in text.split(","):
        host, sep, port_s = target.strip().rpartition(":")
        if not sep or not host or not port_s.isdigit():
            raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {target.strip()!r}")
        if not 1 <= int(port_s) <= MAX_PORT:
            raise argparse.ArgumentTypeError(
                f"port {port_s} of {target.strip()!r} is not 1 to {MAX_PORT}"
            )
    return text


def show_progress(asked: bool = True) -> bool:
    """Progress bars only on a terminal: in a log file each redraw is a line of its own."""
    import sys

    return asked and sys.stderr.isatty()


positive = at_least(1)
non_negative = at_least(0)
