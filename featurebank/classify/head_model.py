"""The trained head as numpy arrays: its feature transform, standardisation and dense layers.

Why numpy: serving needs only numpy, so a process that classifies never imports
TensorFlow, whichever way the head was trained (the linear probe, classify/linear_probe.py;
the one-hidden-layer head, classify/hidden_layer_head.py). Everything inference needs
is saved as one `.npz`; the feature transform is stored in the index's own encoding
(`index.transforms.Transform.to_arrays`), so the head keeps meaning the same thing after
the index it was trained beside is rebuilt with a newly fitted transform.

File format 2 (`format` = 2): transform_meta / transform_mean / transform_matrix,
in_mean, in_scale, kernel_<i> / bias_<i> per dense layer (relu between them), n_extra.
Format 1 (heads trained with Keras before the linear probe) stored the transform as
t_name / t_mean / t_proj / t_l2; it still loads.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurebank.core.errors import DamagedFile, FailedPrecondition, InvalidInput
from featurebank.index.transforms import Transform

FORMAT = 2
TRANSFORM_PREFIX = "transform_"
_EPS = 1e-12


@dataclass
class Head:
    """A trained head: the transform it applies first, then standardisation and dense layers.

    `weights`: in_mean / in_scale (standardisation of the transformed input),
    kernel_<i> / bias_<i> for each dense layer, and n_extra (width of the extra input a
    stacked head joins after the transformed vector).
    """

    transform: Transform
    weights: dict[str, np.ndarray]

    @property
    def n_layers(self) -> int:
        return sum(1 for k in self.weights if k.startswith("kernel_"))

    @property
    def input_dim(self) -> int:
        """Dimension of the vectors the head accepts (before its transform)."""
        return int(self.transform.in_dim)

    @property
    def n_extra(self) -> int:
        """Width of the extra input joined after the transformed vector (stacked heads)."""
        return int(self.weights.get("n_extra", np.array(0)))

    @property
    def n_classes(self) -> int:
        return int(self.weights[f"bias_{self.n_layers - 1}"].shape[0])

    @property
    def hidden(self) -> int:
        return int(self.weights["bias_0"].shape[0]) if self.n_layers > 1 else 0

    def features(self, x: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
        """The standardised input of the first dense layer."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise InvalidInput(
                f"head expects vectors of shape (n, {self.input_dim}), got {tuple(x.shape)}"
            )
        h = self.transform.apply(x)
        if self.n_extra:
            if extra is None or extra.shape != (len(x), self.n_extra):
                got = None if extra is None else tuple(extra.shape)
                raise InvalidInput(
                    f"stacked head needs extra input ({len(x)}, {self.n_extra}), got {got}"
                )
            h = np.concatenate([h, np.asarray(extra, dtype=np.float32)], axis=1)
        return np.asarray((h - self.weights["in_mean"]) / self.weights["in_scale"], np.float32)

    def logits(self, x: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
        h = self.features(x, extra)
        for i in range(self.n_layers):
            h = h @ self.weights[f"kernel_{i}"] + self.weights[f"bias_{i}"]
            if i < self.n_layers - 1:
                h = np.maximum(h, 0.0)
        return np.asarray(h, dtype=np.float32)

    def predict_proba(self, x: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
        """Class probabilities (n, n_classes), computed with numpy alone."""
        return softmax(self.logits(x, extra))

    def to_bytes(self) -> bytes:
        arrays = {
            "format": np.array(FORMAT),
            **self.transform.to_arrays(TRANSFORM_PREFIX),
            **self.weights,
        }
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> Head:
        """Read a head file of format 1 or 2; a damaged or newer file gets a one-line error."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise DamagedFile(f"head file {path} is damaged: {e}") from e
        version = int(arrays.pop("format", np.array(1)))
        if version > FORMAT:
            raise FailedPrecondition(
                f"head file {path} has format {version}; this featurebank reads formats up to "
                f"{FORMAT}: upgrade featurebank or retrain the head"
            )
        try:
            transform = (
                Transform.from_arrays(arrays, TRANSFORM_PREFIX)
                if version == FORMAT
                else _format1_transform(arrays)
            )
            weights = {k: v for k, v in arrays.items() if not _is_transform_key(k)}
            head = cls(transform, weights)
            head.n_classes  # noqa: B018 - every layer must be there
        except (KeyError, ValueError, IndexError) as e:
            raise DamagedFile(f"head file {path} is incomplete: missing {e}") from e
        return head


def _is_transform_key(key: str) -> bool:
    return key.startswith(TRANSFORM_PREFIX) or key in ("t_name", "t_mean", "t_proj", "t_l2")


def _format1_transform(a: dict[str, np.ndarray]) -> Transform:
    """The transform of a format-1 head (t_* arrays) in the index's encoding."""
    mean, matrix = a.get("t_mean"), a.get("t_proj")
    n_extra = int(a.get("n_extra", np.array(0)))
    out_dim = matrix.shape[1] if matrix is not None else int(a["kernel_0"].shape[0]) - n_extra
    in_dim = matrix.shape[0] if matrix is not None else out_dim
    return Transform(
        str(a.get("t_name", np.array("none"))), int(in_dim), int(out_dim), "t_l2" in a, mean, matrix
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=np.float32)


def standardisation(xt: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """(mean, one global scale) of transformed training vectors.

    One global scale keeps the geometry (cosine structure) while giving each dimension
    unit variance on average, so one regularisation path fits every bank.
    """
    in_mean = xt.mean(axis=0).astype(np.float32)
    spread = float(np.sqrt(((xt - in_mean) ** 2).sum(axis=1).mean() / max(xt.shape[1], 1)))
    return in_mean, np.float32(max(spread, 1e-6))


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


def item_weights(
    y: np.ndarray, n_classes: int, mode: str, sample_weight: np.ndarray | None = None
) -> np.ndarray:
    """Each training item's weight in the loss: its class weight times `sample_weight`."""
    cw = class_weights(y, n_classes, mode)
    w = np.ones(len(y), np.float64) if cw is None else np.array([cw[int(c)] for c in y])
    if sample_weight is not None:
        if np.shape(sample_weight) != (len(y),):
            raise InvalidInput(
                f"sample_weight has shape {np.shape(sample_weight)}, expected ({len(y)},)"
            )
        w = w * np.asarray(sample_weight, np.float64)
    return w


def check_training_set(x: np.ndarray, y: np.ndarray, n_classes: int) -> None:
    """Training vectors and labels that any head can be fitted on, else InvalidInput."""
    if x.ndim != 2 or len(x) != len(y):
        raise InvalidInput(f"training vectors {x.shape} and labels ({len(y)}) do not match")
    if len(x) == 0:
        raise InvalidInput("no labelled training vectors to train a head on")
    if not np.isfinite(x).all():
        raise InvalidInput("training vectors contain NaN or infinite values")
    if n_classes < 2:
        raise InvalidInput(f"a head needs at least 2 classes, got {n_classes}")


def keras_head(head: Head, name: str = "head") -> Any:
    """The head as a Keras model on untransformed vectors (fine-tuning starts from it).

    Transform and standardisation become fixed ops; the dense layers start from the
    head's weights and stay trainable.
    """
    import keras
    from keras import ops

    if head.n_extra:
        raise InvalidInput("a stacked head needs kNN input and cannot sit on a backbone alone")
    t, w = head.transform, head.weights
    inp = keras.Input(shape=(head.input_dim,), name=f"{name}_in")
    h = inp
    if t.mean is not None:
        h = h - ops.convert_to_tensor(t.mean)
    if t.matrix is not None:
        h = ops.matmul(h, ops.convert_to_tensor(t.matrix))
    if t.normalize:
        h = h / ops.maximum(ops.norm(h, axis=1, keepdims=True), _EPS)
    h = (h - ops.convert_to_tensor(w["in_mean"])) / float(w["in_scale"])
    for i in range(head.n_layers):
        last = i == head.n_layers - 1
        layer = keras.layers.Dense(
            w[f"bias_{i}"].shape[0], activation="softmax" if last else "relu", name=f"{name}_dense_{i}"
        )
        h = layer(h)
        layer.set_weights([w[f"kernel_{i}"], w[f"bias_{i}"]])
    return keras.Model(inp, h, name=name)
