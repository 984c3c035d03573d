"""`featurebank banks list|create|drop|alias`: the banks of a running multi-bank server."""

from __future__ import annotations

import argparse
import json

from featurebank.cli import Commands
from featurebank.cli.client import client_from_args, connection_args


def register(commands: Commands) -> None:
    p = commands.subcommand("banks", "list", "the banks a server serves and their state", _list)
    connection_args(p)
    p = commands.subcommand("banks", "create", "create a bank on a server started with --banks DIR",
                            _create)
    p.add_argument("name", help="the new bank's name")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--dim", type=int, default=0, help="a bank of vectors made elsewhere")
    what.add_argument("--backbone", default="",
                      help="a keras.applications family or a .keras file on the server")
    p.add_argument("--weights", default="", help="with --backbone: imagenet, none or a file")
    p.add_argument("--image-size", type=int, default=0, help="with --backbone: input size")
    p.add_argument("--dtype", default="", help="float32 or float16 (default: the usual)")
    connection_args(p)
    p = commands.subcommand("banks", "drop", "remove a bank and its folder from a server", _drop)
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="drop even while read replicas follow it")
    connection_args(p)
    p = commands.subcommand("banks", "alias", "point an alias at a bank (atomically)", _alias)
    p.add_argument("alias")
    p.add_argument("bank", nargs="?", default="", help="the bank it points to (omit to remove)")
    connection_args(p)


def _list(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        banks = client.banks()
    if args.json:
        print(json.dumps([{"name": b.name, "state": b.state, "error": b.error,
                           "default": b.is_default, "aliases": list(b.aliases)} for b in banks],
                         indent=2))
        return 0
    for b in banks:
        extra = [f"aliases {', '.join(b.aliases)}"] if b.aliases else []
        if b.is_default:
            extra.append("default")
        if b.error:
            extra.append(b.error)
        print(f"{b.name}\t{b.state}" + (f"\t{'; '.join(extra)}" if extra else ""))
    return 0


def _create(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        state = client.create_bank(args.name, dim=args.dim, backbone=args.backbone,
                                   weights=args.weights, dtype=args.dtype,
                                   image_size=args.image_size)
    print(f"created bank {state.name}")
    return 0


def _drop(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        client.drop_bank(args.name, force=args.force)
    print(f"dropped bank {args.name}")
    return 0


def _alias(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        previous = client.set_alias(args.alias, args.bank)
    was = f" (was {previous})" if previous else ""
    print(f"alias {args.alias} -> {args.bank}{was}" if args.bank else f"alias {args.alias} removed{was}")
    return 0
