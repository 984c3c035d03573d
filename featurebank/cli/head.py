"""`featurebank head train|info`, `featurebank eval` and `featurebank finetune`.

Thin wrappers: classify.head_training, classify.evaluate/classify.report and classify.finetune
do the work; TensorFlow and matplotlib are imported inside the handlers only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from featurebank.cli import Commands
from featurebank.cli.args import show_progress
from featurebank.core.params import HEAD_CLASS_WEIGHTS
from featurebank.core.vocabulary import EVAL_SPLITS, HEAD_INITS


def register(commands: Commands) -> None:
    p = commands.subcommand(
        "head", "train", "train the head, the stacked head and the hybrid weight", _train
    )
    p.add_argument("--bank", required=True, help="bank directory")
    # every option defaults to the live head's value (HeadParams' default without one)
    p.add_argument("--hidden", type=int, default=None, help="hidden units (0 = the linear probe; > 0 trains with Keras)")
    p.add_argument("--dropout", type=float, default=None, help="dropout before the output layer")
    p.add_argument("--epochs", type=int, default=None, help="epoch budget of a hidden-layer head (cross-validation picks)")
    p.add_argument("--label-smoothing", type=float, default=None, help="label smoothing (0-1)")
    p.add_argument(
        "--class-weight", choices=HEAD_CLASS_WEIGHTS, default=None, help="class weights"
    )
    p.add_argument("--learning-rate", type=float, default=None, help="Adam learning rate")
    p.add_argument("--folds", type=int, default=None, help="cross-validation folds (default 5)")
    p.add_argument(
        "--stacked", action=argparse.BooleanOptionalAction, default=None,
        help="train the stacked head too (default on)",
    )
    p.add_argument(
        "--denoise", action=argparse.BooleanOptionalAction, default=None,
        help="down-weight items whose neighbours outvote their label (default on)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (folds, init, dropout)")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")

    p = commands.subcommand("head", "info", "the live head: generation, staleness, metrics", _info)
    p.add_argument("--bank", required=True, help="bank directory")

    p = commands.command(
        "eval", "evaluate knn/head/hybrid/stacked beside sklearn and write a report", _eval
    )
    p.add_argument("--bank", required=True, help="bank directory")
    p.add_argument("--split", choices=EVAL_SPLITS, default="test", help="split to score")
    p.add_argument("--report", default=None, help="report folder (default BANK/reports/<time>/)")
    p.add_argument("--k", type=int, default=None, help="neighbours (default: the head's tuned k)")
    p.add_argument("--projection", choices=["pca", "tsne"], default="pca", help="2-D projection")
    p.add_argument("--no-sklearn", action="store_true", help="skip the scikit-learn baselines")
    p.add_argument(
        "--abstain", type=float, default=None, metavar="PRECISION",
        help="also show each mode's abstention calibrated to this precision (e.g. 0.98)",
    )

    p = commands.command(
        "finetune",
        "fine-tune the backbone's top layers with the head; export a backbone",
        _finetune,
    )
    p.add_argument("images", help="labelled images: class folders or a manifest")
    p.add_argument("--bank", required=True, help="bank whose backbone and head to start from")
    p.add_argument("--out", required=True, help="where to write the backbone (.keras)")
    # every option left out takes classify.finetune's default (the measured recipe)
    p.add_argument("--unfreeze", type=int, default=None, help="top layers with weights to train")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    p.add_argument("--epochs", type=int, default=None, help="most epochs to train")
    p.add_argument(
        "--patience", type=int, default=None,
        help="stop after this many epochs without a lower held-out loss and keep the best "
        "epoch (0: train every epoch)",
    )
    p.add_argument("--augment", action="store_true", help="light shifts, rotations and zooms")
    p.add_argument("--batch-size", type=int, default=None, help="images per step")
    p.add_argument(
        "--head-init", choices=HEAD_INITS, default=None,
        help="start the head from the bank's probe (LP-FT, default) or at random",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (split, order, init)")
    p.add_argument(
        "--force", action="store_true",
        help="write the backbone even when it is worse on the held-out images than before",
    )


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v)


def quiet_keras(args: argparse.Namespace) -> None:
    """Start TensorFlow now with its start-up lines dropped (unless -v): the head's Keras
    would start it later and print them (CUDA probing, "failed call to cuInit")."""
    from featurebank.embedder.devices import load_tensorflow

    load_tensorflow(verbose=args.verbose > 0)


def _train(args: argparse.Namespace) -> int:
    from featurebank.classify.evaluate import TABLE_COLUMNS
    from featurebank.classify.head_training import train_head

    if args.hidden:  # the one-hidden-layer head is Keras; the linear probe never starts it
        quiet_keras(args)

    m = train_head(
        args.bank,
        progress=show_progress(),
        hidden=args.hidden,
        dropout=args.dropout,
        epochs=args.epochs,
        label_smoothing=args.label_smoothing,
        class_weight=args.class_weight,
        learning_rate=args.learning_rate,
        folds=args.folds,
        stacked=args.stacked,
        denoise=args.denoise,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    hy, cv, hp = m["hybrid"], m["cv"], m["head_params"]
    chose = (
        f"{cv['epochs']} epochs" if "epochs" in cv
        else f"C={cv['C']:g} on the {cv['input']} vectors"
        + ("" if cv.get("scaled", True) else ", unscaled (scikit-learn's default)")
    )
    print(
        f"head generation {m['generation']}: {len(m['vocabulary'])} classes, {m['items']} items, "
        f"{m.get('head_kind', 'hidden layer')} (index transform {m['transform']['spec']}, "
        f"hidden {hp['hidden']}), {chose}, {m['train_seconds']:.1f}s"
    )
    acts = hy["acts_as"]
    print(
        f"hybrid: a={hy['a']} (kNN weight; optimum {hy['a_optimum']}), T={hy['temperature']}, "
        f"k={hy['k']}; "
        + ("mixes knn and head" if acts == "hybrid" else f"acts as {acts} (better out of fold)")
    )
    if hp["denoise"]:
        print(f"label noise: {cv['down_weighted']} items down-weighted (neighbours disagree)")
    print(f"{cv['folds']}-fold cv   " + "".join(f"{c:>10}" for c in TABLE_COLUMNS))
    for mode, row in m["cv_metrics"].items():
        name = f"{mode} ({acts})" if mode == "hybrid" and acts != "hybrid" else mode
        print(f"{name:<14}" + "".join(f"{_fmt(row[c]):>10}" for c in TABLE_COLUMNS))
    return 0


def _info(args: argparse.Namespace) -> int:
    from featurebank.classify.published_heads import head_status

    status = head_status(args.bank)
    if status is None:
        print(f"no head in {args.bank}: run `featurebank head train --bank {args.bank}`")
        return 1
    print(json.dumps(status, indent=1))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from featurebank.classify.evaluate import evaluate, format_table
    from featurebank.classify.report import report_dir, write_report
    from featurebank.core.bank import Bank

    quiet_keras(args)
    ev = evaluate(
        args.bank, split=args.split, k=args.k, sklearn=not args.no_sklearn,
        abstain_below=args.abstain,
    )
    print(format_table(ev))
    head = ev.info.get("head")
    if head and head.get("stale"):
        print("warning: labels changed since the head was trained (stale): retrain it")
    if ev.info.get("note"):
        print(f"note: {ev.info['note']}")
    out = Path(args.report) if args.report else report_dir(Bank(args.bank).reports_dir)
    page = write_report(ev, out, projection=args.projection)
    print(f"report: {page}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from featurebank.classify.finetune import finetune

    quiet_keras(args)
    options = {
        name: getattr(args, name)
        for name in ("unfreeze", "lr", "epochs", "patience", "batch_size", "head_init", "seed")
        if getattr(args, name) is not None
    }
    s = finetune(
        args.images,
        args.bank,
        args.out,
        augment=args.augment,
        progress=show_progress(),
        force=args.force,
        **options,
    )
    print(
        f"fine-tuned {len(s['unfrozen'])} layers ({', '.join(s['unfrozen']) or 'head only'}) "
        f"on {s['train']} images ({s['val']} val, {s['skipped']} skipped), "
        f"{s['epochs_run']} of {s['epochs']} epochs (kept epoch {s['best_epoch']}), "
        f"{s['seconds']:.1f}s; val accuracy {_fmt(s['val_accuracy_before'])} -> "
        f"{_fmt(s['val_accuracy_after'])}"
    )
    if not s["published"]:
        print(f"not written: the tuned backbone is worse on the {s['val']} held-out images than "
              f"the frozen backbone with its probe; --force writes it anyway", file=sys.stderr)
        return 1
    print(f"backbone: {s['out']}")
    print(f"next: {s['next']}  (a new bank: the features changed)")
    return 0
