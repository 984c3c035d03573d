"""A small classification head trained on stored feature vectors.

Training uses Keras (seconds: no backbone pass, just a softmax regression or one
hidden layer on the vectors); serving needs only numpy, so a process that
classifies never imports TensorFlow. Everything inference needs - the feature
transform the head expects, its input standardisation and its dense layers -
lives in one flat dict of arrays saved as a single `.npz`.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurebank.core.errors import InvalidInput
from featurebank.index.transforms import l2_normalize

log = logging.getLogger(__name__)

_EPS = 1e-12


# --------------------------------------------------------------------------- transforms


def transform_arrays(
    spec: str = "none",
    mean: np.ndarray | None = None,
    matrix: np.ndarray | None = None,
    normalize: bool = False,
) -> dict[str, np.ndarray]:
    """Pack a fitted feature transform (subtract mean, project, L2-normalise) as head arrays.

    Why the head carries its own copy: it must keep meaning the same thing after the
    index it was trained beside is rebuilt with a newly fitted transform.
    """
    params: dict[str, np.ndarray] = {"t_name": np.array(spec)}
    if mean is not None:
        params["t_mean"] = np.asarray(mean, dtype=np.float32)
    if matrix is not None:
        params["t_proj"] = np.asarray(matrix, dtype=np.float32)
    if normalize:
        params["t_l2"] = np.array(1)
    return params


def apply_transform(params: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Apply parameters from `transform_arrays` (numpy only)."""
    out = np.asarray(x, dtype=np.float32)
    if "t_mean" in params:
        out = out - params["t_mean"]
    if "t_proj" in params:
        out = out @ params["t_proj"]
    if "t_l2" in params:
        out = l2_normalize(out)
    return np.asarray(out, dtype=np.float32)


# --------------------------------------------------------------------------- the head


@dataclass
class Head:
    """A trained head: transform, standardisation and dense layers, all numpy arrays.

    Arrays: t_* (transform), in_mean / in_scale (standardisation of the transformed
    input), kernel_<i> / bias_<i> for each dense layer (relu between them).
    """

    arrays: dict[str, np.ndarray]

    @property
    def n_layers(self) -> int:
        return sum(1 for k in self.arrays if k.startswith("kernel_"))

    @property
    def input_dim(self) -> int:
        """Dimension of the vectors the head accepts (before its transform)."""
        if "t_proj" in self.arrays:
            return int(self.arrays["t_proj"].shape[0])
        if "t_mean" in self.arrays:
            return int(self.arrays["t_mean"].shape[0])
        return int(self.arrays["kernel_0"].shape[0]) - self.n_extra

    @property
    def n_extra(self) -> int:
        """Width of the extra input joined after the transformed vector (stacked heads)."""
        return int(self.arrays.get("n_extra", np.array(0)))

    @property
    def n_classes(self) -> int:
        return int(self.arrays[f"bias_{self.n_layers - 1}"].shape[0])

    @property
    def hidden(self) -> int:
        return int(self.arrays["bias_0"].shape[0]) if self.n_layers > 1 else 0

    def transform(self, x: np.ndarray) -> np.ndarray:
        return apply_transform(self.arrays, x)

    def logits(self, x: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise InvalidInput(
                f"head expects vectors of shape (n, {self.input_dim}), got {tuple(x.shape)}"
            )
        h = self.transform(x)
        if self.n_extra:
            if extra is None or extra.shape != (len(x), self.n_extra):
                got = None if extra is None else tuple(extra.shape)
                raise InvalidInput(
                    f"stacked head needs extra input ({len(x)}, {self.n_extra}), got {got}"
                )
            h = np.concatenate([h, np.asarray(extra, dtype=np.float32)], axis=1)
        h = (h - self.arrays["in_mean"]) / self.arrays["in_scale"]
        for i in range(self.n_layers):
            h = h @ self.arrays[f"kernel_{i}"] + self.arrays[f"bias_{i}"]
            if i < self.n_layers - 1:
                h = np.maximum(h, 0.0)
        return np.asarray(h, dtype=np.float32)

    def predict_proba(self, x: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
        """Class probabilities (n, n_classes), computed with numpy alone."""
        return softmax(self.logits(x, extra))

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **self.arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> Head:
        with np.load(Path(path), allow_pickle=False) as z:
            return cls({k: z[k] for k in z.files})


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=np.float32)


@dataclass
class HeadFit:
    """What training produced: the head, per-epoch curves and where it stopped."""

    head: Head
    curves: dict[str, list[float]] = field(default_factory=dict)
    best_epoch: int = 0
    epochs_run: int = 0
    val_probs: list[np.ndarray] = field(default_factory=list)
    """With `record_val_probs`: the validation items' probabilities after each epoch."""


def class_weights(y: np.ndarray, n_classes: int, mode: str) -> dict[int, float] | None:
    """'balanced' gives each present class the same total weight (sklearn's formula)."""
    if mode == "none":
        return None
    if mode != "balanced":
        raise InvalidInput(f"class_weight must be 'balanced' or 'none', got {mode!r}")
    counts = np.bincount(y, minlength=n_classes)
    present = counts > 0
    w = np.ones(n_classes)
    w[present] = len(y) / (present.sum() * counts[present])
    return {i: float(w[i]) for i in range(n_classes)}


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
    transform: Mapping[str, np.ndarray] | None = None,
    extra_train: np.ndarray | None = None,
    extra_val: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
    record_val_probs: bool = False,
    stop_on_val: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> HeadFit:
    """Train a softmax-regression (hidden=0) or one-hidden-layer head with Keras.

    `x_*` are vectors as stored; `transform` (from `transform_arrays`) is applied first
    and saved inside the head. Early-stops on validation loss (restoring the best
    epoch) when a validation set is given, else on training loss. `sample_weight`
    scales each training item's loss (on top of the class weights). With
    `record_val_probs` the validation items' probabilities after every epoch are kept,
    so that cross-validation can choose one epoch for all folds; `stop_on_val=False`
    then early-stops on training loss, as a head trained without validation items does.
    """
    _check_fit_args(x_train, y_train, n_classes, hidden, dropout, epochs, label_smoothing)
    tparams: dict[str, np.ndarray] = dict(transform or {"t_name": np.array("none")})
    xt = apply_transform(tparams, x_train)
    if extra_train is not None:
        xt = np.concatenate([xt, np.asarray(extra_train, np.float32)], axis=1)
        tparams["n_extra"] = np.array(extra_train.shape[1])
    in_mean = xt.mean(axis=0).astype(np.float32)
    # one global scale keeps the geometry (cosine structure) while fixing the step size
    in_scale = np.float32(max(float(np.sqrt(((xt - in_mean) ** 2).sum(axis=1).mean())), 1e-6))
    in_scale = np.float32(in_scale / np.sqrt(xt.shape[1]))
    zt = (xt - in_mean) / in_scale
    has_val = x_val is not None and y_val is not None and len(y_val) > 0
    zv = None
    if has_val:
        assert x_val is not None
        xv = apply_transform(tparams, x_val)
        if extra_train is not None:
            if extra_val is None:
                raise InvalidInput("extra_val is required with extra_train and a validation set")
            xv = np.concatenate([xv, np.asarray(extra_val, np.float32)], axis=1)
        zv = (xv - in_mean) / in_scale

    import keras  # heavy: only when training

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
    import tensorflow as tf

    # tf.data + steps_per_execution: per-epoch overhead of fitting numpy arrays dominates
    # on small banks (10x slower), so feed cached datasets with sample weights instead.
    yt = np.eye(n_classes, dtype=np.float32)[y_train]
    cw = class_weights(y_train, n_classes, class_weight)
    sw = np.ones(len(yt), np.float32) if cw is None else np.array([cw[int(c)] for c in y_train])
    if sample_weight is not None:
        if np.shape(sample_weight) != (len(yt),):
            raise InvalidInput(
                f"sample_weight has shape {np.shape(sample_weight)}, expected ({len(yt)},)"
            )
        sw = sw * np.asarray(sample_weight, np.float32)
    bs = min(batch_size, len(zt))
    train_ds = (
        tf.data.Dataset.from_tensor_slices((zt, yt, sw.astype(np.float32)))
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
    arrays = dict(tparams)
    arrays["in_mean"] = in_mean
    arrays["in_scale"] = np.asarray(in_scale, dtype=np.float32)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    for i, layer in enumerate(dense):
        kernel, bias = layer.get_weights()
        arrays[f"kernel_{i}"] = np.asarray(kernel, dtype=np.float32)
        arrays[f"bias_{i}"] = np.asarray(bias, dtype=np.float32)
    log.info(
        "head trained: %d items, %d classes, hidden=%d, %d epochs (best %d)",
        len(zt),
        n_classes,
        hidden,
        len(mon),
        best,
    )
    return HeadFit(Head(arrays), curves, best_epoch=best, epochs_run=len(mon), val_probs=val_probs)


def _check_fit_args(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    hidden: int,
    dropout: float,
    epochs: int,
    label_smoothing: float,
) -> None:
    if x.ndim != 2 or len(x) != len(y):
        raise InvalidInput(f"training vectors {x.shape} and labels ({len(y)}) do not match")
    if len(x) == 0:
        raise InvalidInput("no labelled training vectors to train a head on")
    if not np.isfinite(x).all():
        raise InvalidInput("training vectors contain NaN or infinite values")
    if n_classes < 2:
        raise InvalidInput(f"a head needs at least 2 classes, got {n_classes}")
    if hidden < 0:
        raise InvalidInput(f"hidden must be >= 0, got {hidden}")
    if not 0.0 <= dropout < 1.0:
        raise InvalidInput(f"dropout must be in [0, 1), got {dropout}")
    if epochs < 1:
        raise InvalidInput(f"epochs must be >= 1, got {epochs}")
    if not 0.0 <= label_smoothing < 1.0:
        raise InvalidInput(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def keras_head(head: Head, name: str = "head") -> Any:
    """The head as a Keras model on untransformed vectors (for fine-tuning the backbone).

    Transform and standardisation become fixed ops, the dense layers trainable.
    """
    import keras
    from keras import ops

    if head.n_extra:
        raise InvalidInput("a stacked head needs kNN input and cannot sit on a backbone alone")
    a = head.arrays
    inp = keras.Input(shape=(head.input_dim,), name=f"{name}_in")
    h = inp
    if "t_mean" in a:
        h = h - ops.convert_to_tensor(a["t_mean"])
    if "t_proj" in a:
        h = ops.matmul(h, ops.convert_to_tensor(a["t_proj"]))
    if "t_l2" in a:
        h = h / ops.maximum(ops.norm(h, axis=1, keepdims=True), _EPS)
    h = (h - ops.convert_to_tensor(a["in_mean"])) / float(a["in_scale"])
    for i in range(head.n_layers):
        last = i == head.n_layers - 1
        layer = keras.layers.Dense(
            a[f"bias_{i}"].shape[0],
            activation="softmax" if last else "relu",
            name=f"{name}_dense_{i}",
        )
        h = layer(h)
        layer.set_weights([a[f"kernel_{i}"], a[f"bias_{i}"]])
    return keras.Model(inp, h, name=name)
