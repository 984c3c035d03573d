"""`featurebank items | delete | info` and `featurebank labels list | store compact`.

What a user reaches for to see and tidy a bank: its items (keys, labels, splits,
metadata; filtered), its labels with counts, deleting by key, compacting deleted rows
away, and what a running server says about its bank. Only the store (or the gRPC
client) is imported, so these start fast.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from featurebank.cli import Commands
from featurebank.cli.client import client_from_args, connection_args
from featurebank.core.vocabulary import SPLITS

FORMATS = ("tsv", "csv", "jsonl")
COLUMNS = ("key", "label", "split")


def register(commands: Commands) -> None:
    p = commands.command(
        "items", "list a bank's items: key, label, split (and metadata), filtered", _items
    )
    p.add_argument("--bank", type=Path, default=None,
                   help="bank directory (without it: the bank of --server)")
    p.add_argument("--label", action="append", default=[],
                   help="only items with this label (repeat for several)")  # fmt: skip
    p.add_argument("--unlabelled", action="store_true", help="only items without a label")
    p.add_argument("--split", choices=SPLITS, help="only items of this split")
    p.add_argument("--metadata", action="store_true", help="add each item's metadata (JSON)")
    p.add_argument("--format", choices=FORMATS, default="tsv",
                   help="tsv (default) and csv have a header row; jsonl: one object a line")  # fmt: skip
    p.add_argument("--keys-only", action="store_true", help="one key a line, nothing else")
    p.add_argument("--filter", default="", metavar="EXPR",
                   help="only items passing it, in key order, e.g. 'meta.camera == 4' "
                   "(the grammar of search --filter)")
    p.add_argument("--count", action="store_true", help="print how many items pass, nothing else")
    connection_args(p, bank_name=False)

    p = commands.subcommand("labels", "list", "labels of a bank with their counts", _labels_list)
    p.add_argument("--bank", required=True, type=Path, help="bank directory")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = commands.command("delete", "delete items by key (from a bank or a server)", _delete)
    p.add_argument("keys", nargs="*", help="keys to delete")
    p.add_argument("--from", dest="from_file", type=Path,
                   help="file of keys, one a line (e.g. from `featurebank items --keys-only`)")  # fmt: skip
    p.add_argument("--ignore-missing", action="store_true", help="skip keys not in the bank")
    p.add_argument("--bank", type=Path,
                   help="delete from this bank directory (no server may hold it); without "
                   "it, through the server at --server")  # fmt: skip
    connection_args(p, bank_name=False)

    p = commands.subcommand(
        "store", "compact", "rewrite the store without its deleted rows (gives space back)",
        _compact,
    )  # fmt: skip
    p.add_argument("--bank", required=True, type=Path, help="bank directory")

    p = commands.command("info", "what a running server says about its bank (GetInfo)", _info)
    connection_args(p)


# ---- items, labels ------------------------------------------------------------------------


def _items(args: argparse.Namespace) -> int:
    from featurebank import store as store_mod
    from featurebank.core.errors import InvalidInput

    if args.label and args.unlabelled:
        raise InvalidInput("use --label or --unlabelled, not both")
    wanted = set(args.label)
    plain = not (wanted or args.unlabelled or args.split)
    if args.filter:
        from featurebank.server.queries import check_filter

        check_filter(args.filter)  # a malformed filter fails before anything is printed
    if args.bank is None:  # the bank a server serves: Scroll and Count over gRPC
        with client_from_args(args) as client:
            if args.count and plain:
                print(client.count(args.filter))
                return 0
            rows = _kept(_served_rows(client, args.filter), args.split, wanted, args.unlabelled)
            return _show(rows, args)
    with store_mod.open(args.bank, readonly=True) as st:
        listed = _filtered_rows(st, args.filter) if args.filter else _rows(st, args.split, args.metadata)
        return _show(_kept(listed, args.split, wanted, args.unlabelled), args)


def _show(rows: Iterator[dict[str, Any]], args: argparse.Namespace) -> int:
    if args.count:
        print(sum(1 for _ in rows))
    else:
        _print_rows(rows, args.format, args.metadata, args.keys_only)
    return 0


PAGE = 1000  # items a page when listing through a filter


def _filtered_rows(st: Any, expr: str) -> Iterator[dict[str, Any]]:
    """Items passing `expr` in key order, page by page as Scroll pages them."""
    from featurebank.server import queries

    tables, where, after = queries.Tables(), queries.check_filter(expr), None
    while True:
        page = queries.scroll_page(tables, st, where, PAGE, after)
        items = queries.page_items(st, page)
        for i, key in enumerate([] if items is None else items.keys):
            yield {"key": key, "label": items.labels[i], "split": items.splits[i],
                   "metadata": dict(items.meta[i])}
        if not page.next_token:
            return
        after = queries.decode_token(page.next_token)


def _served_rows(client: Any, expr: str) -> Iterator[dict[str, Any]]:
    """The server's items passing `expr`, in key order, through Scroll."""
    from google.protobuf.json_format import MessageToDict

    token = ""
    while True:
        r = client.scroll(expr, limit=PAGE, page_token=token)
        for it in r.items:
            yield {"key": it.key, "label": it.label or None, "split": it.split,
                   "metadata": MessageToDict(it.metadata)}
        token = r.next_page_token
        if not token:
            return


def _kept(
    rows: Iterator[dict[str, Any]], split: str | None, labels: set[str], unlabelled: bool
) -> Iterator[dict[str, Any]]:
    """`rows` that pass --split, --label and --unlabelled too."""
    for row in rows:
        if split and row["split"] != split:
            continue
        if (labels and row["label"] not in labels) or (unlabelled and row["label"] is not None):
            continue
        yield row


def _rows(st: Any, split: str | None, metadata: bool) -> Iterator[dict[str, Any]]:
    """Items one by one from one snapshot, in id order (of `split` only, when given)."""
    for batch in st.iter_batches(batch_size=8192, split=split):
        metas = batch.meta if metadata else None
        for i, (key, label, item_split) in enumerate(
            zip(batch.keys, batch.labels, batch.splits, strict=True)
        ):
            row: dict[str, Any] = {"key": key, "label": label, "split": item_split}
            if metas is not None:
                row["metadata"] = metas[i]
            yield row


def _print_rows(rows: Iterator[dict[str, Any]], fmt: str, metadata: bool, keys_only: bool) -> None:
    out = sys.stdout
    if keys_only:
        for row in rows:
            out.write(row["key"] + "\n")
        return
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row, sort_keys=True) + "\n")
        return
    writer = csv.writer(out, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
    writer.writerow([*COLUMNS, "metadata"] if metadata else COLUMNS)
    for row in rows:
        cells = [row["key"], row["label"] or "", row["split"]]
        if metadata:
            cells.append(json.dumps(row["metadata"], sort_keys=True))
        writer.writerow(cells)


def _labels_list(args: argparse.Namespace) -> int:
    from featurebank import store as store_mod

    with store_mod.open(args.bank, readonly=True) as st:
        stats = st.stats()
    labels: dict[str, int] = stats["labels"]
    if args.json:
        print(json.dumps({"labels": labels, "unlabelled": stats["unlabelled"]}, indent=2))
        return 0
    print(f"{'label':<30} items")
    for label, n in sorted(labels.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"{label:<30} {n}")
    print(f"{len(labels)} labels; {stats['labelled']} items labelled, {stats['unlabelled']} not")
    return 0


# ---- delete, compact ----------------------------------------------------------------------


def _delete(args: argparse.Namespace) -> int:
    from featurebank.core.errors import InvalidInput

    keys = list(args.keys)
    if args.from_file is not None:
        from featurebank.store.transfer import read_keys

        keys += read_keys(args.from_file)
    keys = list(dict.fromkeys(keys))
    if not keys:
        raise InvalidInput("no keys given: KEY arguments or --from FILE")
    if args.bank is None:
        from featurebank.cli.client import client_from_args

        with client_from_args(args) as client:
            r = client.delete(keys, ignore_missing=args.ignore_missing)
        print(f"deleted {r.deleted} keys (store generation {r.store_generation})")
        return 0
    from featurebank import store as store_mod

    with store_mod.open(args.bank) as st:
        if args.ignore_missing:
            absent = set(st.missing(keys))
            keys = [k for k in keys if k not in absent]
        deleted = st.delete(keys) if keys else 0
        generation = st.generation
    print(f"deleted {deleted} keys (store generation {generation}); "
          "`featurebank store compact` gives their space back")  # fmt: skip
    return 0


def _compact(args: argparse.Namespace) -> int:
    from featurebank import store as store_mod

    with store_mod.open(args.bank) as st:
        before = st.stats()
        st.compact()
        after = st.stats()
    print(
        f"compacted {args.bank}: {before['deleted_pending_compact']} deleted rows removed; "
        f"{_mib(before['size_bytes'])} -> {_mib(after['size_bytes'])} on disk"
    )
    return 0


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# ---- info --------------------------------------------------------------------------------


def _info(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from featurebank.cli.client import client_from_args

    with client_from_args(args) as client:
        info = MessageToDict(client.info(), preserving_proto_field_name=True)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for line in _flat(info):
        print(line)
    return 0


READABLE_LEAVES = ("manifest",)
"""Sub-messages left to --json: the index manifest is a file's worth of its own."""


def _flat(d: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """`name  value` lines, nested messages as dotted names, lists joined by commas."""
    for name, value in d.items():
        full = f"{prefix}{name}"
        if name in READABLE_LEAVES:
            yield f"{full:<32} (see --json)"
        elif isinstance(value, dict):
            yield from _flat(value, f"{full}.")
        elif isinstance(value, list):
            shown = ", ".join(str(v) for v in value[:20])
            more = f" ... ({len(value)} in all)" if len(value) > 20 else ""
            yield f"{full:<32} {shown or '-'}{more}"
        else:
            yield f"{full:<32} {value if value != '' else '-'}"
