"""Multinomial logistic regression with an L2 penalty, solved by L-BFGS in numpy alone.

Why not scikit-learn's LogisticRegression: importing scikit-learn takes 1.5 s (scipy.stats,
pandas) and each of its fits spends more time checking its input than solving; `head train`
fits a hundred models along a cross-validation path. This is the same convex problem
scikit-learn solves (its objective, its optimum: `sum_i w_i * loss_i + |W|^2 / (2 C)`,
intercepts not penalised; two classes as its binary logistic model), warm-started from
the previous optimum, deterministic, in a few milliseconds a fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MEMORY = 10  # L-BFGS correction pairs
ARMIJO = 1e-4  # sufficient decrease of a line-search step


@dataclass
class Fit:
    """Weights over the classes present in training (`classes`), and the iterations spent."""

    classes: np.ndarray
    kernel: np.ndarray  # (d, len(classes))
    bias: np.ndarray  # (len(classes),)
    iterations: int

    def logits(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z @ self.kernel + self.bias)

    def proba(self, z: np.ndarray, n_classes: int) -> np.ndarray:
        """Probabilities over all n_classes (a class absent from training gets 0)."""
        s = self.logits(np.asarray(z, np.float64))
        s -= s.max(axis=1, keepdims=True)
        e = np.exp(s)
        out = np.zeros((len(z), n_classes), np.float32)
        out[:, self.classes] = e / e.sum(axis=1, keepdims=True)
        return out


def _objective(z: np.ndarray, codes: np.ndarray, k: int, w: np.ndarray, l2: float):  # type: ignore[no-untyped-def]
    """f(theta) -> (value, gradient) of the weighted mean loss plus l2 / 2 * |W|^2.

    Logits are kept as (classes, items): the reductions over classes are then k-1
    vector operations instead of a slow reduction over a short last axis."""
    d = z.shape[1]
    dk = d * k
    zt = np.ascontiguousarray(z.T)
    wn = w / w.sum()
    cols = np.arange(len(codes))

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        kernel = theta[:dk].reshape(d, k)
        s = kernel.T.astype(zt.dtype) @ zt  # (k, n), in the data's precision
        s += theta[dk:, None].astype(zt.dtype)
        s -= s.max(axis=0)
        true = s[codes, cols]
        np.exp(s, out=s)
        total = s.sum(axis=0)
        value = float(wn @ (np.log(total) - true)) + 0.5 * l2 * float(theta[:dk] @ theta[:dk])
        s *= (wn / total).astype(zt.dtype)
        s[codes, cols] -= wn.astype(zt.dtype)
        grad = np.empty_like(theta)
        grad[:dk] = (zt @ s.T).ravel()
        grad[:dk] += l2 * theta[:dk]
        grad[dk:] = s.sum(axis=1)
        return value, grad

    return f


def lbfgs(f, x: np.ndarray, tol: float, max_iter: int) -> tuple[np.ndarray, int]:  # type: ignore[no-untyped-def]
    """Minimise a smooth convex f from x until the largest gradient entry is <= tol."""
    fx, g = f(x)
    pairs: list[tuple[np.ndarray, np.ndarray, float]] = []
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - the count is returned
        if np.abs(g).max() <= tol:
            return x, it - 1
        q = -g
        alphas = []
        for s, y, rho in reversed(pairs):
            a = rho * float(s @ q)
            q = q - a * y
            alphas.append(a)
        if pairs:
            s, y, _ = pairs[-1]
            q = q * (float(s @ y) / float(y @ y))
        else:
            q = q / max(float(np.linalg.norm(g)), 1.0)
        for (s, y, rho), a in zip(pairs, reversed(alphas), strict=True):
            q = q + s * (a - rho * float(y @ q))
        slope = float(g @ q)
        if slope >= 0:  # not a descent direction: restart from the gradient
            pairs.clear()
            q = -g / max(float(np.linalg.norm(g)), 1.0)
            slope = float(g @ q)
        t = 1.0
        while True:
            xn = x + t * q
            fn, gn = f(xn)
            if fn <= fx + ARMIJO * t * slope:
                break
            # the minimum of the quadratic through f(x), its slope and f(x + t q)
            t = max(0.1 * t, min(0.5 * t, -slope * t * t / (2.0 * (fn - fx - slope * t))))
            if t < 1e-12:
                return x, it
        s, y = xn - x, gn - g
        sy = float(s @ y)
        if sy > 1e-12 * float(y @ y):
            pairs.append((s, y, 1.0 / sy))
            del pairs[:-MEMORY]
        if fx - fn <= 1e-15 * max(abs(fx), 1.0):
            return xn, it
        x, fx, g = xn, fn, gn
    return x, it


def fit(
    z: np.ndarray,
    y: np.ndarray,
    c: float,
    sample_weight: np.ndarray | None = None,
    init: Fit | None = None,
    tol: float = 1e-4,
    max_iter: int = 300,
    dtype: type = np.float64,
) -> Fit:
    """Multinomial logistic regression on z (n, d) at inverse L2 strength c.

    `dtype`: the precision of the products with z (float32 halves their cost and is
    plenty at scikit-learn's tolerance); the weights and the search stay in float64.

    `init`: a fit on the same classes to start from (a warm start along a path of c); a
    fit on fewer columns starts the columns it lacks at 0.
    """
    z = np.asarray(z, dtype)
    classes = np.unique(y)
    k = len(classes)
    codes = np.searchsorted(classes, y)
    w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    # two classes: scikit-learn's binary model (one weight vector at c) is the softmax pair at c / 2
    l2 = 1.0 / ((c / 2.0 if k == 2 else c) * w.sum())
    d = z.shape[1]
    if init is not None and np.array_equal(init.classes, classes) and len(init.kernel) <= d:
        kernel = np.zeros((d, k))
        kernel[: len(init.kernel)] = init.kernel
        x0 = np.concatenate([kernel.ravel(), init.bias])
    else:
        x0 = np.zeros(d * k + k)
    theta, n_iter = lbfgs(_objective(z, codes, k, w, l2), x0, tol, max_iter)
    return Fit(classes, theta[: d * k].reshape(d, k).copy(), theta[d * k :].copy(), n_iter)
