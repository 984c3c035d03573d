"""Training and loading the bank's head, its stacked variant and the hybrid weights.

Why all three in one step: the hybrid weight `a`, the kNN temperature and the
stacked head all depend on the same kNN votes over the same split, so they are
chosen together and saved as one generation (heads/<gen>/, heads/CURRENT), and a
server swaps them in one go.

- head: softmax regression / one hidden layer on the (transformed) stored vectors.
- hybrid: p = a * p_knn + (1 - a) * p_head, with a, T and k chosen on val by log-loss.
- stacked: a second head on [vector, kNN label distribution]; the distribution of a
  training item is computed leave-one-out, so an item never votes for itself.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featurebank.classify import metrics
from featurebank.classify.head import Head, HeadFit, apply_transform, fit_head, transform_arrays
from featurebank.core.bank import Bank, current_generation, publish, staging_dir
from featurebank.core.errors import FailedPrecondition, NotFound
from featurebank.store import borrowed

if TYPE_CHECKING:
    from featurebank.index.searcher import Searcher
    from featurebank.store import BankLike, Store

log = logging.getLogger(__name__)

HEAD_FILE = "head.npz"
STACKED_FILE = "stacked.npz"
MANIFEST = "manifest.json"

K_GRID = (5, 10, 20, 50)
T_GRID = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.2, 0.5, 1.0)
A_GRID = tuple(round(float(a), 2) for a in np.linspace(0.0, 1.0, 21))
DEFAULT_K = 20
DEFAULT_T = 0.07
DEFAULT_A = 0.5
TRAIN_SPLITS = ("train", "none")
VAL_FRACTION = 0.2
MIN_VAL_PER_CLASS = 10  # below this, early stopping's best epoch is not trusted for a refit


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedHead:
    """One published head generation: the plain head, the stacked head and the manifest."""

    generation: int
    manifest: dict[str, Any]
    head: Head
    stacked: Head | None

    @property
    def vocabulary(self) -> list[str]:
        return list(self.manifest["vocabulary"])

    @property
    def hybrid(self) -> dict[str, Any]:
        return dict(self.manifest["hybrid"])


def load_head(bank: str | Path | Bank, generation: int | None = None) -> LoadedHead | None:
    """The live (or given) head generation, or None when no head was ever trained."""
    b = Bank(bank)
    gen = generation if generation is not None else current_generation(b.heads_dir)
    if gen is None:
        return None
    d = b.heads_dir / str(gen)
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        head = Head.load(d / HEAD_FILE)
    except FileNotFoundError as e:
        raise NotFound(f"head generation {gen} in {b.heads_dir} is incomplete: {e}") from e
    stacked = Head.load(d / STACKED_FILE) if (d / STACKED_FILE).exists() else None
    return LoadedHead(gen, manifest, head, stacked)


def labels_generation_of(manifest: dict[str, Any]) -> int:
    """The store's labels generation a head was trained on (-1 when unknown)."""
    return int(manifest.get("labels_generation", -1))


def is_stale(manifest: dict[str, Any], store_labels_generation: int) -> bool:
    """A head is stale once the store's labels changed after it was trained."""
    return store_labels_generation > labels_generation_of(manifest)


def head_status(bank: BankLike) -> dict[str, Any] | None:
    """What `store info` and `head info` show about the head; None when there is none.

    A head is stale once labels changed after it was trained (the store's
    labels_generation moved past the one recorded in the head's manifest).
    """
    with borrowed(bank) as st:
        gen = current_generation(st.bank.heads_dir)
        if gen is None:
            return None
        manifest = json.loads((st.bank.heads_dir / str(gen) / MANIFEST).read_text())
        store_labels = int(st.labels_generation)
    trained_on = labels_generation_of(manifest)
    val = manifest.get("val_metrics", {})
    return {
        "generation": gen,
        "created": manifest.get("created"),
        "classes": len(manifest.get("vocabulary", [])),
        "hidden": manifest.get("hidden", 0),
        "labels_generation": trained_on,
        "store_labels_generation": store_labels,
        "stale": is_stale(manifest, store_labels),
        "hybrid_a": manifest.get("hybrid", {}).get("a"),
        "val_accuracy": {m: v.get("accuracy") for m, v in val.items()},
    }


# --------------------------------------------------------------------------- kNN votes


class Neighbours:
    """Labelled neighbours of query vectors, from the live index or, without one, exactly.

    Codes are indices into the head's vocabulary (-1 = unlabelled / unknown label).
    """

    def __init__(
        self,
        vocabulary: Sequence[str],
        searcher: Searcher | None = None,
        bank_ids: np.ndarray | None = None,
        bank_vectors: np.ndarray | None = None,
        bank_codes: np.ndarray | None = None,
    ) -> None:
        self.vocabulary = list(vocabulary)
        self._code = {label: i for i, label in enumerate(self.vocabulary)}
        self.searcher = searcher
        self.metric = searcher.metric if searcher is not None else "cosine"
        self._ids = bank_ids
        self._codes = bank_codes
        self._unit = None if bank_vectors is None else _unit(bank_vectors)

    @property
    def ntotal(self) -> int:
        if self.searcher is not None:
            return int(self.searcher.ntotal)
        return 0 if self._ids is None else len(self._ids)

    def search(
        self, vectors: np.ndarray, k: int, exclude_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(codes (n, k) int64, scores (n, k) float32); `exclude_ids` drops each row's own item."""
        k = max(1, min(k, self.ntotal - (1 if exclude_ids is not None else 0)))
        if self.searcher is not None:
            res = self.searcher.search(vectors, k, exclude_ids=exclude_ids, voters_only=True)
            remap = np.array(
                [self._code.get(label, -1) for label in res.vocabulary] + [-1], dtype=np.int64
            )
            codes = np.asarray(res.label_codes, dtype=np.int64)
            codes = remap[np.where(codes < 0, len(remap) - 1, codes)]
            return codes, np.asarray(res.scores, dtype=np.float32)
        return self._exact(vectors, k, exclude_ids)

    def _exact(
        self, vectors: np.ndarray, k: int, exclude_ids: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self._unit is not None and self._ids is not None and self._codes is not None
        q = _unit(vectors)
        codes = np.empty((len(q), k), dtype=np.int64)
        scores = np.empty((len(q), k), dtype=np.float32)
        for s in range(0, len(q), 1024):
            sim = q[s : s + 1024] @ self._unit.T
            if exclude_ids is not None:
                own = self._ids[None, :] == np.asarray(exclude_ids[s : s + 1024])[:, None]
                sim[own] = -np.inf
            top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
            codes[s : s + 1024] = self._codes[top]
            scores[s : s + 1024] = np.take_along_axis(sim, top, axis=1)
        return codes, scores

    def vote(self, codes: np.ndarray, scores: np.ndarray, k: int, temperature: float) -> np.ndarray:
        """Softmax-weighted label distribution over the first k neighbours."""
        from featurebank.classify.knn import vote

        k = min(k, codes.shape[1])
        probs = vote(
            codes[:, :k], scores[:, :k], len(self.vocabulary), "softmax", temperature, self.metric
        )
        return np.asarray(probs, dtype=np.float32)


def loo_knn_distribution(
    neighbours: Neighbours,
    vectors: np.ndarray,
    ids: np.ndarray,
    k: int,
    temperature: float,
) -> np.ndarray:
    """kNN label distribution of bank items, each searched without itself (leave-one-out).

    Why: the stacked head learns how far to trust this distribution; if an item
    could vote for itself the distribution would be one-hot on its own label in
    training and the head would trust it blindly.
    """
    codes, scores = neighbours.search(vectors, k, exclude_ids=np.asarray(ids, dtype=np.int64))
    return neighbours.vote(codes, scores, k, temperature)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def hybrid(p_knn: np.ndarray, p_head: np.ndarray, a: float) -> np.ndarray:
    """p = a * p_knn + (1 - a) * p_head (both over the same vocabulary)."""
    return np.asarray(a * p_knn + (1.0 - a) * p_head, dtype=np.float32)


def select_hybrid(
    y: np.ndarray,
    p_head: np.ndarray,
    knn_probs: dict[tuple[int, float], np.ndarray],
    a_grid: Sequence[float] = A_GRID,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Grid search of (k, T, a) by val log-loss; returns the best and the whole grid.

    Ties keep the first (smaller k, lower T, smaller a).
    """
    grid: list[dict[str, float]] = []
    best: dict[str, Any] | None = None
    for (k, t), pk in knn_probs.items():
        for a in a_grid:
            ll = metrics.log_loss(y, hybrid(pk, p_head, a))
            grid.append({"k": k, "temperature": t, "a": a, "log_loss": ll})
            if best is None or ll < best["val_log_loss"] - 1e-12:
                best = {"k": k, "temperature": t, "a": a, "val_log_loss": ll}
    assert best is not None
    return best, grid


# --------------------------------------------------------------------------- training


def split_train_val(
    splits: Sequence[str], codes: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, str]:
    """Indices of training and validation items, and where the validation set came from.

    The store's val split when it has one; otherwise a stratified 80/20 split of the
    training items with a fixed seed (classes with a single item stay in training).
    """
    sp = np.asarray(splits)
    train = np.flatnonzero(np.isin(sp, TRAIN_SPLITS))
    val = np.flatnonzero(sp == "val")
    if len(val):
        return train, val, "val split"
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    held: list[int] = []
    for c in np.unique(codes[train]):
        members = train[codes[train] == c]
        members = members[rng.permutation(len(members))]
        n_val = int(round(VAL_FRACTION * len(members))) if len(members) >= 2 else 0
        n_val = min(n_val, len(members) - 1)
        held.extend(members[:n_val].tolist())
        keep.extend(members[n_val:].tolist())
    return (
        np.sort(np.array(keep, dtype=np.int64)),
        np.sort(np.array(held, dtype=np.int64)),
        (
            f"stratified {int(100 - 100 * VAL_FRACTION)}/{int(100 * VAL_FRACTION)} of train, seed {seed}"
        ),
    )


def _index_transform(b: Bank) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The live index's fitted transform as head arrays (its own 'none' if no index)."""
    gen = current_generation(b.indexes_dir)
    if gen is None:
        return transform_arrays("none"), {"spec": "none", "index_generation": None}
    from featurebank.index.transforms import Transform

    t = Transform.load(b.indexes_dir / str(gen))
    return transform_arrays(t.spec, t.mean, t.matrix, t.normalize), {
        "spec": t.spec,
        "normalize": t.normalize,
        "index_generation": gen,
    }


def _searcher(store: Store) -> Searcher | None:
    if current_generation(store.bank.indexes_dir) is None:
        return None
    from featurebank.index.searcher import Searcher

    return Searcher.load(store)


def train_head(
    bank: BankLike,
    hidden: int = 0,
    dropout: float = 0.2,
    epochs: int = 100,
    label_smoothing: float = 0.0,
    class_weight: str = "balanced",
    progress: bool = False,
    *,
    stacked: bool = True,
    seed: int = 0,
    learning_rate: float = 1e-2,
    refit: bool = True,
    keep: int = 2,
) -> dict[str, Any]:
    """Train head, hybrid weights and stacked head on the bank's labelled vectors; publish.

    Without a val split in the store, 20% of the training items (stratified) choose
    the epochs, a, T and k; with `refit` the heads are then retrained on all the
    training items for the chosen number of epochs (val metrics stay those measured
    before). Returns the manifest written to heads/<gen>/manifest.json.
    """
    started = time.time()
    with borrowed(bank) as st:
        b = st.bank
        items = st.to_numpy(labelled_only=True)
        labels_generation = int(st.labels_generation)
        store_generation = int(st.generation)
        spec = st.spec.to_dict()
        if len(items) == 0:
            raise FailedPrecondition(f"no labelled items in {b.root}: add labels first")
        vocabulary = sorted({str(label) for label in items.labels if label is not None})
        if len(vocabulary) < 2:
            raise FailedPrecondition(
                f"a head needs at least 2 labels in {b.root}, found {vocabulary}"
            )
        code_of = {label: i for i, label in enumerate(vocabulary)}
        y_all = np.array([code_of[str(label)] for label in items.labels], dtype=np.int64)
        tr, va, val_source = split_train_val(items.splits, y_all, seed)
        if len(tr) == 0:
            raise FailedPrecondition(
                f"no labelled items in the train split of {b.root} (splits train/none are used)"
            )
        x, ids = np.asarray(items.vectors, dtype=np.float32), items.ids.astype(np.int64)
        tparams, tinfo = _index_transform(b)
        searcher = _searcher(st)
        neighbours = (
            Neighbours(vocabulary, searcher)
            if searcher is not None
            else Neighbours(vocabulary, None, ids, apply_transform(tparams, x), y_all)
        )
        fit_kw: dict[str, Any] = dict(
            hidden=hidden,
            dropout=dropout,
            epochs=epochs,
            label_smoothing=label_smoothing,
            class_weight=class_weight,
            transform=tparams,
            seed=seed,
            progress=progress,
            learning_rate=learning_rate,
        )
        n_cls = len(vocabulary)
        xv, yv = (x[va], y_all[va]) if len(va) else (None, None)
        plain = fit_head(x[tr], y_all[tr], n_cls, xv, yv, **fit_kw)

        # kNN votes (leave-one-out) once per k; temperatures are re-weightings of the same search
        kmax = min(max(K_GRID), max(1, neighbours.ntotal - 1))
        k_grid = sorted({min(k, kmax) for k in K_GRID})
        val_metrics: dict[str, dict[str, float]] = {}
        if len(va):
            codes_va, scores_va = neighbours.search(x[va], kmax, exclude_ids=ids[va])
            p_head_va = plain.head.predict_proba(x[va])
            knn_probs = {
                (k, t): neighbours.vote(codes_va, scores_va, k, t) for k in k_grid for t in T_GRID
            }
            best, grid = select_hybrid(y_all[va], p_head_va, knn_probs)
            p_knn_va = knn_probs[(best["k"], best["temperature"])]
            val_metrics["knn"] = metrics.summary(y_all[va], p_knn_va)
            val_metrics["head"] = metrics.summary(y_all[va], p_head_va)
            val_metrics["hybrid"] = metrics.summary(
                y_all[va], hybrid(p_knn_va, p_head_va, best["a"])
            )
        else:
            best = {
                "k": min(DEFAULT_K, kmax),
                "temperature": DEFAULT_T,
                "a": DEFAULT_A,
                "val_log_loss": None,
            }
            grid = []
            log.warning(
                "no validation items in %s: hybrid uses a=%.2f, T=%.2f untuned",
                b.root,
                DEFAULT_A,
                DEFAULT_T,
            )
        hyb = {
            **best,
            "weights": "softmax",
            "metric": neighbours.metric,
            "knn_source": "index" if searcher is not None else "exact cosine",
        }

        stacked_fit: HeadFit | None = None
        counts = np.bincount(y_all[np.concatenate([tr, va])], minlength=n_cls)
        if stacked and counts.min() < 2:
            log.warning(
                "stacked head in %s: some labels have a single item, whose leave-one-out "
                "neighbours never share its label; the stacked mode will distrust kNN",
                b.root,
            )
        k, t = int(best["k"]), float(best["temperature"])
        if stacked:
            extra_tr = loo_knn_distribution(neighbours, x[tr], ids[tr], k, t)
            extra_va = neighbours.vote(codes_va, scores_va, k, t) if len(va) else None
            stacked_fit = fit_head(
                x[tr],
                y_all[tr],
                n_cls,
                xv,
                yv,
                extra_train=extra_tr,
                extra_val=extra_va,
                **fit_kw,
            )
            if len(va):
                assert extra_va is not None
                val_metrics["stacked"] = metrics.summary(
                    y_all[va], stacked_fit.head.predict_proba(x[va], extra_va)
                )
        refitted = refit and len(va) > 0 and val_source != "val split"
        if refitted:
            # val was carved out of the user's training items: once it has chosen the
            # epochs (and a, T, k), train again on all of them for that many epochs
            both = np.concatenate([tr, va])
            # a minimum of val loss over a few items per class is noise: then train the
            # full budget (stopping on training loss) rather than trust that epoch
            trust = len(va) >= MIN_VAL_PER_CLASS * n_cls
            plain = _refit(plain, x[both], y_all[both], n_cls, fit_kw, trust_epoch=trust)
            if stacked_fit is not None:
                extra = loo_knn_distribution(neighbours, x[both], ids[both], k, t)
                stacked_fit = _refit(
                    stacked_fit, x[both], y_all[both], n_cls, fit_kw, extra, trust_epoch=trust
                )
        if searcher is not None:
            searcher.close()

    manifest: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "vocabulary": vocabulary,
        "dim": int(x.shape[1]),
        "spec": spec,
        "transform": tinfo,
        "hidden": hidden,
        "dropout": dropout,
        "epochs": epochs,
        "label_smoothing": label_smoothing,
        "class_weight": class_weight,
        "learning_rate": learning_rate,
        "seed": seed,
        "split": {
            "train": int(len(tr)),
            "val": int(len(va)),
            "val_source": val_source,
            "refit_on_train_and_val": refitted,
        },
        "curves": {
            "head": plain.curves,
            **({"stacked": stacked_fit.curves} if stacked_fit else {}),
        },
        "best_epoch": {
            "head": plain.best_epoch,
            **({"stacked": stacked_fit.best_epoch} if stacked_fit else {}),
        },
        "val_metrics": val_metrics,
        "hybrid": hyb,
        "hybrid_grid": grid,
        "labels_generation": labels_generation,
        "store_generation": store_generation,
        "index_generation": tinfo["index_generation"],
        "files": {"head": HEAD_FILE, **({"stacked": STACKED_FILE} if stacked_fit else {})},
    }
    staging = staging_dir(b.heads_dir)
    try:
        plain.head.save(staging / HEAD_FILE)
        if stacked_fit is not None:
            stacked_fit.head.save(staging / STACKED_FILE)
        manifest["train_seconds"] = round(time.time() - started, 3)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, default=_json_default))
        gen = publish(b.heads_dir, staging, keep=keep)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest["generation"] = gen
    log.info(
        "head generation %d: %d train / %d val items, %d classes, a=%.2f T=%.3f k=%d",
        gen,
        len(tr),
        len(va),
        n_cls,
        hyb["a"],
        hyb["temperature"],
        hyb["k"],
    )
    return manifest


def _refit(
    fit: HeadFit,
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    fit_kw: dict[str, Any],
    extra: np.ndarray | None = None,
    trust_epoch: bool = True,
) -> HeadFit:
    """The same head retrained on more items, for the epochs early stopping chose if trusted."""
    kw = {**fit_kw, "epochs": max(1, fit.best_epoch)} if trust_epoch else dict(fit_kw)
    again = fit_head(x, y, n_classes, extra_train=extra, **kw)
    return HeadFit(again.head, fit.curves, fit.best_epoch, fit.epochs_run)


def _json_default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
