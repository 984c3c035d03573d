"""`featurebank quality`: wrong labels, duplicates, leaks and outliers of a bank.

Reads the bank directly (read-only, beside a running server), like `audit`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from featurebank.cli import Commands


def register(commands: Commands) -> None:
    p = commands.command(
        "quality",
        "wrong labels (with an estimate per class), duplicates, train/test leaks, outliers and "
        "held-out splits unlike train",
        _quality,
    )
    p.add_argument("--bank", required=True, help="bank directory")
    p.add_argument(
        "--precision", type=float, default=None, metavar="P",
        help="cut the label list where its estimated precision falls under P "
        "(default: at the estimated number of wrong labels)",
    )
    p.add_argument("--n", type=int, default=100, help="findings listed per kind")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.add_argument(
        "--keep", nargs="+", action="append", default=[], metavar=("KIND", "KEY"),
        help="remember in the bank that a finding was looked at and kept, so it is not "
        "listed again: label KEY | duplicate KEY KEY | outlier KEY (repeatable)",
    )


def _quality(args: argparse.Namespace) -> int:
    from featurebank.classify.classifier import Classifier
    from featurebank.classify.quality import check_limit, run
    from featurebank.classify.quality.decisions import keep

    check_limit(args.n)
    with Classifier(args.bank, mode="knn") as clf:
        for kind, *keys in args.keep:
            kept = keep(clf.store, kind, keys)
            print(f"kept {kind} {' '.join(kept.keys)}" + (f" = {kept.label}" if kept.label else ""),
                  file=sys.stderr)
        report = run(clf, precision=args.precision, limit=args.n)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=1)
        print()
        return 0
    for line in lines(report):
        print(line)
    return 0


def lines(report: Any) -> list[str]:
    """The report as text: one section per finding type, evidence on each line."""
    out = [f"{report.items} items, {report.labelled} labelled ({report.seconds:.2f} s)"]
    le = report.labels
    if le is None:
        out.append("labels: none in the bank (duplicates and outliers only)")
    else:
        out.append(
            f"labels: about {le.estimated_wrong:.0f} wrong; {le.selected} of the "
            f"{le.candidates} the neighbours relabel kept (cut by {le.cut}, estimated "
            f"precision {le.estimated_precision:.2f}), {len(le.findings)} listed"
        )
        for c in le.classes:
            if c.wrong >= 0.5:
                out.append(f"  class {c.label}: about {c.wrong:.0f} of {c.items} wrong")
        for s in le.swaps:
            out.append(f"  swapped {s.a} <-> {s.b}: about {s.count:.0f}")
        for f in le.findings:
            nbs = " ".join(f"{nb.key}:{nb.label or '-'}:{nb.score:.3f}" for nb in f.neighbors)
            out.append(  # in list order: the least probable label first
                f"  label p {f.p_label:.4f}  {f.key}  {f.label} -> {f.suggested} "
                f"(p {f.p_suggested:.4f})  neighbours: {nbs}"
            )
    d = report.duplicates
    out.append(
        f"duplicates: {report.counts['duplicate_groups']} groups "
        f"({report.counts['exact_groups']} exact), near: below distance {d.threshold:.4g}, "
        "or far closer to each other than to anything else"
    )
    for g in d.groups:
        kind = "exact" if g.exact else f"near {min(p.distance for p in g.pairs):.4g}"
        if matched := [p.match for p in g.pairs if p.match]:
            kind += f", thumbnails match {max(matched):.4f}"
        members = " ".join(f"{m.key}[{m.split}]" for m in g.members)
        out.append(f"  group {kind}: {members}")
    out.append(f"leaks: {report.counts['leaks']} train items copied into val/test")
    for leak in d.leaks:
        kind = "exact" if leak.exact else f"near {leak.distance:.4g}"
        if leak.match:
            kind += f", thumbnails match {leak.match:.4f}"
        out.append(f"  leak {kind}: {leak.train}[train] ~ {leak.held_out}[{leak.split}]")
    out.append(f"outliers: {report.counts['outliers']} above {report.outlier_cut:.3g}")
    if report.counts["kept"]:
        out.append(f"(and {report.counts['kept']} findings kept earlier, not listed)")
    for o in report.outliers:
        nbs = " ".join(f"{k}:{dist:.3f}" for k, dist in o.neighbors)
        out.append(f"  outlier {o.score:.3f}  {o.key}  neighbours: {nbs}")
    for c in report.splits:
        missing = f", no item labelled {' '.join(c.missing_labels)}" if c.missing_labels else ""
        if c.unseen_labels:
            missing += f", labels train has none of: {' '.join(c.unseen_labels)}"
        out.append(
            f"split {c.split}: {c.items} items, {c.uncovered} unlike every train item "
            f"({c.uncovered_share:.1%}), label shares {c.label_distance:.2f} from "
            f"train's (total variation){missing}"
        )
        out.extend(f"  uncovered {key}" for key in c.uncovered_keys)
    return out
