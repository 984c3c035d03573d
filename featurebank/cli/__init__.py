"""The `featurebank` command: a thin layer that parses arguments and prints.

Each area registers its own subcommands from `featurebank/cli/<area>.py`;
those modules import TensorFlow, FAISS or gRPC only inside their handlers, so
`featurebank --help` and store commands start fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from tqdm.contrib.logging import logging_redirect_tqdm

from featurebank.core.errors import FeaturebankError

AREAS = [
    "store", "repair", "items", "embed", "index", "head", "serve", "client", "banks", "queries",
    "labelling", "quality",
]

Handler = Callable[[argparse.Namespace], "int | None"]


class Commands:
    """Registry handed to each area: top-level commands and shared groups (`store`, `labels`, ...)."""

    def __init__(self, subparsers: Any) -> None:
        self._sub = subparsers
        self._groups: dict[str, Any] = {}

    def command(self, name: str, help: str, handler: Handler) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self._sub.add_parser(name, help=help, description=help)
        parser.set_defaults(handler=handler)
        return parser

    def subcommand(
        self, group: str, name: str, help: str, handler: Handler
    ) -> argparse.ArgumentParser:
        """Add `featurebank GROUP NAME`; several areas may add to one group."""
        if group not in self._groups:
            gp = self._sub.add_parser(group, help=f"{group} commands")
            self._groups[group] = gp.add_subparsers(dest=f"{group}_command", required=True)
        parser: argparse.ArgumentParser = self._groups[group].add_parser(
            name, help=help, description=help
        )
        parser.set_defaults(handler=handler)
        return parser


class Parser(argparse.ArgumentParser):
    """argparse, with a wrong argument told in one line (and where the usage is)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="featurebank",
        description="Feature-embedding store with similarity search and hybrid classification.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    commands = Commands(parser.add_subparsers(dest="command", required=True))
    for area in AREAS:
        importlib.import_module(f"featurebank.cli.{area}").register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        with logging_redirect_tqdm():  # a log line clears the progress bar, never shares its line
            code = int(args.handler(args) or 0)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
            return code
    except BrokenPipeError:  # the reader (`| head`) has all it wanted: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing more to flush at exit
        return 141  # as a process stopped by SIGPIPE
    except FeaturebankError as e:
        print(f"featurebank: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("featurebank: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
