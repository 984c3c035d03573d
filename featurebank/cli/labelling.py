"""`featurebank suggest`, `featurebank audit` and `featurebank ui`: the labelling loop.

suggest and audit read a bank directly (read-only, beside a running server);
ui serves a page that talks to a running server, so labels go through SetLabels.
"""

from __future__ import annotations

import argparse
import csv
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from featurebank.cli import Commands
from featurebank.cli.client import connection_args
from featurebank.core.vocabulary import MODES, SPLITS, SUGGEST_STRATEGIES
from featurebank.index.filters import parse

FILTER_HELP = "only items passing this filter are {} (README: Filters), e.g. 'meta.camera == 4'"


def register(commands: Commands) -> None:
    p = commands.command(
        "suggest", "unlabelled items ranked by how much a label would help", _suggest
    )
    p.add_argument("--bank", required=True, help="bank directory")
    p.add_argument("--n", type=int, default=100, help="items to suggest")
    p.add_argument(
        "--strategy",
        choices=SUGGEST_STRATEGIES,
        default=SUGGEST_STRATEGIES[0],
        help="margin or entropy of the probabilities; diverse: the most uncertain item of "
        "each region of the feature space",
    )
    p.add_argument(
        "--class", dest="label", default=None, metavar="LABEL",
        help="only items with LABEL among their two most probable labels",
    )
    p.add_argument("--filter", default="", metavar="EXPR", help=FILTER_HELP.format("suggested"))
    p.add_argument("--mode", choices=MODES, default=None, help="default: hybrid if a head exists")
    p.add_argument("--out", type=Path, default=None, help="write a CSV file instead of printing")

    p = commands.command(
        "audit", "labelled items whose label the bank disagrees with (leave-one-out)", _audit
    )
    p.add_argument("--bank", required=True, help="bank directory")
    p.add_argument("--n", type=int, default=100, help="findings to list")
    p.add_argument("--mode", choices=MODES, default=None, help="default: hybrid if a head exists")
    p.add_argument(
        "--split", choices=SPLITS, default=None, help="only this split"
    )
    p.add_argument(
        "--precision", type=float, default=None, metavar="P",
        help="cut the list where out-of-fold evidence says P of the findings are wrong labels",
    )
    p.add_argument("--filter", default="", metavar="EXPR", help=FILTER_HELP.format("audited"))
    p.add_argument("--out", type=Path, default=None, help="write a CSV file instead of printing")

    p = commands.command("ui", "serve the labelling page for a running server", _ui)
    p.add_argument("--host", default="127.0.0.1", help="address the page listens on")
    p.add_argument("--port", type=int, default=8080, help="port the page listens on")
    connection_args(p)


def _classifier(args: argparse.Namespace) -> Any:
    from featurebank.classify.classifier import Classifier

    return Classifier(args.bank, mode=args.mode)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _suggest(args: argparse.Namespace) -> int:
    from featurebank.classify.suggest import suggest

    with _classifier(args) as clf:
        out = suggest(clf, n=args.n, strategy=args.strategy, label=args.label,
                      where=parse(args.filter))
    rows = [
        [s.key, f"{s.score:.4f}", " ".join(f"{lab}:{p:.3f}" for lab, p in zip(s.labels, s.probs,
                                                                          strict=True))]
        for s in out
    ]
    if args.out is not None:
        _write_csv(args.out, ["key", "score", "guesses"], rows)
        print(f"wrote {len(rows)} suggestions ({args.strategy}) to {args.out}", file=sys.stderr)
        return 0
    print("score   key  guesses (label:probability)")
    for key, score, guesses in rows:
        print(f"{score}  {key}  {guesses}")
    print(f"{len(rows)} suggestions ({args.strategy})", file=sys.stderr)
    return 0


def _audit(args: argparse.Namespace) -> int:
    from featurebank.classify.audit import audit

    with _classifier(args) as clf:
        found = audit(clf, n=args.n, split=args.split, precision=args.precision,
                      where=parse(args.filter))

    def head(v: float | None) -> str:
        return "" if v is None else f"{v:.4f}"

    rows = [
        [
            f.key, f.label, f.suggested, f"{f.confidence:.4f}", f"{f.p_label:.4f}",
            f"{f.p_suggested:.4f}", head(f.head_p_label), head(f.head_p_suggested),
            " ".join(f"{nb.key}:{nb.label or '-'}:{nb.score:.3f}" for nb in f.neighbors),
        ]
        for f in found
    ]
    if args.out is not None:
        _write_csv(
            args.out,
            ["key", "label", "suggested", "confidence", "p_label", "p_suggested",
             "head_p_label", "head_p_suggested", "neighbors"],
            rows,
        )
        print(f"wrote {len(rows)} findings to {args.out}", file=sys.stderr)
        return 0
    for r in rows:
        print(f"{r[3]}  {r[0]}  {r[1]} -> {r[2]}  neighbours: {r[8]}")
    print(f"{len(rows)} labels the bank disagrees with", file=sys.stderr)
    return 0


def _ui(args: argparse.Namespace) -> int:
    from featurebank.cli.client import client_from_args
    from featurebank.server.ui import make_ui_server

    with client_from_args(args) as client:
        server = make_ui_server(client, host=args.host, port=args.port)
        print(f"featurebank ui: http://{args.host}:{server.port}/ (server {args.server})",
              flush=True)
        stop = lambda *_: threading.Thread(target=server.shutdown, daemon=True).start()  # noqa: E731
        signal.signal(signal.SIGTERM, stop)
        try:
            server.serve_forever()
        finally:
            server.server_close()
    return 0
