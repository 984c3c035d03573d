"""`featurebank index build|update|eval`: thin wrappers over index.build, index.evaluate and
classify.knn."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from featurebank.cli import Commands
from featurebank.cli import args as args_
from featurebank.core.params import IndexParams
from featurebank.core.vocabulary import METRICS

KEEP = "default: the live index's, else {}"


def index_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The IndexParams fields the command line named (None: keep the live generation's)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(IndexParams)}


def add_index_params(p: argparse.ArgumentParser) -> None:
    """The IndexParams options; each left out keeps what the live generation used."""
    d = IndexParams()
    p.add_argument("--factory", help="'auto' or a faiss index_factory string, optionally "
                   "ending in ,RStore (candidates re-ranked on the stored vectors, e.g. "
                   "IVF4096,PQ48x4fs,RStore); " + KEEP.format(d.factory))
    p.add_argument("--metric", choices=list(METRICS), help=KEEP.format(d.metric))
    p.add_argument("--transform", help="auto | none | l2 | cl2n | pca:D | pca-whiten:D; "
                   + KEEP.format(f"{d.transform}: cl2n for metric cosine, measured best for "
                                 "CNN features; none for l2 and ip, the nearest by that metric"))
    p.add_argument("--memory-budget", help="memory for the index, e.g. 4G, 512M; "
                   + KEEP.format("4G"))
    p.add_argument("--target-recall", type=float, help="recall@k to tune for; "
                   + KEEP.format(d.target_recall))
    p.add_argument("--k", type=args_.positive, help="k of the recall target; " + KEEP.format(d.k))
    p.add_argument("--allow-below-target", action="store_true", default=None,
                   help="publish the index even if its measured recall is below the target "
                   "(also for later folds); without it such an index is refused")
    p.add_argument("--ondisk", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the inverted lists in a file beside the index that servers "
                   "memory-map (an index larger than memory; auto then builds IVF over raw "
                   "vectors); --no-ondisk brings them back into memory; " + KEEP.format("no"))


def register(commands: Commands) -> None:
    p = commands.subcommand("index", "build", "build, tune and publish a new index", _build)
    p.add_argument("--bank", required=True, help="bank directory")
    add_index_params(p)
    p.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    g = p.add_argument_group("distributed (--engine ray; needs the ray extra)")
    g.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="ray: add shards in parallel Ray tasks and merge (IVF and Flat only)")
    g.add_argument("--address", help="Ray cluster address (default: start a local one)")
    g.add_argument("--train-sample", type=int, help="vectors to train on (default: by nlist)")
    g.add_argument("--shards", type=int, help="add tasks (default: one per cluster CPU)")

    p = commands.subcommand("index", "update", "add new and remove deleted items", _update)
    p.add_argument("--bank", required=True, help="bank directory")

    p = commands.subcommand(
        "index", "eval", "recall@k vs exact search, queries/s, kNN accuracy on val", _eval
    )
    p.add_argument("--bank", required=True, help="bank directory")
    p.add_argument("--k", type=int, default=10, help="k for recall@k")
    p.add_argument("--queries", type=int, default=1000, help="bank items used as queries")
    p.add_argument("--knn-k", type=int, default=20, help="neighbours in the kNN vote")
    p.add_argument("--split", default="val", help="split to measure kNN accuracy on")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")


def recall_text(m: dict[str, Any], digits: int = 4) -> str:
    """'0.9593 (>= 0.9541 at 95% confidence)': the measured recall and its published bound."""
    recall, bound = m.get("recall_at_k"), m.get("recall_lower_bound")
    if not (isinstance(recall, float) and recall == recall):
        return "n/a"
    if not (isinstance(bound, float) and bound == bound):
        return f"{recall:.{digits}f}"
    return (f"{recall:.{digits}f} (>= {bound:.{digits}f} at "
            f"{m.get('recall_confidence', 0.95):.0%} confidence)")


def _reranked(m: dict[str, Any]) -> bool:
    from featurebank.index import rerank

    return rerank.factor(m) > 0


def _summary(m: dict[str, Any]) -> str:
    return (
        f"index generation {m['generation']}: {m['factory']} {m.get('params') or ''} "
        f"over {m['ntotal']} vectors, metric {m['metric']}, transform "
        f"{m['transform']['spec']} ({m.get('transform_source', 'as given')}); "
        f"recall@{m['k']} {recall_text(m)}, "
        f"{m.get('latency_ms', 0):.3f} ms/query, store generation {m['store_generation']}"
        + ("; inverted lists on disk (memory-mapped)" if m.get("ondisk") else "")
        + ("; candidates re-ranked on the stored vectors" if _reranked(m) else "")
    )


def refuse_while_held(bank: str) -> None:
    """Refuse to publish an index beside the bank's writer (a running server, most often).

    A server keeps serving its own index until its next rebuild, while replicas would switch
    to the generation published here, so the two would answer from different indexes; a
    server rebuilds in the background without that (`featurebank rebuild --server`).
    """
    from featurebank import store as store_mod
    from featurebank.core.errors import WriterBusy

    with store_mod.open(bank, readonly=True) as st:
        pid = st.writer_pid()
    if pid is None:
        return
    what = f"process {pid}" + (f" ({_command_line(pid)})" if pid > 0 else "")
    raise WriterBusy(
        f"bank {bank} is held by {what}; an index built offline would not be the one its "
        "server answers from: rebuild through the server (featurebank rebuild --server "
        "HOST:PORT), or build once that process has finished"
    )


def _command_line(pid: int) -> str:
    """What the process is (e.g. `featurebank serve --bank b --port 4464`), where readable."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().decode(errors="replace").split("\0")
    except OSError:
        return "its command line is not readable"
    return " ".join(w for w in words if w)[:200]


def _build(args: argparse.Namespace) -> int:
    refuse_while_held(args.bank)
    if args.engine == "ray":
        return _build_ray(args)
    from featurebank.index.build import build_index

    m = build_index(
        args.bank, progress=args_.show_progress(), threads=args.threads, **index_overrides(args)
    )
    print(_summary(m) + f"; built in {m['build_seconds']:.1f}s")
    return 0


def _build_ray(args: argparse.Namespace) -> int:
    from featurebank.index.ray_build import build_index_ray

    m = build_index_ray(
        args.bank,
        **index_overrides(args),
        train_sample=args.train_sample,
        shards=args.shards,
        address=args.address,
        progress=args_.show_progress(),
        verbose=args.verbose > 0,
    )
    print(
        _summary(m) + f"; built in {m['build_seconds']:.1f}s on Ray ({m['shards']} shards, "
        f"trained on {m['train_sample']} vectors)"
    )
    return 0


def _update(args: argparse.Namespace) -> int:
    from featurebank.index.fold import update_index

    refuse_while_held(args.bank)

    m = update_index(args.bank, progress=args_.show_progress())
    if m.get("unchanged"):
        print(f"index generation {m['generation']} is up to date")
    else:
        print(_summary(m) + f"; +{m.get('added', 0)} added, -{m.get('removed', 0)} removed")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from featurebank.classify.knn import DEFAULT_T, knn_accuracy
    from featurebank.index.evaluate import evaluate
    from featurebank.index.searcher import Searcher

    with Searcher.load(args.bank) as searcher:
        r = evaluate(searcher, k=args.k, queries=args.queries)
        r["knn"] = knn_accuracy(searcher, args.knn_k, DEFAULT_T, args.split)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(
        f"index generation {r['generation']} ({r['factory']} {r['params'] or ''}, "
        f"{r['ntotal']} vectors)"
    )
    recall = r[f"recall_at_{r['k']}"]
    print(f"recall@{r['k']} vs exact: {recall:.4f} on {r['queries']} queries")
    print(f"queries/s: {r['qps']:.0f} ({r['latency_ms']:.3f} ms/query in batches of 1000)")
    knn = r["knn"]
    if knn["accuracy"] is None:
        print(f"kNN accuracy: no labelled {knn['split']!r} items")
    else:
        acc = ", ".join(f"{w} {a:.4f}" for w, a in knn["accuracy"].items())
        print(f"kNN accuracy on {knn['items']} {knn['split']} items (k={knn['k']}): {acc}")
    return 0
