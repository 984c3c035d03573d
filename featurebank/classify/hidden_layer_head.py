"""The one-hidden-layer head (`--hidden N`), trained with Keras, for banks with many labels.

Why kept beside the linear probe: with thousands of labels a hidden layer can learn
what a linear map of frozen features cannot; with a few dozen it overfits, so it is an
option, not the default. Training imports TensorFlow; the trained head is numpy arrays
(classify/head_model.py) like any other. Cross-validation chooses one epoch count for
all folds (the last epoch at the best out-of-fold accuracy), and the head trained on
every item trains that long.
"""

from __future__ import annotations

import logging
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
from featurebank.classify.linear_probe import OutOfFold
from featurebank.core.errors import InvalidInput
from featurebank.core.params import HeadParams
from featurebank.index.transforms import Transform

log = logging.getLogger(__name__)


@dataclass
class HeadFit:
    """What Keras training produced: the head, per-epoch curves and where it stopped."""

    head: Head
    curves: dict[str, list[float]] = field(default_factory=dict)
    best_epoch: int = 0
    epochs_run: int = 0
    val_probs: list[np.ndarray] = field(default_factory=list)
    """With `record_val_probs`: the validation items' probabilities after each epoch."""


def fit_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    n_classes: int,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    *,
    hidden: int = 0,
    dropout: float = 0.2,
    epochs: int = 100,
    label_smoothing: float = 0.0,
    class_weight: str = "balanced",
    l2: float = 1e-4,
    learning_rate: float = 1e-2,
    batch_size: int = 32,
    patience: int = 10,
    transform: Transform | None = None,
    extra_train: np.ndarray | None = None,
    extra_val: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
    record_val_probs: bool = False,
    stop_on_val: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> HeadFit:
    """Train a softmax (hidden=0) or one-hidden-layer head with Keras, early-stopped.

    `x_*` are vectors as stored; `transform` is applied first and saved inside the head.
    Early-stops on validation loss (restoring the best epoch) when a validation set is
    given, else on training loss. With `record_val_probs` the validation items'
    probabilities after every epoch are kept, so that cross-validation can choose one
    epoch for all folds; `stop_on_val=False` then early-stops on training loss.
    """
    x_train = np.asarray(x_train, np.float32)
    check_training_set(x_train, y_train, n_classes)
    _check_options(hidden, dropout, epochs, label_smoothing)
    transform = transform or Transform.identity(x_train.shape[1])
    weights: dict[str, np.ndarray] = {}
    xt = transform.apply(x_train)
    if extra_train is not None:
        xt = np.concatenate([xt, np.asarray(extra_train, np.float32)], axis=1)
        weights["n_extra"] = np.array(extra_train.shape[1])
    in_mean, in_scale = standardisation(xt)
    zt = (xt - in_mean) / in_scale
    has_val = x_val is not None and y_val is not None and len(y_val) > 0
    zv = None
    if has_val:
        assert x_val is not None
        xv = transform.apply(np.asarray(x_val, np.float32))
        if extra_train is not None:
            if extra_val is None:
                raise InvalidInput("extra_val is required with extra_train and a validation set")
            xv = np.concatenate([xv, np.asarray(extra_val, np.float32)], axis=1)
        zv = (xv - in_mean) / in_scale

    import keras  # heavy: only when training this head
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    inp = keras.Input(shape=(zt.shape[1],), name="features")
    h = inp
    reg = keras.regularizers.L2(l2) if l2 > 0 else None
    if hidden > 0:
        h = keras.layers.Dense(hidden, activation="relu", kernel_regularizer=reg, name="hidden")(h)
    if dropout > 0:
        h = keras.layers.Dropout(dropout, seed=seed)(h)
    out = keras.layers.Dense(n_classes, activation="softmax", kernel_regularizer=reg, name="out")(h)
    model = keras.Model(inp, out)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=["accuracy"],
        steps_per_execution=16,
    )
    # tf.data + steps_per_execution: per-epoch overhead of fitting numpy arrays dominates
    # on small banks (10x slower), so feed cached datasets with sample weights instead.
    yt = np.eye(n_classes, dtype=np.float32)[y_train]
    sw = item_weights(y_train, n_classes, class_weight, sample_weight).astype(np.float32)
    bs = min(batch_size, len(zt))
    train_ds = (
        tf.data.Dataset.from_tensor_slices((zt, yt, sw))
        .cache()
        .shuffle(len(zt), seed=seed, reshuffle_each_iteration=True)
        .batch(bs)
    )
    val_ds = None
    if has_val:
        assert y_val is not None and zv is not None
        yv = np.eye(n_classes, dtype=np.float32)[y_val]
        val_ds = tf.data.Dataset.from_tensor_slices((zv, yv)).batch(4096).cache()
    monitor = "val_loss" if has_val and stop_on_val else "loss"
    stopper = keras.callbacks.EarlyStopping(
        monitor=monitor, patience=patience, restore_best_weights=True
    )
    val_probs: list[np.ndarray] = []
    callbacks: list[Any] = [stopper]
    if record_val_probs and zv is not None:
        zv_const = zv

        class RecordVal(keras.callbacks.Callback):  # type: ignore[misc]
            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                val_probs.append(np.asarray(self.model(zv_const, training=False), np.float32))

        callbacks.insert(0, RecordVal())
    hist = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        callbacks=callbacks,
        verbose=1 if progress else 0,
        shuffle=False,  # the dataset reshuffles itself each epoch
    )
    curves = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    mon = curves.get(monitor, [])
    best = int(np.argmin(mon)) + 1 if mon else 0
    weights["in_mean"] = in_mean
    weights["in_scale"] = np.asarray(in_scale, dtype=np.float32)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    for i, layer in enumerate(dense):
        kernel, bias = layer.get_weights()
        weights[f"kernel_{i}"] = np.asarray(kernel, dtype=np.float32)
        weights[f"bias_{i}"] = np.asarray(bias, dtype=np.float32)
    log.info(
        "head trained: %d items, %d classes, hidden=%d, %d epochs (best %d)",
        len(zt), n_classes, hidden, len(mon), best,
    )
    return HeadFit(Head(transform, weights), curves, best, len(mon), val_probs)


def _check_options(hidden: int, dropout: float, epochs: int, label_smoothing: float) -> None:
    if hidden < 0:
        raise InvalidInput(f"hidden must be >= 0, got {hidden}")
    if not 0.0 <= dropout < 1.0:
        raise InvalidInput(f"dropout must be in [0, 1), got {dropout}")
    if epochs < 1:
        raise InvalidInput(f"epochs must be >= 1, got {epochs}")
    if not 0.0 <= label_smoothing < 1.0:
        raise InvalidInput(f"label_smoothing must be in [0, 1), got {label_smoothing}")


class HiddenLayerHead:
    """Fits the Keras head; `out_of_fold` chooses the epochs, `fit` trains that long."""

    def __init__(self, transform: Transform, params: HeadParams, progress: bool = False) -> None:
        self.fit_kw: dict[str, Any] = dict(
            hidden=params.hidden,
            dropout=params.dropout,
            epochs=params.epochs,
            label_smoothing=params.label_smoothing,
            class_weight=params.class_weight,
            learning_rate=params.learning_rate,
            transform=transform,
            seed=params.seed,
            progress=progress,
        )

    def out_of_fold(
        self,
        x: np.ndarray,
        y: np.ndarray,
        n_classes: int,
        folds: np.ndarray,
        fold_weights: dict[int, np.ndarray | None],
    ) -> OutOfFold:
        """Out-of-fold probabilities at one epoch chosen for all folds.

        Why one epoch for all folds: a fold's own early-stopping epoch is chosen on the
        very items it then predicts, which flatters the head; the last epoch with the best
        accuracy over all folds is one choice scored on every item.
        """
        per_fold: list[tuple[np.ndarray, list[np.ndarray]]] = []
        fold_best: list[int] = []
        curves: dict[str, list[float]] = {}
        for f in np.unique(folds).tolist():
            held, train = folds == f, folds != f
            if not train.any():
                continue
            # trained as the published head will be (stopping on training loss), so the
            # held-out fold's probabilities after each epoch show what each epoch count gives
            fit = fit_head(
                x[train], y[train], n_classes, x[held], y[held], sample_weight=fold_weights.get(f),
                record_val_probs=True, stop_on_val=False, **self.fit_kw,
            )
            per_fold.append((np.flatnonzero(held), fit.val_probs))
            fold_best.append(max(1, fit.best_epoch))
            curves = curves or fit.curves
        p = np.zeros((len(y), n_classes), np.float32)
        scorable = np.bincount(y, minlength=n_classes)[y] >= 2
        epoch = int(self.fit_kw["epochs"])
        if per_fold and scorable.any():
            longest = max(len(probs) for _, probs in per_fold)
            accuracy = []
            for e in range(1, longest + 1):
                for rows, probs in per_fold:
                    p[rows] = probs[min(e, len(probs)) - 1]  # a fold that stopped keeps its last
                accuracy.append(metrics.accuracy(y[scorable], p[scorable]))
            epoch = int(np.flatnonzero(np.asarray(accuracy) >= max(accuracy) - 1e-12)[-1]) + 1
        for rows, probs in per_fold:
            p[rows] = probs[min(epoch, len(probs)) - 1]
        self.fit_kw["epochs"] = max(1, epoch)
        return OutOfFold(p, {"epochs": max(1, epoch), "fold_epochs": fold_best}, curves)

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        n_classes: int,
        sample_weight: np.ndarray | None = None,
        extra: np.ndarray | None = None,
    ) -> Head:
        """The head on every item, trained for the chosen epochs."""
        return fit_head(x, y, n_classes, sample_weight=sample_weight, extra_train=extra,
                        **self.fit_kw).head
