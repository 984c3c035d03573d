"""The evaluation report: one self-contained HTML page, its PNGs and metrics.json.

Why self-contained: a report gets mailed, attached to tickets and opened years
later; every figure is embedded (base64) so the page alone is enough, and the
PNGs and JSON sit beside it for slides and scripts.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from featurebank.classify import metrics
from featurebank.classify.evaluate import Evaluation
from featurebank.classify.report_page import render_page
from featurebank.core.bank import replace_folder
from featurebank.core.errors import InvalidInput

log = logging.getLogger(__name__)

FIGURES = {
    "accuracy_vs_k": "Accuracy versus k",
    "confusion": "Confusion matrix",
    "reliability": "Reliability diagram",
    "training_curves": "Head training: the linear probe's L2 path or the epochs",
    "projection": "2-D projection of the embeddings",
    "mistakes": "Most confident mistakes and their neighbours",
}
MAX_PROJECTED = 3000
MAX_TICK_CLASSES = 30


def report_dir(bank_reports: Path) -> Path:
    """reports/<UTC time>/ (a numeric suffix if two reports land in the same second)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = bank_reports / stamp
    n = 1
    while out.exists():
        n += 1
        out = bank_reports / f"{stamp}-{n}"
    return out


def latest_report(bank_reports: Path) -> dict[str, Any] | None:
    """The newest complete report under `bank_reports`: {name, html, metrics}; None if none.

    Folder names are UTC times (see `report_dir`), so the last complete one in name
    order is the newest; a report still being written has no metrics.json yet.
    """
    if not bank_reports.is_dir():
        return None
    for folder in sorted((d for d in bank_reports.iterdir() if d.is_dir()), reverse=True):
        metrics_file, page = folder / "metrics.json", folder / "index.html"
        if metrics_file.is_file() and page.is_file():
            return {
                "name": folder.name,
                "html": page.read_text(),
                "metrics": json.loads(metrics_file.read_text()),
            }
    return None


def write_report(ev: Evaluation, out: str | Path, projection: str = "pca") -> Path:
    """Draw every figure, write PNGs, metrics.json and index.html into `out`; returns the HTML."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    drawers = {
        "accuracy_vs_k": _accuracy_vs_k,
        "confusion": _confusion,
        "reliability": _reliability,
        "training_curves": _training_curves,
        "projection": lambda e: _projection(e, projection),
        "mistakes": _mistakes,
    }
    pngs = {name: _png(draw(ev)) for name, draw in drawers.items()}
    data = _finite(ev.to_json())
    data["figures"] = {name: f"{name}.png" for name in FIGURES}
    data["generated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def write(folder: Path) -> None:
        for name, png in pngs.items():
            (folder / f"{name}.png").write_bytes(png)
        (folder / "metrics.json").write_text(json.dumps(data, indent=1, allow_nan=False))
        (folder / "index.html").write_text(render_page(ev, data, pngs, FIGURES))

    ours = {f"{name}.png" for name in pngs} | {"metrics.json", "index.html"}
    if out.is_dir() and {p.name for p in out.iterdir()} - ours or out.is_file():
        raise InvalidInput(f"{out} holds other files than a report: name a new folder for it")
    replace_folder(out, write, "report")
    page = out / "index.html"
    log.info("report written to %s", page)
    return page


# --------------------------------------------------------------------------- figures


def _png(fig: Any) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _accuracy_vs_k(ev: Evaluation) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = sorted(ev.accuracy_vs_k)
    ax.plot(ks, [ev.accuracy_vs_k[k] for k in ks], "o-", label="knn (leave-one-out)")
    for i, (mode, p) in enumerate(ev.probs.items()):
        if mode == "knn":
            continue
        ax.axhline(metrics.accuracy(ev.y, p), ls="--", color=f"C{i + 1}", label=mode)
    ax.set_xscale("log")
    ax.set_xlabel("k (neighbours)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Accuracy versus k ({ev.split}, n={len(ev.y)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _confusion(ev: Evaluation) -> Any:
    import matplotlib.pyplot as plt

    n = len(ev.vocabulary)
    p = ev.probs[ev.default_mode]
    cm = metrics.confusion(ev.y, p.argmax(axis=1), n).astype(np.float64)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.35 * n, 16)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    if n <= MAX_TICK_CLASSES:
        ax.set_xticks(range(n), ev.vocabulary, rotation=90, fontsize=8)
        ax.set_yticks(range(n), ev.vocabulary, fontsize=8)
        if n <= 15:
            for i in range(n):
                for j in range(n):
                    if cm[i, j]:
                        ax.text(
                            j,
                            i,
                            str(int(cm[i, j])),
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black",
                        )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix ({ev.default_mode})")
    return fig


def _reliability(ev: Evaluation) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="perfect calibration")
    for i, (mode, p) in enumerate(ev.probs.items()):
        r = metrics.reliability(ev.y, p, n_bins=10)
        pts = [
            (c, a)
            for c, a, n in zip(r["confidence"], r["accuracy"], r["count"], strict=True)
            if n > 0
        ]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(
                xs, ys, "o-", color=f"C{i}", ms=4, label=f"{mode} (ECE {metrics.ece(ev.y, p):.3f})"
            )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    return fig


def _training_curves(ev: Evaluation) -> Any:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    curves = (ev.head_manifest or {}).get("curves", {})
    if not curves:
        for ax in axes:
            ax.text(0.5, 0.5, "no head trained", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
        return fig
    cv = (ev.head_manifest or {}).get("cv", {})
    if "c_path" in cv:  # the linear probe: out-of-fold log-loss along its L2 path
        ax = axes[0]
        for name, c in curves.get("head", {}).items():
            if len(c) == len(cv["c_path"]):  # not the single point of scikit-learn's default
                points = [np.nan if v is None else v for v in c]  # None: not walked to
                ax.plot(cv["c_path"], points, marker="o", label=name.removeprefix("log_loss "))
        if cv.get("scaled", True):  # else scikit-learn's default, at the vectors' own scale
            ax.axvline(cv["C"], color="grey", ls=":", label="C chosen by cross-validation")
        ax.set_xscale("log")
        ax.set_xlabel("C (inverse L2 strength)")
        ax.set_ylabel("out-of-fold log-loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        axes[1].set_axis_off()
        fig.suptitle("Linear probe: the regularisation path")
        return fig
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for i, (name, c) in enumerate(curves.items()):
            for key, style in ((metric, "-"), (f"val_{metric}", "--")):
                if key in c:
                    ax.plot(
                        range(1, len(c[key]) + 1),
                        c[key],
                        style,
                        color=f"C{i}",
                        label=f"{name} {'held-out fold' if key.startswith('val') else 'train'}",
                    )
        best = cv.get("epochs")
        if best:
            ax.axvline(best, color="grey", ls=":", label="epochs chosen by cross-validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Head training curves (first cross-validation fold)")
    return fig


def _projection(ev: Evaluation, method: str) -> Any:
    import matplotlib.pyplot as plt

    x = np.asarray(ev.vectors, dtype=np.float64)
    y = ev.y
    pred = ev.probs[ev.default_mode].argmax(axis=1)
    if len(x) > MAX_PROJECTED:
        pick = np.sort(np.random.default_rng(0).choice(len(x), MAX_PROJECTED, replace=False))
        x, y, pred = x[pick], y[pick], pred[pick]
    xy = _project(x, method)
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab20" if len(ev.vocabulary) > 10 else "tab10")
    for c in np.unique(y):
        sel = y == c
        ax.scatter(
            xy[sel, 0],
            xy[sel, 1],
            s=10,
            color=cmap(int(c) % cmap.N),
            label=ev.vocabulary[int(c)] if len(ev.vocabulary) <= 20 else None,
            alpha=0.8,
        )
    wrong = pred != y
    if wrong.any():
        ax.scatter(
            xy[wrong, 0],
            xy[wrong, 1],
            s=40,
            facecolors="none",
            edgecolors="black",
            linewidths=0.8,
            label=f"misclassified ({ev.default_mode})",
        )
    ax.set_title(f"{method.upper()} projection of {ev.split} embeddings, coloured by label")
    ax.set_xticks([])
    ax.set_yticks([])
    if len(ev.vocabulary) <= 20:
        ax.legend(fontsize=7, markerscale=1.5, loc="best")
    return fig


def _project(x: np.ndarray, method: str) -> np.ndarray:
    if len(x) < 3 or x.shape[1] < 2:
        return np.c_[x[:, :1], np.zeros(len(x))] if x.shape[1] else np.zeros((len(x), 2))
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
        return np.asarray(
            TSNE(2, perplexity=perplexity, init="pca", random_state=0).fit_transform(x)
        )
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return np.asarray(centred @ vt[:2].T)


def _thumbnail(uri: str | None) -> np.ndarray | None:
    """Pixels of a local image file named by an item's uri, or None (vectors only)."""
    if not uri:
        return None
    path = Path(uri[7:] if uri.startswith("file://") else uri)
    try:
        from PIL import Image

        with Image.open(path) as src:
            rgb = src.convert("RGB")
        rgb.thumbnail((96, 96))
        return np.asarray(rgb)
    except Exception:  # noqa: BLE001 - any unreadable file just shows as text
        return None


def _mistakes(ev: Evaluation) -> Any:
    import matplotlib.pyplot as plt

    rows = ev.mistakes(n=8)
    n_nb = 5
    if not rows:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.text(
            0.5, 0.5, f"no mistakes on {ev.split} ({ev.default_mode})", ha="center", va="center"
        )
        ax.set_axis_off()
        return fig
    fig, axes = plt.subplots(
        len(rows), n_nb + 1, figsize=(2 * (n_nb + 1), 2.1 * len(rows)), squeeze=False
    )
    for r, m in enumerate(rows):
        cells = [
            (
                m["uri"],
                m["key"],
                f"true {m['true']}\npred {m['predicted']} ({m['confidence']:.2f})",
                "red",
            )
        ]
        for nb in m["neighbors"][:n_nb]:
            cells.append(
                (
                    nb["uri"],
                    nb["key"],
                    f"{nb['label']}\nscore {nb['score']:.3f}",
                    "green" if nb["label"] == m["true"] else "black",
                )
            )
        for c in range(n_nb + 1):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cells):
                ax.set_axis_off()
                continue
            uri, key, caption, color = cells[c]
            img = _thumbnail(uri)
            if img is not None:
                ax.imshow(img)
            else:
                ax.text(0.5, 0.5, _short(key), ha="center", va="center", fontsize=7, wrap=True)
            ax.set_xlabel(caption, fontsize=7, color=color)
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
    axes[0][0].set_title("query", fontsize=8)
    for c in range(1, n_nb + 1):
        axes[0][c].set_title(f"neighbour {c}", fontsize=8)
    fig.suptitle(f"Most confident mistakes ({ev.default_mode})")
    fig.tight_layout()
    return fig


def _short(key: str, width: int = 22) -> str:
    return key if len(key) <= width else "..." + key[-(width - 3) :]


# --------------------------------------------------------------------------- html / json


def _finite(o: Any) -> Any:
    """JSON has no NaN/inf: replace them with null (recursively)."""
    if isinstance(o, dict):
        return {str(k): _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, np.ndarray):
        return _finite(o.tolist())
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o
