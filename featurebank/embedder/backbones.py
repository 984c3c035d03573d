"""Registry of frozen feature extractors: `keras.applications` families and user models.

A bank's vectors only mean something together with the exact model that made them,
so everything needed to rebuild that model (family, weights identity, input size,
preprocessing, pooling, feature layer) is described here and recorded in the spec.
TensorFlow/Keras are imported inside the functions that build models, so importing
this module stays cheap. Over 400 lines because the family table, the preprocessing
table and the user-model loader describe one thing: how a spec becomes a model.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurebank.core.bank_models import sha256_file
from featurebank.core.errors import FailedPrecondition, InvalidInput, NotFound
from featurebank.core.vocabulary import PREPROCESSINGS

log = logging.getLogger(__name__)

# Seed of the random initialisation used by weights="none": fixed, so that a bank made
# with random weights can be re-embedded into (and served) by a rebuilt model.
RANDOM_INIT_SEED = 1337
CALIBRATION_BATCH = 8
VARIANCE_FLOOR = 0.1  # relative to the layer's median variance



@dataclass(frozen=True)
class Family:
    """One `keras.applications` constructor and what its inputs must look like."""

    name: str
    default_size: int
    preprocessing: str  # one of PREPROCESSINGS
    dim: int
    min_size: int = 32
    large: bool = False  # slow to build/run: tests of it are marked slow
    kwargs: tuple[tuple[str, Any], ...] = ()


def _families() -> dict[str, Family]:
    fams = [
        Family("MobileNet", 224, "tf", 1024),
        Family("MobileNetV2", 224, "tf", 1280),
        Family("MobileNetV3Small", 224, "raw0-255", 576, kwargs=(("include_preprocessing", True),)),
        Family("MobileNetV3Large", 224, "raw0-255", 960, kwargs=(("include_preprocessing", True),)),
        Family("ResNet50", 224, "caffe", 2048),
        Family("ResNet101", 224, "caffe", 2048, large=True),
        Family("ResNet152", 224, "caffe", 2048, large=True),
        Family("ResNet50V2", 224, "tf", 2048),
        Family("ResNet101V2", 224, "tf", 2048, large=True),
        Family("ResNet152V2", 224, "tf", 2048, large=True),
        Family("DenseNet121", 224, "torch", 1024),
        Family("DenseNet169", 224, "torch", 1664, large=True),
        Family("DenseNet201", 224, "torch", 1920, large=True),
        Family("Xception", 299, "tf", 2048, min_size=71),
        Family("InceptionV3", 299, "tf", 2048, min_size=75),
        Family("InceptionResNetV2", 299, "tf", 1536, min_size=75, large=True),
        Family("NASNetMobile", 224, "tf", 1056),
        Family("NASNetLarge", 331, "tf", 4032, large=True),
        Family("VGG16", 224, "caffe", 512),
        Family("VGG19", 224, "caffe", 512, large=True),
    ]
    eff = [(0, 224, 1280), (1, 240, 1280), (2, 260, 1408), (3, 300, 1536),
           (4, 380, 1792), (5, 456, 2048), (6, 528, 2304), (7, 600, 2560)]  # fmt: skip
    fams += [Family(f"EfficientNetB{i}", s, "raw0-255", d, large=i > 0) for i, s, d in eff]
    eff2 = [("B0", 224, 1280), ("B1", 240, 1280), ("B2", 260, 1408), ("B3", 300, 1536),
            ("S", 384, 1280), ("M", 480, 1280), ("L", 480, 1280)]  # fmt: skip
    fams += [
        Family(
            f"EfficientNetV2{v}",
            s,
            "raw0-255",
            d,
            large=v != "B0",
            kwargs=(("include_preprocessing", True),),
        )  # fmt: skip
        for v, s, d in eff2
    ]
    convnext = [("Tiny", 768), ("Small", 768), ("Base", 1024), ("Large", 1536), ("XLarge", 2048)]
    fams += [
        Family(
            f"ConvNeXt{v}",
            224,
            "raw0-255",
            d,
            large=v != "Tiny",
            kwargs=(("include_preprocessing", True),),
        )  # fmt: skip
        for v, d in convnext
    ]
    return {f.name: f for f in fams}


FAMILIES: dict[str, Family] = _families()


def family(name: str) -> Family:
    """Look a family up by name, forgiving case (`mobilenetv2` works)."""
    if name in FAMILIES:
        return FAMILIES[name]
    folded = {k.lower(): v for k, v in FAMILIES.items()}
    key = name.lower().replace("_", "").replace("-", "")
    if key in folded:
        return folded[key]
    raise NotFound(f"unknown backbone {name!r}; known: {', '.join(sorted(FAMILIES))}")


def is_model_file(backbone: str) -> bool:
    """A backbone given as a path to the user's own saved Keras model."""
    return backbone.endswith((".keras", ".h5")) or Path(backbone).is_file()


def weights_identity(weights: str) -> tuple[str, str | None]:
    """Map a --weights value to (identity recorded in the spec, absolute file path or None)."""
    if weights in ("imagenet", "none"):
        return weights, None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise InvalidInput(f"--weights {weights!r}: expected imagenet, none, or an existing file")
    return f"sha256:{sha256_file(path)}", str(path.resolve())


def check_weights_file(identity: str, path: str | None) -> str:
    """The file a spec's weights point to, after checking it still has the recorded content."""
    if path is None or not Path(path).is_file():
        raise FailedPrecondition(
            f"model file {path} recorded in the bank's spec is missing and the bank keeps no "
            f"copy of {identity} in its models/ folder; point it to a file with that content: "
            "featurebank store relink --bank BANK --model FILE"
        )
    digest = sha256_file(path)
    if f"sha256:{digest}" != identity:
        raise FailedPrecondition(
            f"weights file {path} changed since the bank was made "
            f"(spec has {identity}, file is sha256:{digest})"
        )
    return path


# ---------------------------------------------------------------- building models


def build_family(
    name: str,
    size: tuple[int, int],
    pooling: str = "avg",
    weights: str = "none",
    weights_path: str | None = None,
) -> Any:
    """A frozen `include_top=False` keras.applications model with global pooling.

    weights: "imagenet" (Keras cache, works offline once cached), "none" (seeded random
    initialisation, reproducible), or a spec identity "sha256:..." with `weights_path`.
    """
    import keras

    fam = family(name)
    if pooling not in ("avg", "max"):
        raise InvalidInput(f"pooling {pooling!r} not available for {fam.name}: use avg or max")
    h, w = size
    if min(h, w) < fam.min_size:
        raise InvalidInput(f"{fam.name} needs inputs of at least {fam.min_size}px, got {h}x{w}")
    ctor = getattr(keras.applications, fam.name)
    kwargs: dict[str, Any] = dict(fam.kwargs)
    kwargs.update(include_top=False, input_shape=(h, w, 3), pooling=pooling)
    if weights == "none":
        model = _seeded(lambda: ctor(weights=None, **kwargs))
        _calibrate_batchnorm(model, fam.preprocessing, (h, w))
    elif weights == "imagenet":
        try:
            model = ctor(weights="imagenet", **kwargs)
        except Exception as e:  # download failure offline, or shape rejected
            raise FailedPrecondition(
                f"could not load imagenet weights for {fam.name} at {h}x{w}: {e}. Keras looks "
                "in $KERAS_HOME/models (default ~/.keras/models); copy the *_notop file there, "
                "or use --weights none / --weights FILE"
            ) from e
    else:
        path = check_weights_file(weights, weights_path)
        model = _seeded(lambda: ctor(weights=None, **kwargs))
        try:
            model.load_weights(path)
        except Exception as e:
            raise InvalidInput(f"weights file {path} does not fit {fam.name} (no top): {e}") from e
    model.trainable = False
    return model


def _seeded(make: Any) -> Any:
    """Build with fixed seeds, leaving the caller's random state as it was."""
    import keras

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        keras.utils.set_random_seed(RANDOM_INIT_SEED)
        return make()
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def calibration_images(size: tuple[int, int], n: int = CALIBRATION_BATCH) -> np.ndarray:
    """Deterministic smooth colour fields (n, h, w, 3) in 0-255, a stand-in for photos."""
    rng = np.random.default_rng(RANDOM_INIT_SEED)
    h, w = size
    coarse = rng.uniform(0, 255, size=(n, 5, 5, 3)).astype(np.float32)
    ys = np.linspace(0, 4, h, dtype=np.float32)
    xs = np.linspace(0, 4, w, dtype=np.float32)
    y0 = np.minimum(ys.astype(int), 3)
    x0 = np.minimum(xs.astype(int), 3)
    fy = (ys - y0)[None, :, None, None]
    fx = (xs - x0)[None, None, :, None]
    top = coarse[:, y0][:, :, x0] * (1 - fx) + coarse[:, y0][:, :, x0 + 1] * fx
    bot = coarse[:, y0 + 1][:, :, x0] * (1 - fx) + coarse[:, y0 + 1][:, :, x0 + 1] * fx
    img = top * (1 - fy) + bot * fy
    img += rng.normal(0, 12, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.float32)


def _calibrate_batchnorm(model: Any, preprocessing: str, size: tuple[int, int]) -> None:
    """Set BatchNorm statistics from a fixed synthetic batch.

    Freshly initialised networks shrink or blow up activations layer after layer (a random
    MobileNetV2 outputs ~1e-11, zero in float16); normalising each BatchNorm with the
    statistics of a fixed batch keeps random features well scaled; variances are floored
    at a tenth of the layer's median, since late layers see few positions (1x1 maps at
    small inputs) and a channel that happens to be constant would amplify the smallest
    change in the input a thousandfold. Only BatchNorm
    changes behaviour under training=True here (dropout rates are zeroed meanwhile), and
    the batch is fixed, so the result is deterministic.
    """
    import keras

    bns = [la for la in _all_layers(model) if isinstance(la, keras.layers.BatchNormalization)]
    if not bns:
        return
    drops = [la for la in _all_layers(model) if isinstance(la, keras.layers.Dropout)]
    saved_m = [bn.momentum for bn in bns]
    saved_r = [d.rate for d in drops]
    try:
        for bn in bns:
            bn.momentum = 0.0
        for d in drops:
            d.rate = 0.0
        x = preprocess_numpy(calibration_images(size, _calibration_count(size)), preprocessing)
        model(x, training=True)
        for bn in bns:  # a channel nearly constant on the batch must not amplify noise
            var = np.asarray(bn.moving_variance)
            floor = VARIANCE_FLOOR * float(np.median(var))
            if floor > 0 and var.min() < floor:
                bn.moving_variance.assign(np.maximum(var, floor).astype(var.dtype))
    finally:
        for bn, m in zip(bns, saved_m, strict=True):
            bn.momentum = m
        for d, r in zip(drops, saved_r, strict=True):
            d.rate = r


def _calibration_count(size: tuple[int, int]) -> int:
    """Images enough for ~400 positions per channel at the last (1/32 scale) layers."""
    per_image = max(1, (size[0] // 32) * (size[1] // 32))
    return int(min(64, max(CALIBRATION_BATCH, -(-400 // per_image))))


def _all_layers(model: Any) -> list[Any]:
    out = []
    for la in model.layers:
        out.append(la)
        if hasattr(la, "layers"):
            out.extend(_all_layers(la))
    return out


CLASSIFIER_ACTIVATIONS = ("softmax", "sigmoid")
"""A last Dense layer with one of these is a classifier, not a feature layer."""


def load_user_model(
    path: str, layer: str | None, cut_classifier: bool = False
) -> tuple[Any, str | None]:
    """The user's own saved Keras model cut at `layer`, and the layer it was cut at.

    Without `layer` the model's output is used, unless `cut_classifier` and the model ends
    in a classifier (see `classifier_input`): then the layer feeding the classifier.
    """
    import keras

    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as e:
        raise InvalidInput(f"could not load Keras model {path}: {e}") from e
    if layer is None and cut_classifier:
        layer = classifier_input(model)
    if layer is not None:
        try:
            out = model.get_layer(layer).output
        except ValueError as e:
            names = ", ".join(la.name for la in model.layers)
            raise InvalidInput(f"model {path} has no layer {layer!r}; layers: {names}") from e
        model = keras.Model(model.inputs, out)
    model.trainable = False
    return model, layer


def classifier_input(model: Any) -> str | None:
    """The layer feeding a last softmax/sigmoid Dense (class scores, not features), else None.

    That is where `include_top=False` cuts the keras.applications families; Dropout
    between them is skipped (it does nothing at inference).
    """
    import keras

    last = model.layers[-1]
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    if not isinstance(last, keras.layers.Dense) or activation not in CLASSIFIER_ACTIVATIONS:
        return None
    feeding = _producer(last)
    while isinstance(feeding, keras.layers.Dropout):
        feeding = _producer(feeding)
    if feeding is None or isinstance(feeding, keras.layers.InputLayer):
        return None
    return str(feeding.name)


def _producer(layer: Any) -> Any:
    """The layer whose output feeds `layer` (None when several or unknown)."""
    history = getattr(layer.input, "_keras_history", None)
    return history[0] if history else None


def model_input_size(model: Any) -> tuple[int, int] | None:
    """(height, width) a user model was built for, or None when it takes any size."""
    shape = model.inputs[0].shape
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise InvalidInput(f"model input must be (batch, H, W, 1|3) images, got {tuple(shape)}")
    h, w = shape[1], shape[2]
    return (int(h), int(w)) if h is not None and w is not None else None


def global_pool(y: Any, pooling: str) -> Any:
    """Feature maps (batch, ..., channels) -> one vector per image: avg, max or flatten.

    keras.ops act on a functional model's symbolic tensors (fine-tuning) and on the
    embedder's traced tensors alike, so both pool exactly the same way.
    """
    import keras

    if len(y.shape) <= 2:
        return y
    if pooling == "flatten":
        inner = y.shape[1:]
        if all(d is not None for d in inner):
            return keras.ops.reshape(y, (-1, int(np.prod(inner))))
        return keras.ops.reshape(y, (keras.ops.shape(y)[0], -1))
    axes = tuple(range(1, len(y.shape) - 1))
    return (keras.ops.max if pooling == "max" else keras.ops.mean)(y, axis=axes)


# ---------------------------------------------------------------- preprocessing

CAFFE_MEAN = np.array([103.939, 116.779, 123.68], np.float32)  # BGR
TORCH_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
TORCH_STD = np.array([0.229, 0.224, 0.225], np.float32)
_ZERO, _ONE = np.zeros(3, np.float32), np.ones(3, np.float32)


@dataclass(frozen=True)
class Preprocessing:
    """y = (x[..., order] / scale - mean) / std on 0-255 RGB floats.

    Every input scaling featurebank knows is this per-pixel affine map, so the numpy
    reference, the TensorFlow graph and the 1x1 convolution an exported fine-tuned
    model carries are all derived from one table row.
    """

    bgr: bool
    scale: float
    mean: np.ndarray
    std: np.ndarray

    def numpy(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        x = x[..., ::-1] if self.bgr else x
        return (x / self.scale - self.mean) / self.std

    def tf(self, x: Any) -> Any:
        import tensorflow as tf

        x = tf.cast(x, tf.float32)
        x = tf.reverse(x, axis=[-1]) if self.bgr else x
        return (x / self.scale - tf.constant(self.mean)) / tf.constant(self.std)

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """Kernel (3, 3) and bias (3,) with x @ kernel + bias == numpy(x)."""
        order = np.eye(3, dtype=np.float32)[:, ::-1] if self.bgr else np.eye(3, dtype=np.float32)
        kernel = order / (self.scale * self.std)[None, :]
        return kernel.astype(np.float32), (-self.mean / self.std).astype(np.float32)


PREPROCESSING = {
    "tf": Preprocessing(False, 127.5, _ONE, _ONE),
    "caffe": Preprocessing(True, 1.0, CAFFE_MEAN, _ONE),
    "torch": Preprocessing(False, 255.0, TORCH_MEAN, TORCH_STD),
    "raw0-255": Preprocessing(False, 1.0, _ZERO, _ONE),
    "raw0-1": Preprocessing(False, 255.0, _ZERO, _ONE),
}
assert tuple(PREPROCESSING) == PREPROCESSINGS


def preprocessing(mode: str) -> Preprocessing:
    """The table row for `mode`; InvalidInput naming the known modes otherwise."""
    try:
        return PREPROCESSING[mode]
    except KeyError:
        known = ", ".join(PREPROCESSING)
        raise InvalidInput(f"unknown preprocessing {mode!r}; known: {known}") from None


def preprocess_numpy(x: np.ndarray, mode: str) -> np.ndarray:
    """Reference preprocessing of 0-255 RGB floats; mirrors the family's `preprocess_input`."""
    return preprocessing(mode).numpy(x)


def preprocess_tf(x: Any, mode: str) -> Any:
    """The same preprocessing as TF ops, so it compiles into the model's graph."""
    return preprocessing(mode).tf(x)
