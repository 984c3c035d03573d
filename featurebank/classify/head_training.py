"""Training the bank's head, its stacked variant and the hybrid weights as one generation.

Why all three in one step: the hybrid weight `a`, the kNN's k and temperature and
the stacked head all depend on the same kNN votes over the same labelled items, so
they are chosen together (classify/cross_validation.py) and published as one
generation (classify/published_heads.py), which a server swaps in one go.

- head: the linear probe (classify/linear_probe.py, no TensorFlow), or with
  `hidden` > 0 one hidden layer trained with Keras (classify/hidden_layer_head.py).
- hybrid: p = a * p_knn + (1 - a) * p_head, with a, k and T chosen by cross-validation
  over every labelled item, or the single mode that cross-validation found better.
- stacked: a second head on [vector, kNN label distribution]; the distribution of a
  training item is computed leave-one-out, so an item never votes for itself.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from featurebank.classify import cross_validation as cv
from featurebank.classify.abstain import confidence_and_correct
from featurebank.classify.cross_validation import Trainer
from featurebank.classify.head_model import FORMAT as HEAD_FORMAT
from featurebank.classify.knn import Neighbours, Voter
from featurebank.classify.linear_probe import LinearProbe
from featurebank.classify.published_heads import live_manifest, now, publish_head
from featurebank.core.bank import Bank, current_generation
from featurebank.core.errors import FailedPrecondition
from featurebank.core.params import HeadParams
from featurebank.core.vocabulary import HELD_OUT_SPLIT
from featurebank.index.transforms import Transform
from featurebank.store import borrowed

if TYPE_CHECKING:
    from featurebank.index.searcher import Searcher
    from featurebank.store import BankLike, Store

log = logging.getLogger(__name__)


def _linear(transform: Transform, hp: HeadParams, progress: bool) -> Trainer:
    return LinearProbe(transform, hp.class_weight, hp.seed)


def _hidden_layer(transform: Transform, hp: HeadParams, progress: bool) -> Trainer:
    from featurebank.classify.hidden_layer_head import HiddenLayerHead  # imports TensorFlow

    return HiddenLayerHead(transform, hp, progress)


TRAINERS = {"linear probe": _linear, "hidden layer": _hidden_layer}


def head_kind(hp: HeadParams) -> str:
    """Which trainer a head's params ask for: a hidden layer when `hidden` > 0."""
    return "hidden layer" if hp.hidden > 0 else "linear probe"


def loo_knn_distribution(
    neighbours: Neighbours, vectors: np.ndarray, ids: np.ndarray, voter: Voter
) -> np.ndarray:
    """kNN label distribution of bank items, each searched without itself (leave-one-out).

    Why: the stacked head learns how far to trust this distribution; if an item
    could vote for itself the distribution would be one-hot on its own label in
    training and the head would trust it blindly.
    """
    _, codes, scores = neighbours.search(
        vectors, voter.k, exclude_ids=np.asarray(ids, dtype=np.int64)
    )
    return voter.probs(codes, scores, len(neighbours.vocabulary))


def _index_transform(b: Bank, dim: int) -> tuple[Transform, dict[str, Any]]:
    """The live index's fitted transform (the identity if no index) and what to record."""
    gen = current_generation(b.indexes_dir)
    if gen is None:
        return Transform.identity(dim), {"spec": "none", "index_generation": None}
    t = Transform.load(b.indexes_dir / str(gen))
    return t, {"spec": t.spec, "normalize": t.normalize, "index_generation": gen}


def _searcher(store: Store) -> Searcher | None:
    if current_generation(store.bank.indexes_dir) is None:
        return None
    from featurebank.index.searcher import Searcher

    return Searcher.load(store)


def train_head(
    bank: BankLike,
    params: HeadParams | None = None,
    *,
    progress: bool = False,
    keep: int = 2,
    **changes: Any,
) -> dict[str, Any]:
    """Train head, hybrid weights and stacked head on the bank's labelled vectors; publish.

    `params` defaults to the live head's (or the defaults); `changes` override the named
    fields (None keeps). Every labelled item outside the test split is used: to choose
    k, T, a and the head's settings by cross-validation, then to train the published
    heads. The out-of-fold probabilities of every item are published with the heads, so
    abstention and the audit never retrain.
    Returns the manifest written to heads/<gen>/manifest.json.
    """
    started = time.time()
    with borrowed(bank) as st:
        b = st.bank
        hp = (params or HeadParams.from_manifest(live_manifest(b))).override(**changes)
        items = st.to_numpy(labelled_only=True)
        keep_rows = np.flatnonzero(np.asarray(items.splits) != HELD_OUT_SPLIT)
        labels_generation = int(st.labels_generation)
        store_generation = int(st.generation)
        spec = st.spec.to_dict()
        if len(keep_rows) == 0:
            raise FailedPrecondition(
                f"no labelled items outside the {HELD_OUT_SPLIT} split in {b.root}: add labels first"
            )
        labels = [str(items.labels[i]) for i in keep_rows]
        vocabulary = sorted(set(labels))
        if len(vocabulary) < 2:
            raise FailedPrecondition(
                f"a head needs at least 2 labels in {b.root}, found {vocabulary}"
            )
        code_of = {label: i for i, label in enumerate(vocabulary)}
        y = np.array([code_of[label] for label in labels], dtype=np.int64)
        x = np.asarray(items.vectors[keep_rows], dtype=np.float32)
        ids = items.ids[keep_rows].astype(np.int64)
        transform, tinfo = _index_transform(b, x.shape[1])
        searcher = _searcher(st)
        try:
            neighbours = (
                Neighbours(vocabulary, searcher)
                if searcher is not None
                else Neighbours(vocabulary, None, ids, transform.apply(x), y)
            )
            kmax = min(max(cv.K_GRID), max(1, neighbours.ntotal - 1))
            loo = cv.LeaveOneOut(
                *neighbours.search(x, kmax, exclude_ids=ids), neighbours.metric, ids
            )
            n_cls = len(vocabulary)
            trainer = TRAINERS[head_kind(hp)](transform, hp, progress)
            choices = cv.choose(x, y, n_cls, loo, trainer, hp.folds, hp.denoise, hp.seed)
            voter = choices.voter
            # the head on everything, with what cross-validation chose
            weight = cv.agreement_weights(y, choices.p_knn) if hp.denoise else None
            plain = trainer.fit(x, y, n_cls, sample_weight=weight)
            stacked = None
            if hp.stacked:
                if np.bincount(y, minlength=n_cls).min() < 2:
                    log.warning(
                        "stacked head in %s: some labels have a single item, whose leave-one-out "
                        "neighbours never share its label; the stacked mode will distrust kNN",
                        b.root,
                    )
                extra = loo_knn_distribution(neighbours, x, ids, voter)
                stacked = trainer.fit(x, y, n_cls, extra=extra)
        finally:
            if searcher is not None:
                searcher.close()

    sc = choices.scored
    calibration = {
        mode: confidence_and_correct(y[sc], p[sc])
        for mode, p in (("head", choices.p_head), ("hybrid", choices.p_hybrid))
    } if sc.any() else {}
    manifest: dict[str, Any] = {
        "format": HEAD_FORMAT,
        "created": now(),
        "vocabulary": vocabulary,
        "dim": int(x.shape[1]),
        "spec": spec,
        "transform": tinfo,
        "head_params": hp.to_dict(),
        **{k: v for k, v in hp.to_dict().items() if k not in ("stacked", "denoise", "folds")},
        "items": int(len(y)),
        "head_kind": head_kind(hp),
        "cv": {
            "folds": int(min(hp.folds, len(y))),
            **choices.head_choice,
            "scored_items": cv.scored_items(y),
            "down_weighted": choices.down_weighted,
        },
        "curves": {"head": choices.curves},
        "cv_metrics": choices.metrics,
        "hybrid": {**choices.to_dict(), "knn_source": "index" if searcher is not None else "exact cosine"},
        "hybrid_grid": choices.grid,
        "labels_generation": labels_generation,
        "store_generation": store_generation,
        "index_generation": tinfo["index_generation"],
    }
    manifest["train_seconds"] = round(time.time() - started, 3)
    out_of_fold = {
        "ids": ids, "codes": y, "scored": sc,
        "knn": choices.p_knn, "head": choices.p_head, "hybrid": choices.p_hybrid,
    }
    gen = publish_head(b, manifest, plain, stacked, calibration, out_of_fold, keep=keep)
    manifest["generation"] = gen
    log.info(
        "head generation %d: %d items, %d classes, a=%.2f T=%.3f k=%d, hybrid acts as %s",
        gen, len(y), n_cls, choices.a, voter.temperature, voter.k, choices.acts_as,
    )
    return manifest
