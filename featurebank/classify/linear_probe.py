"""The default head: multinomial logistic regression on the stored vectors, solved exactly.

Why: a linear probe on frozen features is the strong, convex baseline (what a user gets
from `LogisticRegression().fit(X, y)`); solved to its optimum by L-BFGS it needs no
epochs, no learning rate and no TensorFlow, and it trains in well under a second.

What cross-validation chooses (stratified folds over every labelled item, the folds of
classify/cross_validation.py), by the lowest out-of-fold log-loss: the L2 strength, over
a path of `C_PATH` values fitted from strong to weak regularisation, each fit
warm-started from the previous one; the input, the index's fitted transform or the vectors as stored (`INPUTS`), either
centred on the training items and scaled to unit variance on average (unscaled vectors
are ill-conditioned: L-BFGS then needs many times the iterations); and, when denoising
weights are given, whether to use them (on clean labels they cost a little, on noisy
ones they gain a lot). With no item that can be scored out of fold (a single label per
class) it keeps `DEFAULT_C` on the vectors as stored, unweighted: scikit-learn's default
model, on standardised vectors. The out-of-fold probabilities at the choice are what the hybrid weight, its
guard and abstention are calibrated on.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featurebank.classify import metrics
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


@dataclass
class OutOfFold:
    """Out-of-fold probabilities at the chosen settings, what was chosen, and the path."""

    p: np.ndarray
    chosen: dict[str, Any]
    curves: dict[str, list[float]] = field(default_factory=dict)


def _solver(c: float, seed: int, tol: float = TOL, max_iter: int = MAX_ITER) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=max_iter, tol=tol, warm_start=True, random_state=seed)


def _one_thread() -> Any:
    """One BLAS thread, set once per training (setting it costs ~20 ms): these are small
    problems, and BLAS threads competing for shared cores make a 50 ms fit take seconds."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def _fit(model: Any, z: np.ndarray, y: np.ndarray, w: np.ndarray) -> Any:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(z, y, sample_weight=w)


def _proba(model: Any, z: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over all n_classes (a class absent from the fold's training gets 0)."""
    out = np.zeros((len(z), n_classes), np.float32)
    out[:, model.classes_] = model.predict_proba(z)
    return out


def _dense(model: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(kernel (d, n_classes), bias (n_classes,)) of a fitted model, as softmax logits."""
    coef, bias = np.asarray(model.coef_), np.asarray(model.intercept_)
    if coef.shape[0] == 1:  # binary: logits (0, w.x + b) give the same probabilities
        coef, bias = np.vstack([np.zeros_like(coef), coef]), np.r_[0.0, bias]
    kernel = np.zeros((coef.shape[1], n_classes), np.float32)
    full_bias = np.full(n_classes, -1e4, np.float32)  # a class never seen is never predicted
    kernel[:, model.classes_] = coef.T
    full_bias[model.classes_] = bias
    return kernel, full_bias


class LinearProbe:
    """Fits the linear-probe head; `out_of_fold` chooses C and the input, `fit` uses them."""

    def __init__(self, transform: Transform, class_weight: str = "balanced", seed: int = 0) -> None:
        self.inputs = {INPUTS[0]: transform, INPUTS[1]: Transform.identity(transform.in_dim)}
        if transform.spec == "none" and not transform.normalize:
            del self.inputs[INPUTS[0]]  # the same input twice
        self.class_weight = class_weight
        self.seed = seed
        self.c = DEFAULT_C
        self.input = INPUTS[1]
        self.weighted = False

    def _scaled(self, name: str, xt: np.ndarray) -> tuple[np.ndarray, np.float32]:
        """Standardisation of an input (one path of C fits every input once scaled)."""
        return standardisation(xt)

    def out_of_fold(
        self,
        x: np.ndarray,
        y: np.ndarray,
        n_classes: int,
        folds: np.ndarray,
        fold_weights: dict[int, np.ndarray | None],
    ) -> OutOfFold:
        """Every (input, C) scored out of fold; keeps the lowest log-loss on scorable items."""
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
        weightings = {"plain": False}
        if any(w is not None for w in fold_weights.values()):
            weightings["denoised"] = True
        path: dict[tuple[str, str], np.ndarray] = {}
        curves: dict[str, list[float]] = {}
        for name, transform in self.inputs.items():
            xt = transform.apply(np.asarray(x, np.float32))
            for wname, weighted in weightings.items():
                p = self._path(xt, name, y, n_classes, folds, fold_weights if weighted else {})
                path[(name, wname)] = p
                curves[f"log_loss {name}, {wname}"] = [
                    metrics.log_loss(y[scorable], pj[scorable]) if scorable.any() else float("nan")
                    for pj in p
                ]
        key, j = (INPUTS[1], "plain"), C_PATH.index(DEFAULT_C)
        if scorable.any():  # else nothing to choose on: scikit-learn's default model
            _, key, j = min(
                (ll, k, jj) for k in path for jj, ll in enumerate(curves[f"log_loss {k[0]}, {k[1]}"])
            )
        self.input, self.weighted, self.c = key[0], weightings[key[1]], C_PATH[j]
        log.info("linear probe: C=%g on the %s vectors, %s (out-of-fold log-loss)",
                 self.c, self.input, key[1])
        chosen = {"C": self.c, "input": self.input, "weights": key[1], "c_path": list(C_PATH)}
        return OutOfFold(path[key][j], chosen, curves)

    def _path(
        self,
        xt: np.ndarray,
        name: str,
        y: np.ndarray,
        n_classes: int,
        folds: np.ndarray,
        fold_weights: dict[int, np.ndarray | None],
    ) -> np.ndarray:
        """Out-of-fold probabilities (len(C_PATH), n, n_classes) along the path."""
        p = np.zeros((len(C_PATH), len(y), n_classes), np.float32)
        for f in np.unique(folds).tolist():
            held, train = folds == f, folds != f
            if not train.any():
                continue
            m, s = self._scaled(name, xt[train])
            zt, zh = (xt[train] - m) / s, (xt[held] - m) / s
            w = item_weights(y[train], n_classes, self.class_weight, fold_weights.get(f))
            if len(np.unique(y[train])) < 2:  # one class: it is all the fold can say
                p[:, held, int(y[train][0])] = 1.0
                continue
            model = _solver(C_PATH[0], self.seed, PATH_TOL, PATH_MAX_ITER)
            for j, c in enumerate(C_PATH):  # strong to weak, each from the last optimum
                model.set_params(C=c)
                p[j, held] = _proba(_fit(model, zt, y[train], w), zh, n_classes)
        return p

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        n_classes: int,
        sample_weight: np.ndarray | None = None,
        extra: np.ndarray | None = None,
    ) -> Head:
        """The head on every item at the chosen C, input and weighting (`sample_weight`, the
        denoising weights, counts only when cross-validation chose them; `extra`: the
        input a stacked head joins to the vectors)."""
        x = np.asarray(x, np.float32)
        check_training_set(x, y, n_classes)
        transform = self.inputs[self.input]
        xt = transform.apply(x)
        weights: dict[str, np.ndarray] = {}
        if extra is not None:
            xt = np.concatenate([xt, np.asarray(extra, np.float32)], axis=1)
            weights["n_extra"] = np.array(extra.shape[1])
        m, s = self._scaled(self.input, xt)
        w = item_weights(y, n_classes, self.class_weight, sample_weight)  # checks its shape
        if not self.weighted:
            w = item_weights(y, n_classes, self.class_weight)
        if len(np.unique(y)) < 2:
            raise ValueError("a linear probe needs items of two classes")  # checked upstream
        with _one_thread():
            model = _fit(_solver(self.c, self.seed), (xt - m) / s, y, w)
        kernel, bias = _dense(model, n_classes)
        weights.update(in_mean=m, in_scale=np.asarray(s, np.float32), kernel_0=kernel, bias_0=bias)
        return Head(transform, weights)
