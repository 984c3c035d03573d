"""The report's one HTML page, every figure embedded, no script and no remote resource."""

from __future__ import annotations

import base64
import html
import json
from typing import Any

from featurebank.classify.evaluate import TABLE_COLUMNS, Evaluation


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def render_page(
    ev: Evaluation, data: dict[str, Any], pngs: dict[str, bytes], figures_titles: dict[str, str]
) -> str:
    """The report's HTML: facts, metrics, abstention, embedded figures, mistakes."""
    esc = html.escape
    rows = []
    for mode, m in data["modes"].items():
        cls = ' class="default"' if mode == ev.default_mode else ""
        rows.append(
            f"<tr{cls}><td>{esc(mode)}</td>"
            + "".join(f"<td>{_fmt(m.get(c))}</td>" for c in TABLE_COLUMNS)
            + "</tr>"
        )
    mistakes = []
    for m in data["mistakes"]:
        nbs = ", ".join(
            f"{esc(str(nb['key']))} ({esc(str(nb['label']))}, {nb['score']:.3f})"
            for nb in m["neighbors"][:5]
        )
        mistakes.append(
            f"<tr><td>{esc(m['key'])}</td><td>{esc(m['true'])}</td><td>{esc(m['predicted'])}</td>"
            f"<td>{m['confidence']:.3f}</td><td class=nb>{nbs}</td></tr>"
        )
    figures = "".join(
        f'<figure><img alt="{esc(title)}" src="data:image/png;base64,'
        f'{base64.b64encode(pngs[name]).decode()}"><figcaption>{esc(title)} '
        f'(<a href="{name}.png">{name}.png</a>)</figcaption></figure>'
        for name, title in figures_titles.items()
    )
    head = data.get("head") or {}
    idx = data.get("index") or {}
    facts = [
        ("bank", data["bank"]),
        ("split", f"{data['split']} ({data['n']} items, {data['classes']} classes)"),
        (
            "index",
            f"generation {idx.get('generation')}, {idx.get('factory')}, "
            f"transform {json.dumps(idx.get('transform', {}).get('spec'))}, "
            f"metric {idx.get('metric')}",
        ),
        (
            "head",
            "none"
            if not head
            else f"generation {head.get('generation')}, hidden {head.get('hidden')}, "
            f"hybrid a={head.get('hybrid', {}).get('a')} T={head.get('hybrid', {}).get('temperature')}"
            f" k={head.get('hybrid', {}).get('k')}"
            + (
                f", hybrid acts as {head.get('hybrid', {}).get('acts_as')} (cross-validation)"
                if head.get("hybrid", {}).get("acts_as", "hybrid") != "hybrid"
                else ""
            )
            + (" - STALE (labels changed since training)" if head.get("stale") else ""),
        ),
        ("generated", data["generated"]),
    ]
    if data.get("note"):
        facts.append(("note", data["note"]))
    fact_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in facts)
    abstention = ""
    if data.get("abstention"):
        target = next(iter(data["abstention"].values()))["target_precision"]
        cells = "".join(
            f"<tr><td>{esc(mode)}</td><td>{_fmt(a['threshold'])}</td>"
            f"<td>{_fmt(a['abstain_rate'])}</td><td>{_fmt(a['precision'])}</td>"
            f"<td>{a['answered']}</td></tr>"
            for mode, a in data["abstention"].items()
        )
        abstention = (
            f"<h2>Abstention at a requested precision of {target:g}</h2>"
            "<table><tr><th>mode</th><th>threshold</th><th>abstain rate</th>"
            f"<th>precision reached</th><th>answered</th></tr>{cells}</table>"
            "<p>Thresholds are calibrated on cross-validated scores (leave-one-out for kNN, "
            "out-of-fold for the head and hybrid); below one the answer is \"unknown\".</p>"
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>featurebank evaluation - {esc(data["split"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; font-size: 14px; }}
tr.default td {{ font-weight: bold; background: #eef5ff; }}
td.nb {{ font-size: 12px; color: #555; }}
figure {{ display: inline-block; margin: 1em; vertical-align: top; }}
figure img {{ max-width: 1000px; }}
figcaption {{ font-size: 13px; color: #555; }}
</style></head><body>
<h1>featurebank evaluation</h1>
<table>{fact_rows}</table>
<h2>Metrics</h2>
<table><tr><th>mode</th>{"".join(f"<th>{c}</th>" for c in TABLE_COLUMNS)}</tr>
{"".join(rows)}</table>
<p>Bold: the default mode. kNN votes leave each evaluated item out. sklearn_* are
scikit-learn's LogisticRegression and KNeighborsClassifier on the same features.</p>
{abstention}
<h2>Figures</h2>
{figures}
<h2>Most confident mistakes</h2>
<table><tr><th>key</th><th>true</th><th>predicted</th><th>confidence</th><th>neighbours</th></tr>
{"".join(mistakes)}</table>
</body></html>
"""
