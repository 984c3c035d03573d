"""`featurebank recommend`: items like some stored items and unlike others, from a server."""

from __future__ import annotations

import argparse

from featurebank.cli import Commands
from featurebank.cli.client import (
    _dump,
    client_from_args,
    connection_args,
    query_args,
    query_options,
)


def register(commands: Commands) -> None:
    p = commands.command("recommend", "items like the --pos keys and unlike the --neg keys",
                         _recommend)
    p.add_argument("--pos", action="append", required=True, metavar="KEY",
                   help="a stored item the results should be like (repeat)")
    p.add_argument("--neg", action="append", default=[], metavar="KEY",
                   help="a stored item the results should be unlike (repeat)")
    p.add_argument("--strategy", choices=("average", "best_score"), default="average")
    p.add_argument("--k", type=int, default=10, help="items to return")
    p.add_argument("--metadata", action="store_true", help="include metadata")
    query_args(p, groups=False)
    connection_args(p)


def _recommend(args: argparse.Namespace) -> int:
    from featurebank.v1 import featurebank_pb2 as pb

    with client_from_args(args) as client:
        r = client.recommend(
            [pb.Input(key=k) for k in args.pos], [pb.Input(key=k) for k in args.neg],
            strategy=args.strategy, k=args.k, include_metadata=args.metadata,
            **query_options(args),
        )
    if args.json:
        print(_dump(r))
        return 0
    for n in r.neighbors:
        meta = f"  {dict(n.metadata)}" if args.metadata else ""
        print(f"{n.score:.4f}  {n.label or '-'}  {n.key}{meta}")
    return 0
