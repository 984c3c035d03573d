"""Evaluate every classification mode of a bank on one split, beside scikit-learn.

Why side by side: the numbers only mean something next to what a user would
otherwise do with the same features (LogisticRegression, KNeighborsClassifier),
measured on the same items in the same run. kNN votes leave each evaluated item
out (it is in the index with its own label), so no item ever votes for itself.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from featurebank.classify import metrics
from featurebank.classify.abstain import abstained
from featurebank.classify.classifier import Classifier
from featurebank.classify.modes import MODE_TABLE, align_columns
from featurebank.core.errors import FailedPrecondition
from featurebank.core.vocabulary import EVAL_SPLITS, HELD_OUT_SPLIT, TRAIN_SPLITS, check_choice

if TYPE_CHECKING:
    from featurebank.store import BankLike, Items, Store

log = logging.getLogger(__name__)

K_VALUES = (1, 3, 5, 10, 20, 50, 100)
N_MISTAKES = 12


@dataclass
class Evaluation:
    """Everything the table, metrics.json and the report's figures are drawn from."""

    bank: str
    split: str
    vocabulary: list[str]
    y: np.ndarray
    probs: dict[str, np.ndarray]
    keys: list[str]
    vectors: np.ndarray  # as the index sees them (transformed)
    uris: list[str | None]
    default_mode: str
    accuracy_vs_k: dict[int, float]
    neighbors: list[list[tuple[str, str | None, float]]]
    neighbor_uris: dict[str, str | None]
    head_manifest: dict[str, Any] | None
    info: dict[str, Any] = field(default_factory=dict)
    abstention: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, dict[str, float]]:
        return {m: metrics.summary(self.y, p) for m, p in self.probs.items()}

    def mistakes(self, mode: str | None = None, n: int = N_MISTAKES) -> list[dict[str, Any]]:
        """The most confident wrong predictions of `mode`, with their neighbours."""
        p = self.probs[mode or self.default_mode]
        pred = p.argmax(axis=1)
        conf = p.max(axis=1)
        wrong = np.flatnonzero(pred != self.y)
        wrong = wrong[np.argsort(-conf[wrong], kind="stable")][:n]
        return [
            {
                "key": self.keys[i],
                "uri": self.uris[i],
                "true": self.vocabulary[self.y[i]],
                "predicted": self.vocabulary[pred[i]],
                "confidence": float(conf[i]),
                "neighbors": [
                    {"key": k, "label": lab, "score": s, "uri": self.neighbor_uris.get(k)}
                    for k, lab, s in self.neighbors[i]
                ],
            }
            for i in wrong.tolist()
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "bank": self.bank,
            "split": self.split,
            "n": int(len(self.y)),
            "classes": len(self.vocabulary),
            "default_mode": self.default_mode,
            "modes": self.summary,
            "accuracy_vs_k": {str(k): v for k, v in self.accuracy_vs_k.items()},
            "mistakes": self.mistakes(),
            "abstention": self.abstention,
            **self.info,
        }


def evaluate(
    bank: BankLike,
    split: str = HELD_OUT_SPLIT,
    k: int | None = None,
    sklearn: bool = True,
    progress: bool = False,
    abstain_below: float | None = None,
) -> Evaluation:
    """Score knn/head/hybrid/stacked (and sklearn baselines) on the bank's `split` items.

    With `abstain_below` (a target precision), also each mode's calibrated abstention:
    its threshold, the share of items it answers "unknown" and the precision it reaches
    on the rest.
    """
    check_choice(split, EVAL_SPLITS, "split")
    started = time.time()
    clf = Classifier(bank)
    try:
        st = clf.store
        b = st.bank
        items = st.to_numpy(split=split, labelled_only=True)
        if len(items) == 0:
            raise FailedPrecondition(f"no labelled {split!r} items in {b.root} to evaluate on")
        head = clf.head
        modes = ["knn"]
        if head is not None:
            modes += ["head", "hybrid"] + (["stacked"] if head.stacked is not None else [])
        ids = items.ids.astype(np.int64)
        probs, vocabs, result = clf.predict_modes(
            items.vectors, modes, k=k, exclude_ids=ids, want_neighbors=True
        )
        assert result is not None
        truth = [str(label) for label in items.labels]
        vocabulary = sorted(set().union(*map(set, vocabs.values())) | set(truth))
        code = {label: i for i, label in enumerate(vocabulary)}
        y = np.array([code[t] for t in truth], dtype=np.int64)
        aligned = {m: align_columns(probs[m], vocabs[m], vocabulary) for m in modes}
        features = _features(clf, items.vectors)
        if sklearn:
            aligned.update(_sklearn(st, clf, split, features, vocabulary))
        acc_k = _accuracy_vs_k(clf, items.vectors, ids, truth)
        neighbors = [
            [
                (str(kk), lab, float(s))
                for kk, lab, s, i in zip(ks, ls, ss, idr, strict=True)
                if i >= 0
            ]
            for ks, ls, ss, idr in zip(
                result.keys, result.labels, result.scores.tolist(), result.ids.tolist(), strict=True
            )
        ]
        nb_uris = _neighbor_uris(st, {kk for row in neighbors for kk, _, _ in row})
        info: dict[str, Any] = {
            "index": {
                "generation": clf.index_generation,
                "transform": clf.searcher.manifest.get("transform", {}),
                "factory": clf.searcher.manifest.get("factory"),
                "metric": clf.searcher.metric,
            },
            "head": None
            if head is None
            else {
                "generation": clf.head_generation,
                "stale": clf.head_stale,
                "hybrid": head.hybrid,
                "hidden": head.manifest.get("hidden"),
                "cv": head.manifest.get("cv"),
            },
            "knn": {"k": clf.voter(k).k, "temperature": clf.voter(k).temperature},
            "note": f"the head was trained and a, T, k chosen on the {split} items: "
            "these numbers are optimistic"
            if split != HELD_OUT_SPLIT
            else None,
        }
        ev = Evaluation(
            bank=str(b.root),
            split=split,
            vocabulary=vocabulary,
            y=y,
            probs=aligned,
            keys=list(items.keys),
            vectors=np.asarray(clf.searcher.transform(items.vectors)),
            uris=[m.get("uri") if isinstance(m, dict) else None for m in items.meta],
            default_mode=clf.default_mode,
            accuracy_vs_k=acc_k,
            neighbors=neighbors,
            neighbor_uris=nb_uris,
            head_manifest=None if head is None else head.manifest,
            info=info,
        )
        if abstain_below is not None:
            ev.abstention = _abstention(clf, probs, vocabs, truth, k, abstain_below)
        ev.info["eval_seconds"] = round(time.time() - started, 3)
        log.info("evaluated %d %s items in %.1fs", len(y), split, ev.info["eval_seconds"])
        return ev
    finally:
        clf.close()


def _abstention(
    clf: Classifier,
    probs: dict[str, np.ndarray],
    vocabs: dict[str, list[str]],
    truth: list[str],
    k: int | None,
    precision: float,
) -> dict[str, dict[str, float]]:
    """Per mode with calibration data: threshold, abstain rate and precision reached."""
    out: dict[str, dict[str, float]] = {}
    for mode, p in probs.items():
        if MODE_TABLE[mode].calibrate is None:
            continue  # no cross-validated scores to calibrate on
        threshold = clf.abstain_threshold(precision, mode, k)
        kept = ~abstained(p, threshold)
        pred = np.asarray(vocabs[mode], dtype=object)[p.argmax(axis=1)] if p.shape[1] else None
        right = (pred == np.asarray(truth, dtype=object)) if pred is not None else np.zeros(0)
        out[mode] = {
            "target_precision": precision,
            "threshold": threshold,
            "abstain_rate": float(1.0 - kept.mean()),
            "precision": float(right[kept].mean()) if kept.any() else float("nan"),
            "answered": int(kept.sum()),
        }
    return out


def _features(clf: Classifier, vectors: np.ndarray) -> np.ndarray:
    """The features the head sees (its transform), else what the index stores."""
    if clf.head is not None:
        return clf.head.head.transform.apply(np.asarray(vectors, np.float32))
    return np.asarray(clf.searcher.transform(vectors))


def _sklearn(
    st: Store, clf: Classifier, split: str, features: np.ndarray, vocabulary: list[str]
) -> dict[str, np.ndarray]:
    """LogisticRegression and KNeighborsClassifier fitted on the other labelled items."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    fit_splits = [s for s in (*TRAIN_SPLITS, "val") if s != split]
    parts: list[Items] = [st.to_numpy(split=s, labelled_only=True) for s in fit_splits]
    x = np.concatenate([_features(clf, p.vectors) for p in parts if len(p)] or [np.empty((0, 0))])
    labels = [str(label) for p in parts for label in p.labels]
    out: dict[str, np.ndarray] = {}
    if len(set(labels)) < 2:
        log.warning("sklearn baselines skipped: fewer than 2 labels outside the %s split", split)
        return out
    models = {
        "sklearn_logreg": LogisticRegression(max_iter=2000),
        "sklearn_knn": KNeighborsClassifier(n_neighbors=min(5, len(labels))),
    }
    for name, model in models.items():
        model.fit(x, labels)
        p = model.predict_proba(features)
        out[name] = align_columns(
            p.astype(np.float32), [str(c) for c in model.classes_], vocabulary
        )
    return out


def _accuracy_vs_k(
    clf: Classifier, vectors: np.ndarray, ids: np.ndarray, truth: list[str]
) -> dict[int, float]:
    """kNN accuracy (leave-one-out) for several k, from one search at the largest k."""
    searcher = clf.searcher
    avail = int(searcher.ntotal) - 1
    ks = [k for k in K_VALUES if k <= avail] or [max(1, avail)]
    res = searcher.search(vectors, max(ks), exclude_ids=ids, voters_only=True)
    tuned = clf.voter()
    out: dict[int, float] = {}
    for k in ks:
        p, vocab = dataclasses.replace(tuned, k=k).of(res)
        pred = [
            vocab[i] if row.max() > 0 else None for i, row in zip(p.argmax(axis=1), p, strict=True)
        ]
        out[k] = float(np.mean([a == t for a, t in zip(pred, truth, strict=True)]))
    return out


def _neighbor_uris(st: Store, keys: set[str]) -> dict[str, str | None]:
    if not keys:
        return {}
    found = [k for k in keys if st.has(k)]
    got = st.get_by_keys(found) if found else None
    out: dict[str, str | None] = dict.fromkeys(keys)
    if got is not None:
        for key, meta in zip(got.keys, got.meta, strict=True):
            out[key] = meta.get("uri") if isinstance(meta, dict) else None
    return out


TABLE_COLUMNS = ("accuracy", "top5", "macro_f1", "log_loss", "ece")


def format_table(ev: Evaluation) -> str:
    """A plain-text table of every mode's metrics (what `featurebank eval` prints)."""
    rows = ev.summary
    head = f"{'mode':<16}" + "".join(f"{c:>10}" for c in TABLE_COLUMNS)
    lines = [
        f"{ev.split} split of {ev.bank}: {len(ev.y)} items, {len(ev.vocabulary)} classes",
        head,
    ]
    for mode, m in rows.items():
        mark = " *" if mode == ev.default_mode else ""
        lines.append(f"{mode + mark:<16}" + "".join(f"{m[c]:>10.4f}" for c in TABLE_COLUMNS))
    lines.append("* default mode; knn votes leave each evaluated item out")
    if ev.abstention:
        target = next(iter(ev.abstention.values()))["target_precision"]
        lines.append(f"abstention at a requested precision of {target:g}")
        lines.append(f"{'mode':<16}{'threshold':>10}{'abstain':>10}{'precision':>10}{'answered':>10}")
        for mode, a in ev.abstention.items():
            lines.append(
                f"{mode:<16}{a['threshold']:>10.4f}{a['abstain_rate']:>10.4f}"
                f"{a['precision']:>10.4f}{a['answered']:>10d}"
            )
    return "\n".join(lines)
