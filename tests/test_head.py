"""The head on arrays (Keras training, numpy inference), metrics and the hybrid maths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from featurebank.classify import metrics
from featurebank.classify.head import (
    Head,
    apply_transform,
    class_weights,
    fit_head,
    transform_arrays,
)
from featurebank.classify.heads import A_GRID, hybrid, select_hybrid, split_train_val
from featurebank.core.errors import InvalidInput


def blobs(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * 2.0
    y = rng.integers(0, classes, n)
    return (centers[y] + rng.normal(size=(n, dim))).astype(np.float32), y


def random_probs(n: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(c), size=n)
    y = rng.integers(0, c, n)
    y[:c] = np.arange(c)  # every class present
    return y, p


def test_metrics_match_sklearn() -> None:
    y, p = random_probs(300, 7)
    assert metrics.accuracy(y, p) == pytest.approx(skm.accuracy_score(y, p.argmax(1)))
    assert metrics.log_loss(y, p) == pytest.approx(skm.log_loss(y, p, labels=range(7)), rel=1e-6)
    assert metrics.macro_f1(y, p) == pytest.approx(skm.f1_score(y, p.argmax(1), average="macro"))
    assert metrics.top_k_accuracy(y, p, 5) == pytest.approx(
        skm.top_k_accuracy_score(y, p, k=5, labels=range(7))
    )
    s = metrics.summary(y, p)
    assert set(s) == {"accuracy", "top5", "macro_f1", "log_loss", "ece", "n"}


def test_ece_zero_when_calibrated_and_large_when_overconfident() -> None:
    # confidence 0.75 everywhere, right 3 times in 4: perfectly calibrated
    p = np.tile([0.75, 0.25], (400, 1))
    y = np.array([0, 0, 0, 1] * 100)
    assert metrics.ece(y, p) == pytest.approx(0.0, abs=1e-9)
    over = np.tile([0.99, 0.01], (400, 1))
    assert metrics.ece(y, over) == pytest.approx(0.24, abs=1e-6)
    r = metrics.reliability(y, over, n_bins=10)
    assert sum(r["count"]) == 400


def test_transform_arrays_apply() -> None:
    x = np.array([[3.0, 4.0], [1.0, 1.0]], np.float32)
    assert np.allclose(apply_transform(transform_arrays("none"), x), x)
    unit = apply_transform(transform_arrays("l2", normalize=True), x)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0)
    mean = x.mean(axis=0)
    c = apply_transform(transform_arrays("cl2n", mean=mean, normalize=True), x)
    assert np.allclose(c, (x - mean) / np.linalg.norm(x - mean, axis=1, keepdims=True))


def test_class_weights() -> None:
    y = np.array([0, 0, 0, 1])
    w = class_weights(y, 3, "balanced")
    assert w is not None and w[0] == pytest.approx(4 / 6) and w[1] == pytest.approx(2.0)
    assert class_weights(y, 3, "none") is None
    with pytest.raises(InvalidInput):
        class_weights(y, 3, "inverse")


def test_head_trains_and_numpy_inference_matches_keras(tmp_path: Path) -> None:
    x, y = blobs(240, 12, 3)
    mean = x[:180].mean(axis=0)
    fit = fit_head(
        x[:180],
        y[:180],
        3,
        x[180:],
        y[180:],
        hidden=8,
        dropout=0.1,
        epochs=15,
        label_smoothing=0.1,
        class_weight="none",
        transform=transform_arrays("cl2n", mean=mean, normalize=True),
    )
    assert {"loss", "val_loss", "accuracy", "val_accuracy"} <= set(fit.curves)
    assert 1 <= fit.best_epoch <= fit.epochs_run <= 15
    head = fit.head
    assert (head.input_dim, head.n_classes, head.hidden) == (12, 3, 8)
    p = head.predict_proba(x[180:])
    assert np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert metrics.accuracy(y[180:], p) > 0.9

    from featurebank.classify.head import keras_head

    keras_p = np.asarray(keras_head(head)(x[180:]))
    assert np.allclose(keras_p, p, atol=1e-5)

    head.save(tmp_path / "h.npz")
    again = Head.load(tmp_path / "h.npz")
    assert np.array_equal(again.predict_proba(x[180:]), p)
    with pytest.raises(InvalidInput, match="shape"):
        head.predict_proba(x[:, :5])


def test_stacked_head_needs_its_extra_input() -> None:
    x, y = blobs(60, 6, 2, seed=1)
    extra = np.eye(2, dtype=np.float32)[y]
    fit = fit_head(x, y, 2, hidden=0, epochs=3, extra_train=extra)
    assert fit.head.n_extra == 2 and fit.head.input_dim == 6
    assert fit.head.predict_proba(x, extra).shape == (60, 2)
    with pytest.raises(InvalidInput, match="extra"):
        fit.head.predict_proba(x)


@pytest.mark.parametrize(
    "kwargs",
    [{"hidden": -1}, {"dropout": 1.0}, {"epochs": 0}, {"label_smoothing": 1.5}],
)
def test_fit_head_rejects_bad_options(kwargs: dict[str, float]) -> None:
    x, y = blobs(20, 4, 2)
    with pytest.raises(InvalidInput):
        fit_head(x, y, 2, **kwargs)  # type: ignore[arg-type]


def test_fit_head_rejects_nan() -> None:
    x, y = blobs(20, 4, 2)
    x[3, 1] = np.nan
    with pytest.raises(InvalidInput, match="NaN"):
        fit_head(x, y, 2)


def test_stratified_split_has_fixed_seed_and_keeps_singletons() -> None:
    codes = np.array([0] * 10 + [1] * 5 + [2])
    splits = ["train"] * 16
    tr, va, source = split_train_val(splits, codes, seed=0)
    assert "stratified" in source
    assert sorted(np.r_[tr, va].tolist()) == list(range(16))
    assert np.bincount(codes[va], minlength=3).tolist() == [2, 1, 0]
    tr2, va2, _ = split_train_val(splits, codes, seed=0)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    # a store val split wins
    splits2 = ["train"] * 12 + ["val"] * 3 + ["test"]
    tr3, va3, source3 = split_train_val(splits2, codes, seed=0)
    assert source3 == "val split" and va3.tolist() == [12, 13, 14] and 15 not in tr3


def test_hybrid_endpoints_and_grid_selection() -> None:
    y, p_head = random_probs(200, 4, seed=1)
    _, p_a = random_probs(200, 4, seed=2)
    _, p_b = random_probs(200, 4, seed=3)
    assert np.allclose(hybrid(p_a, p_head, 1.0), p_a)
    assert np.allclose(hybrid(p_a, p_head, 0.0), p_head)
    best, grid = select_hybrid(y, p_head, {(5, 0.1): p_a, (10, 0.1): p_b})
    assert len(grid) == 2 * len(A_GRID)
    assert best["val_log_loss"] == pytest.approx(min(g["log_loss"] for g in grid))
    chosen = p_a if best["k"] == 5 else p_b
    assert metrics.log_loss(y, hybrid(chosen, p_head, best["a"])) == pytest.approx(
        best["val_log_loss"]
    )
