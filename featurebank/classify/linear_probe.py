"""The default head: multinomial logistic regression on the stored vectors, solved exactly.

Why: a linear probe on frozen features is the strong, convex baseline (what a user gets
from `LogisticRegression().fit(X, y)`); solved to its optimum by L-BFGS
(classify/softmax_regression.py, numpy alone) it needs no epochs, no learning rate, no
TensorFlow and no scikit-learn, and cross-validating it on 1,797 items takes about a
second of CPU.

The candidates, each scored out of fold (stratified folds over every labelled item, the
folds of classify/cross_validation.py): scikit-learn's default model (`DEFAULT_C` on the
vectors as stored, at their own scale: `REFERENCE`); and the L2 strengths of `C_PATH`,
walked from `DEFAULT_C` towards stronger and towards weaker regularisation, each fit
warm-started from its neighbour's optimum, on each input (the index's fitted transform
or the vectors as stored, `INPUTS`) centred on the training items and scaled to unit
variance on average (so one path fits every bank); each with and, when denoising weights
are given, without them (on clean labels they cost a little, on noisy ones they gain a
lot). A walk stops once its out-of-fold log-loss has risen `PATIENCE` times past its
best (the curve has one minimum; the far ends, weak regularisation above all, are the
slow fits).

Which one: the reference, unless a candidate's out-of-fold log-loss is lower by more
than `STANDARD_ERRORS` standard errors of the per-item difference and it is right on at
least as many items (a denoised one must also be lower and as often right as the same
model unweighted); then the lowest log-loss of those. With a few labels per class the
path's minimum moves with every draw, and following it (on log-loss alone, or at one
standard error) cost up to a point of accuracy against scikit-learn's default on
benchmarks/classify_quality.py; a clear win (denoising noisy labels: 2 to 4 standard
errors there) still wins. With fewer than `MIN_SCORED` items that can be scored out of
fold (a single label per class: none) only the reference is fitted. The out-of-fold
probabilities at the choice are what the hybrid weight, its guard and abstention are
calibrated on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from featurebank.classify import softmax_regression as sr
from featurebank.classify.head_model import (
    Head,
    check_training_set,
    item_weights,
    standardisation,
)
from featurebank.index.transforms import Transform

log = logging.getLogger(__name__)

C_PATH = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)  # inverse L2 strength, strong to weak
DEFAULT_C = 1.0
MAX_ITER = 300
TOL = 1e-6  # the published head: scikit-learn's 1e-4 stops a few percent short at large C
PATH_TOL, PATH_MAX_ITER = 1e-4, 100  # choosing along the path: scikit-learn's defaults
INPUTS = ("index transform", "as stored")
REFERENCE = "scikit-learn's default"  # DEFAULT_C on the vectors as stored, at their own scale
STANDARD_ERRORS = 2.0  # how clearly a candidate must beat the reference to replace it
MIN_SCORED = 20  # fewer scored items: their standard error is itself noise; keep the reference
PATIENCE = 1  # rises of the log-loss past a path's best before the path stops


@dataclass
class OutOfFold:
    """Out-of-fold probabilities at the chosen settings, what was chosen, and the path."""

    p: np.ndarray
    chosen: dict[str, Any]
    curves: Mapping[str, Sequence[float | None]] = field(default_factory=dict)
    """Out-of-fold log-loss per candidate; None where a walk stopped or nothing is scored."""


@dataclass(frozen=True)
class Candidate:
    """One model cross-validation scores: input, weighting, C, and whether C is scale-free."""

    input: str
    weights: str
    c: float
    scaled: bool = True

    def effective_c(self, scale: float) -> float:
        """C on the standardised input: the reference's C=1 at the vectors' own scale is
        C * scale^2 once they are divided by `scale`."""
        return self.c if self.scaled else self.c * scale * scale

    def to_dict(self) -> dict[str, Any]:
        return {"C": self.c, "input": self.input, "weights": self.weights, "scaled": self.scaled,
                "c_path": list(C_PATH)}


REFERENCE_CANDIDATE = Candidate(INPUTS[1], "plain", DEFAULT_C, scaled=False)
Scored = tuple[np.ndarray, dict[int, "sr.Fit | None"]]  # out-of-fold probabilities, fold fits


def _one_thread() -> Any:
    """One BLAS thread, set once per training (setting it costs ~20 ms): these are small
    problems, and BLAS threads competing for shared cores make a 50 ms fit take seconds."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def _per_item_loss(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(p[np.arange(len(y)), y].astype(np.float64), 1e-15, 1.0))


def clearly_better(ref: np.ndarray, other: np.ndarray) -> float:
    """How far `other`'s per-item losses beat `ref`'s, in standard errors of the difference."""
    diff = ref - other
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    mean = float(diff.mean())
    return mean / se if se > 0 else (np.inf if mean > 0 else 0.0)


@dataclass
class _Fold:
    """One fold of one input: its standardised training and held-out vectors."""

    held: np.ndarray
    zt: np.ndarray
    zh: np.ndarray
    yt: np.ndarray
    scale: float


class LinearProbe:
    """Fits the linear-probe head; `out_of_fold` chooses its candidate, `fit` uses it."""

    def __init__(self, transform: Transform, class_weight: str = "balanced", seed: int = 0) -> None:
        self.inputs = {INPUTS[0]: transform, INPUTS[1]: Transform.identity(transform.in_dim)}
        if transform.spec == "none" and not transform.normalize:
            del self.inputs[INPUTS[0]]  # the same input twice
        self.class_weight = class_weight
        self.seed = seed  # the solver is deterministic; kept for the trainer's interface
        self.choice = REFERENCE_CANDIDATE
        self._start: sr.Fit | None = None  # a fold's fit at the choice: where `fit` starts

    def out_of_fold(
        self,
        x: np.ndarray,
        y: np.ndarray,
        n_classes: int,
        folds: np.ndarray,
        fold_weights: dict[int, np.ndarray | None],
    ) -> OutOfFold:
        """Every candidate scored out of fold; keeps the reference unless one clearly wins."""
        with _one_thread():
            return self._out_of_fold(x, y, n_classes, folds, fold_weights)

    def _out_of_fold(
        self,
        x: np.ndarray,
        y: np.ndarray,
        n_classes: int,
        folds: np.ndarray,
        fold_weights: dict[int, np.ndarray | None],
    ) -> OutOfFold:
        scorable = np.bincount(y, minlength=n_classes)[y] >= 2
        weightings: dict[str, dict[int, np.ndarray | None]] = {"plain": {}}
        if any(w is not None for w in fold_weights.values()):
            weightings["denoised"] = fold_weights
        scored: dict[Candidate, Scored] = {}
        curves: dict[str, list[float | None]] = {}
        few = scorable.sum() < MIN_SCORED  # the reference is kept: nothing else to score

        def point(p: np.ndarray) -> float | None:
            return None if few else self._mean_loss(y, p, scorable)

        for name, transform in self.inputs.items():
            if few and name != REFERENCE_CANDIDATE.input:
                continue
            xt = transform.apply(np.asarray(x, np.float32))
            split = self._folds(xt, y, folds)
            for wname, weights in weightings.items():
                if few and wname != REFERENCE_CANDIDATE.weights:
                    continue
                ws = {f: item_weights(y[folds != f], n_classes, self.class_weight, weights.get(f))
                      for f in split}
                start: dict[int, sr.Fit | None] = {}
                if name == REFERENCE_CANDIDATE.input:
                    cand = Candidate(name, wname, DEFAULT_C, scaled=False)
                    scored[cand] = self._score(split, ws, cand, {}, y, n_classes)
                    start = scored[cand][1]
                    curves[f"log_loss {name}, {wname}, {REFERENCE}"] = [point(scored[cand][0])]
                walked = {} if few else self._walk(
                    split, ws, name, wname, start, y, n_classes, scorable)
                curves[f"log_loss {name}, {wname}"] = [
                    point(walked[c][0]) if c in walked else None
                    for c in (Candidate(name, wname, c) for c in C_PATH)]
                scored.update(walked)
        self.choice = self._choose(scored, y, scorable)
        p, fits = scored[self.choice]
        self._start = next((f for f in fits.values() if f is not None), None)
        chosen = self.choice.to_dict()
        log.info("linear probe: %s (out-of-fold log-loss)", chosen)
        return OutOfFold(p, chosen, curves)

    @staticmethod
    def _mean_loss(y: np.ndarray, p: np.ndarray, scorable: np.ndarray) -> float:
        return float(_per_item_loss(y[scorable], p[scorable]).mean()) if scorable.any() else np.nan

    @staticmethod
    def _choose(
        scored: dict[Candidate, Scored],
        y: np.ndarray,
        scorable: np.ndarray,
    ) -> Candidate:
        """The lowest out-of-fold log-loss among the candidates that beat the reference
        clearly (by STANDARD_ERRORS, and right on at least as many items), else the reference."""
        ref = REFERENCE_CANDIDATE
        if scorable.sum() < MIN_SCORED or ref not in scored:
            return ref
        ys = y[scorable]
        loss = {c: _per_item_loss(ys, p[scorable]) for c, (p, _) in scored.items()}
        right = {c: int((p[scorable].argmax(axis=1) == ys).sum()) for c, (p, _) in scored.items()}

        def beats(c: Candidate, over: Candidate, sigmas: float) -> bool:
            return over not in loss or (
                right[c] >= right[over] and clearly_better(loss[over], loss[c]) > sigmas)

        # a denoised model must also beat the same model unweighted: on clean labels the
        # weights only take evidence away
        better = [c for c in loss if c != ref and beats(c, ref, STANDARD_ERRORS) and (
            c.weights == "plain" or beats(c, replace(c, weights="plain"), 0.0))]
        return min(better, key=lambda c: float(loss[c].mean())) if better else ref

    def _folds(self, xt: np.ndarray, y: np.ndarray, folds: np.ndarray) -> dict[int, _Fold]:
        out = {}
        for f in np.unique(folds).tolist():
            held, train = folds == f, folds != f
            if not train.any():
                continue
            m, s = standardisation(xt[train])
            out[f] = _Fold(held, (xt[train] - m) / s, (xt[held] - m) / s, y[train], float(s))
        return out

    def _walk(
        self,
        split: dict[int, _Fold],
        weights: dict[int, np.ndarray],
        name: str,
        wname: str,
        start: dict[int, sr.Fit | None],
        y: np.ndarray,
        n_classes: int,
        scorable: np.ndarray,
    ) -> dict[Candidate, Scored]:
        """The path from DEFAULT_C outwards, each way until the out-of-fold log-loss has
        risen PATIENCE times past its best; every fit warm-started from its neighbour's."""
        j0 = C_PATH.index(DEFAULT_C)
        centre = Candidate(name, wname, C_PATH[j0])
        out = {centre: self._score(split, weights, centre, start, y, n_classes)}
        centre_loss = self._mean_loss(y, out[centre][0], scorable)
        for step in (1, -1):
            last, best, rises, j = out[centre][1], centre_loss, 0, j0 + step
            while 0 <= j < len(C_PATH) and rises < PATIENCE:
                cand = Candidate(name, wname, C_PATH[j])
                out[cand] = self._score(split, weights, cand, last, y, n_classes)
                last, loss = out[cand][1], self._mean_loss(y, out[cand][0], scorable)
                best, rises = (loss, 0) if loss < best else (best, rises + 1)
                j += step
        return out

    @staticmethod
    def _score(
        split: dict[int, _Fold],
        weights: dict[int, np.ndarray],
        cand: Candidate,
        start: dict[int, sr.Fit | None],
        y: np.ndarray,
        n_classes: int,
    ) -> Scored:
        """Out-of-fold probabilities of one candidate, and its fit in each fold."""
        p = np.zeros((len(y), n_classes), np.float32)
        fits: dict[int, sr.Fit | None] = {}
        for f, fold in split.items():
            if len(np.unique(fold.yt)) < 2:  # one class: it is all the fold can say
                p[fold.held, int(fold.yt[0])] = 1.0
                fits[f] = None
                continue
            model = sr.fit(fold.zt, fold.yt, cand.effective_c(fold.scale), weights[f],
                           init=start.get(f), tol=PATH_TOL, max_iter=PATH_MAX_ITER,
                           dtype=np.float32)
            p[fold.held] = model.proba(fold.zh, n_classes)
            fits[f] = model
        return p, fits

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        n_classes: int,
        sample_weight: np.ndarray | None = None,
        extra: np.ndarray | None = None,
    ) -> Head:
        """The head on every item with the chosen candidate (`sample_weight`, the denoising
        weights, counts only when cross-validation chose them; `extra`: the input a stacked
        head joins to the vectors)."""
        x = np.asarray(x, np.float32)
        check_training_set(x, y, n_classes)
        transform = self.inputs[self.choice.input]
        xt = transform.apply(x)
        weights: dict[str, np.ndarray] = {}
        if extra is not None:
            xt = np.concatenate([xt, np.asarray(extra, np.float32)], axis=1)
            weights["n_extra"] = np.array(extra.shape[1])
        w = item_weights(y, n_classes, self.class_weight, sample_weight)  # checks its shape
        if self.choice.weights == "plain":
            w = item_weights(y, n_classes, self.class_weight)
        if len(np.unique(y)) < 2:
            raise ValueError("a linear probe needs items of two classes")  # checked upstream
        m, s = standardisation(xt)
        with _one_thread():
            model = sr.fit((xt - m) / s, y, self.choice.effective_c(float(s)), w,
                           init=self._start, tol=TOL, max_iter=MAX_ITER, dtype=np.float32)
        kernel = np.zeros((xt.shape[1], n_classes), np.float32)
        bias = np.full(n_classes, -1e4, np.float32)  # a class never seen is never predicted
        kernel[:, model.classes] = model.kernel
        bias[model.classes] = model.bias
        weights.update(in_mean=m, in_scale=np.asarray(s, np.float32), kernel_0=kernel, bias_0=bias)
        return Head(transform, weights)
