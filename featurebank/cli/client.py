"""Client commands that talk to a running `featurebank serve`.

`featurebank classify | search | upsert | rebuild` and `featurebank labels set`,
each with --server, --token (or --token-file) and --tls-ca (plus --tls-cert/--tls-key for mutual TLS).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from featurebank.cli import Commands
from featurebank.cli import args as args_
from featurebank.cli.index import add_index_params
from featurebank.core.vocabulary import MODES, SPLITS, UNKNOWN

TOKEN_VARIABLE = "FEATUREBANK_TOKEN"


def connection_args(p: argparse.ArgumentParser, bank_name: bool = True) -> None:
    """--server, token and TLS options; `bank_name`: also --bank NAME, the served bank (a
    command whose --bank is a bank directory leaves it out and asks $FEATUREBANK_BANK's)."""
    g = p.add_argument_group("connection")
    g.add_argument("--server", type=args_.server_address,
                   default=os.environ.get("FEATUREBANK_SERVER", "127.0.0.1:50051"), help="HOST:PORT of the server (default $FEATUREBANK_SERVER or 127.0.0.1:50051)")
    token = g.add_mutually_exclusive_group()
    token.add_argument("--token", default=None,
                       help="bearer token (default $FEATUREBANK_TOKEN); a value given here "
                       "shows in `ps` to every user of the machine, so it is refused when "
                       "the environment variable is set: prefer it or --token-file")
    token.add_argument("--token-file", type=Path, default=None,
                       help="file whose first line is the bearer token")
    g.add_argument("--tls-ca", type=Path, default=None,
                   help="CA certificate to verify the server (turns TLS on)")
    g.add_argument("--tls-cert", type=Path, default=None, help="client certificate (mutual TLS)")
    g.add_argument("--tls-key", type=Path, default=None, help="client key (mutual TLS)")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    if bank_name:
        g.add_argument("--bank", dest="server_bank", default=os.environ.get("FEATUREBANK_BANK", ""),
                       metavar="NAME", help="the served bank (or alias) to ask; default "
                       "$FEATUREBANK_BANK or the server's default bank")
    else:
        p.set_defaults(server_bank=os.environ.get("FEATUREBANK_BANK", ""))
    g.add_argument("--json", action="store_true", help="print JSON instead of text")


def query_args(p: argparse.ArgumentParser, groups: bool = True) -> None:
    """--filter, --score-threshold and (with `groups`) --group-by, --group-size."""
    p.add_argument("--filter", default="", metavar="EXPR",
                   help='only items passing it, e.g. \'meta.camera == 4 and label != "cat"\'')
    p.add_argument("--score-threshold", type=float, default=None,
                   help="only hits at least this similar (maybe fewer than k)")
    if groups:
        p.add_argument("--group-by", default="", metavar="FIELD", help="label or meta.NAME")
        p.add_argument("--group-size", type=int, default=0, help="hits per group (default 1)")


def query_options(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"filter": args.filter, "score_threshold": args.score_threshold}
    if hasattr(args, "group_by"):
        out.update(group_by=args.group_by, group_size=args.group_size)
    return out


def register(commands: Commands) -> None:
    p = commands.command("classify", "classify images with a running server", _classify)
    p.add_argument("images", nargs="+", type=Path, help="image files")
    p.add_argument("--mode", choices=MODES, default=None)
    p.add_argument("--k", type=args_.non_negative, default=0,
                   help="neighbours that vote (0 = server default)")
    p.add_argument("--top-n", type=args_.positive, default=3, help="labels to show per image")
    p.add_argument("--neighbors", action="store_true", help="also show the neighbours")
    p.add_argument(
        "--abstain", type=float, default=0.0, metavar="PRECISION",
        help="answer 'unknown' below the confidence that reaches this precision (e.g. 0.98)",
    )
    p.add_argument("--filter", default="", metavar="EXPR",
                   help="only labelled items passing this filter vote (README: Filters)")
    connection_args(p)

    p = commands.command("search", "nearest stored items of an image or key", _search)
    p.add_argument("image", nargs="?", type=Path, help="image file (or use --key)")
    p.add_argument("--key", default=None, help="key of a stored item to search from")
    p.add_argument("--k", type=args_.positive, default=10, help="neighbours to return")
    p.add_argument("--label", action="append", default=[], help="only items with this label")
    p.add_argument("--metadata", action="store_true", help="include source metadata")
    query_args(p)
    connection_args(p)

    p = commands.command("upsert", "add or replace images in a served bank", _upsert)
    p.add_argument("paths", nargs="*", type=Path, help="image files or folders (recursive)")
    p.add_argument("--manifest", type=Path, default=None,
                   help="CSV/TSV of path[,label][,split][,key] rows, as `featurebank embed` "
                   "reads (explicit keys; paths relative to the manifest)")
    p.add_argument("--label", default=None, help="label for every image")
    p.add_argument("--folder-labels", action="store_true",
                   help="label each image with the name of its folder")
    p.add_argument("--split", default="none", choices=SPLITS)
    p.add_argument("--key-prefix", default="",
                   help="put before every key (keys are paths relative to the folder given, as "
                   "`featurebank embed` makes them; a file given alone is keyed by its name)")
    p.add_argument("--chunk", type=args_.positive, default=256, help="images per Upsert call")
    p.add_argument("--thumbnails", action="store_true",
                   help="keep a small JPEG of each image in the bank (shown on the labelling page)")
    connection_args(p)

    p = commands.subcommand("labels", "set", "set or clear labels on a served bank", _labels_set)
    p.add_argument("assignments", nargs="*", help="KEY=LABEL (empty LABEL clears it)")
    p.add_argument("--from-csv", type=Path, default=None, help="CSV file of key,label lines")
    connection_args(p)

    p = commands.command("rebuild", "rebuild the served index in the background", _rebuild)
    add_index_params(p)
    p.add_argument("--retrain-head", action="store_true", help="also retrain the head")
    p.add_argument("--head-hidden", type=int, default=None, help="default: the live head's")
    p.add_argument("--head-epochs", type=int, default=None, help="default: the live head's")
    p.add_argument("--no-wait", action="store_true", help="print the operation id and return")
    connection_args(p)


def client_from_args(args: argparse.Namespace) -> Any:
    from featurebank.core.errors import InvalidInput
    from featurebank.server.client import FeatureBankClient, read_token_file

    env = os.environ.get(TOKEN_VARIABLE)
    if args.token is not None and env:
        raise InvalidInput(f"--token and ${TOKEN_VARIABLE} are both given: drop --token (its "
                           "value shows in `ps` to every user of the machine)")  # fmt: skip
    token = read_token_file(args.token_file) if args.token_file else (args.token or env)
    return FeatureBankClient(
        args.server, token=token, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
        tls_key=args.tls_key, timeout=args.timeout, bank=args.server_bank,
    )


def _dump(message: Any) -> str:
    from google.protobuf.json_format import MessageToDict

    return json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2)


def _read_image(path: Path) -> bytes:
    """The bytes of an image file named on the command line (a folder is an error here)."""
    from featurebank.core.files import read_named_file

    return read_named_file("image", path)


def _classify(args: argparse.Namespace) -> int:
    images = [_read_image(path) for path in args.images]  # every one, before any call
    with client_from_args(args) as client:
        for path, image in zip(args.images, images, strict=True):
            r = client.classify(
                image, mode=args.mode, k=args.k, top_n=args.top_n,
                include_neighbors=args.neighbors, abstain_below=args.abstain, filter=args.filter,
            )
            if args.json:
                print(json.dumps({"image": str(path), **json.loads(_dump(r))}))
                continue
            labels = "  ".join(f"{x.label} {x.probability:.3f}" for x in r.labels)
            if r.abstained:
                labels = f"{UNKNOWN} (abstained; ranked: {labels})"
            print(f"{path}\t{labels}")
            for n in r.neighbors:
                print(f"    {n.score:.4f}  {n.label or '-'}  {n.key}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from featurebank.core.errors import InvalidInput

    if (args.image is None) == (args.key is None):
        raise InvalidInput("give exactly one of an image or --key")
    image = None if args.image is None else _read_image(args.image)
    with client_from_args(args) as client:
        r = client.search(
            image, key=args.key, k=args.k, labels=args.label,
            include_metadata=args.metadata, **query_options(args),
        )
    if args.json:
        print(_dump(r))
        return 0
    print("score   label  key" + ("  metadata" if args.metadata else ""))
    for n in r.neighbors:
        meta = f"  {dict(n.metadata)}" if args.metadata else ""
        print(f"{n.score:.4f}  {n.label or '-'}  {n.key}{meta}")
    return 0


def _image_paths(paths: list[Path], prefix: str = "") -> list[tuple[str, Path]]:
    """(key, path) of every image file named or found in a folder. Keys are made as `embed`
    makes them: relative to the folder given (a file alone: its name), after `prefix`,
    written so the store can hold them. Directory symlinks are not followed."""
    import stat

    from featurebank.core.errors import InvalidInput, NotFound
    from featurebank.embedder import folders
    from featurebank.embedder.sources import IMAGE_EXTS

    out: list[tuple[str, Path]] = []
    for p in paths:
        if p.is_dir():
            listing = folders.list_images(p, IMAGE_EXTS)
            out.extend((folders.storable_key(prefix + rel), Path(full))
                       for rel, full in listing.files)  # fmt: skip
            for skipped in listing.skipped:
                print(f"featurebank upsert: left out {p / skipped}", file=sys.stderr)
        elif p.exists():
            out.append((folders.storable_key(prefix + p.name), p))
        else:
            raise NotFound(f"no such file or folder: {p}")
    seen: dict[str, Path] = {}
    for key, f in out:  # before anything is sent: a FIFO would block, a device never end
        if not stat.S_ISREG(f.stat().st_mode):
            raise InvalidInput(f"{f} is not a regular file")
        if key in seen:
            raise InvalidInput(
                f"key {key!r} would be given to {seen[key]} and {f}: upsert them separately "
                "with a --key-prefix each"
            )
        seen[key] = f
    return out


def _manifest_entries(path: Path, prefix: str) -> list[tuple[str, Path, str | None, str]]:
    """(key, file, label, split) of each manifest row, read as `embed` reads a manifest."""
    from featurebank.embedder import folders
    from featurebank.embedder.sources import open_source

    source = open_source(path, labels="folders")
    try:
        return [(folders.storable_key(prefix + r.key), Path(r.path or ""), r.label, r.split)
                for r in source.records]  # fmt: skip
    finally:
        source.close()


def _upsert(args: argparse.Namespace) -> int:
    from featurebank.core.errors import InvalidInput
    from featurebank.embedder import folders

    if args.label and args.folder_labels:
        raise InvalidInput("use --label or --folder-labels, not both")
    if args.manifest is not None and args.paths:
        raise InvalidInput("give image files and folders, or --manifest, not both")
    if args.manifest is not None:
        files = _manifest_entries(args.manifest, args.key_prefix)
    else:
        files = [
            (key, f, folders.storable_key(f.parent.name) if args.folder_labels else args.label,
             args.split)
            for key, f in _image_paths(args.paths, args.key_prefix)
        ]  # fmt: skip
    if not files:
        raise InvalidInput("no images found")
    added = replaced = 0
    size = max(1, args.chunk)
    with client_from_args(args) as client:
        for start in range(0, len(files), size):
            chunk = files[start : start + size]
            items = [
                {
                    "key": key,
                    "image": folders.read_regular_file(str(f), client.max_message_bytes),
                    "label": label,
                    "split": split,
                    "uri": folders.storable_key(str(f.resolve())),
                    "thumbnail": args.thumbnails,
                }
                for key, f, label, split in chunk
            ]
            r = client.upsert(items)
            added += r.added
            replaced += r.replaced
    print(f"upserted {len(files)} images: {added} added, {replaced} replaced "
          f"(store generation {r.store_generation}, index generation {r.index_generation})")
    return 0


def _labels_set(args: argparse.Namespace) -> int:
    from featurebank.core.errors import InvalidInput
    from featurebank.store.transfer import read_label_csv

    mapping: dict[str, str | None] = {}
    for a in args.assignments:
        key, sep, label = a.rpartition("=")
        if not sep or not key:
            raise InvalidInput(f"expected KEY=LABEL, got {a!r}")
        mapping[key] = label or None
    if args.from_csv is not None:
        mapping.update(read_label_csv(args.from_csv)[0])
    if not mapping:
        raise InvalidInput("no labels given: KEY=LABEL arguments or --from-csv")
    with client_from_args(args) as client:
        r = client.set_labels(mapping)
    print(f"updated {r.updated} labels (store generation {r.store_generation})")
    return 0


def _rebuild(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        op = client.rebuild_index(
            factory=args.factory, metric=args.metric, transform=args.transform,
            memory_budget=args.memory_budget, target_recall=args.target_recall, k=args.k,
            allow_below_target=bool(args.allow_below_target), ondisk=args.ondisk,
            retrain_head=args.retrain_head,
            head_hidden=args.head_hidden, head_epochs=args.head_epochs,
        )
        if not args.no_wait:
            op = client.wait_operation(op.id, poll_s=0.5)
    if args.json:
        print(_dump(op))
        return 1 if op.done and op.error.code else 0  # scripts read the exit code too
    if not op.done:
        print(f"rebuild started: operation {op.id}")
    elif op.error.code:
        from featurebank.server.client import RemoteError
        from featurebank.server.status import code_of

        raise RemoteError(code_of(op.error.code), op.error.message, "RebuildIndex")
    else:
        head = f", head generation {op.head_generation}" if op.head_generation else ""
        print(f"rebuilt: index generation {op.index_generation}{head}")
    return 0
