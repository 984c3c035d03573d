"""The model side of embedding: rebuild a bank's exact extractor and run it compiled.

`Embedder` is shared by the batch job (`embed`) and the server, so an image embedded
online gets the same vector the batch job stored. The forward pass (preprocessing,
model, pooling) is traced once into a TF graph and its weights frozen into constants,
which lets Grappler fold BatchNorm into the convolutions: about 1.5x faster on CPU
than calling the Keras model. TensorFlow is imported only when a model is built.

Over 400 lines: one class, whose placement on devices, precision and frozen-graph
tracing all decide what one forward pass is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from featurebank.core.errors import FailedPrecondition, InvalidInput
from featurebank.core.params import EmbedParams
from featurebank.core.spec import Spec
from featurebank.embedder import backbones, devices, images
from featurebank.embedder.devices import Placement

log = logging.getLogger(__name__)

# Above this, folding weights into the graph copies gigabytes of constants for little gain
# (and the largest families use LayerNorm, not BatchNorm), so such models run unfrozen.
FREEZE_MAX_PARAMS = 50_000_000

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_LAST: tuple[str, Embedder] | None = None  # the last model built by embed()


def _decode_pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="decode")
        return _POOL


def spec_for(params: EmbedParams) -> Spec:
    """The spec a job with these params produces (dim filled in once the model is built)."""
    backbone, weights, layer, size = params.backbone, params.weights, params.layer, params.image_size
    preprocessing = params.preprocessing
    if backbone is None:
        raise InvalidInput("name a backbone (--backbone): a keras.applications family or a .keras file")
    if backbones.is_model_file(backbone):
        path = Path(backbone).expanduser()
        if not path.is_file():
            raise InvalidInput(f"backbone model file {backbone} does not exist")
        if weights not in ("imagenet", "none", str(path)):
            raise InvalidInput("--weights does not apply to a .keras backbone (it has its own)")
        if preprocessing is not None:
            backbones.preprocess_numpy(np.zeros(3), preprocessing)  # validates
        return Spec(
            backbone=str(path.resolve()),
            weights=f"sha256:{backbones.sha256_file(path)}",
            input_size=size,
            resize=params.resize,
            preprocessing=preprocessing or "raw0-255",
            pooling=params.pooling,
            dtype=params.dtype,
            weights_path=str(path.resolve()),
            layer=layer,
        )
    if layer is not None:
        raise InvalidInput("--layer applies to a .keras backbone only")
    fam = backbones.family(backbone)
    identity, path_s = backbones.weights_identity(weights)
    return Spec(
        backbone=fam.name,
        weights=identity,
        input_size=size or (fam.default_size, fam.default_size),
        resize=params.resize,
        preprocessing=preprocessing or fam.preprocessing,
        pooling=params.pooling,
        dtype=params.dtype,
        weights_path=path_s,
    )


def make_spec(backbone: str, **options: Any) -> Spec:
    """`spec_for` with the options by name (EmbedParams fields), the others at their defaults."""
    return spec_for(EmbedParams(backbone=backbone).override(**options))


class Embedder:
    """A frozen backbone plus its preprocessing, compiled once; images in, vectors out."""

    def __init__(
        self, spec: Spec, model: Any, placement: Placement, freeze: bool = True
    ) -> None:
        if backbones.is_model_file(spec.backbone) and len(model.outputs[0].shape) == 2:
            spec = dataclasses.replace(spec, pooling="none")  # already one vector per image
        self.spec = spec
        self.model = model
        self.dim = int(spec.dim)
        self.placement = placement
        self._replicated: Any = None  # the forward pass run on every device at once
        self._work: dict[str, list[int]] = {}  # device -> [batches, images] it embedded
        self._work_lock = threading.Lock()
        self._fn = self._compile(freeze)

    # ------------------------------------------------------------ construction

    @classmethod
    def from_spec(
        cls, spec: Spec, freeze: bool = True, placement: Placement | None = None
    ) -> Embedder:
        """Rebuild the exact model a bank was made with (weights file checked by hash).

        freeze=False skips folding the weights into the graph: seconds faster to build
        (useful for a handful of images), slower per image. placement: where to run
        (default: every local GPU with mixed precision, else the CPU in float32).
        """
        placement = placement or devices.resolve()
        model, spec, placement = _build_model(spec, placement)
        return cls(spec, model, placement, freeze)  # _compile refuses a dim other than spec.dim

    @classmethod
    def cached(cls, spec: Spec, placement: Placement | None = None) -> Embedder:
        """`from_spec`, reusing the previous model when spec and placement are the same."""
        global _LAST
        placement = placement or devices.resolve()
        key = json.dumps([spec.to_dict(), placement.to_dict()], sort_keys=True)
        with _POOL_LOCK:
            if _LAST is not None and _LAST[0] == key:
                return _LAST[1]
        emb = cls.from_spec(spec, placement=placement)
        with _POOL_LOCK:
            _LAST = (key, emb)
        return emb

    @classmethod
    def create(
        cls, backbone: str, freeze: bool = True, placement: Placement | None = None, **options: Any
    ) -> Embedder:
        """Build from command-line style options (EmbedParams fields by name); the spec's dim
        comes from the model."""
        return cls.from_spec(make_spec(backbone, **options), freeze, placement)

    # ------------------------------------------------------------ running

    @property
    def input_size(self) -> tuple[int, int]:
        assert self.spec.input_size is not None
        return self.spec.input_size

    def prepare(self, data: bytes, max_pixels: int = images.DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Decode one image to uint8 RGB at the model's input size (ImageError says why not)."""
        return images.decode(data, self.input_size, self.spec.resize, max_pixels)

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        """Vectors (n, dim) float32 for uint8 RGB pixels (n, h, w, 3) already at input size."""
        x = np.ascontiguousarray(pixels, dtype=np.uint8)
        if x.ndim != 4 or x.shape[1:] != (*self.input_size, 3):
            raise InvalidInput(
                f"pixels must be (n, {self.input_size[0]}, {self.input_size[1]}, 3), got {x.shape}"
            )
        if len(x) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self.forward_tensor(x)

    def forward_tensor(self, x: Any) -> np.ndarray:
        """`forward` for a batch already uint8 of the right shape (no checks), on every device."""
        if self._replicated is not None:
            return self._forward_replicas(np.asarray(x))
        import tensorflow as tf

        with tf.device(self.placement.devices[0]):
            out = self._fn(tf.convert_to_tensor(x))
        self._count(out.device, int(out.shape[0]))
        return np.asarray(out, dtype=np.float32)

    def work_by_device(self) -> dict[str, dict[str, int]]:
        """Batches and images each device has embedded so far (read from where outputs landed)."""
        with self._work_lock:
            return {d: {"batches": b, "images": n} for d, (b, n) in sorted(self._work.items())}

    def _count(self, device: str, images_: int) -> None:
        name = device[device.find("/device:") :] if "/device:" in device else device
        with self._work_lock:
            work = self._work.setdefault(name, [0, 0])
            work[0] += 1
            work[1] += images_

    def embed_images(self, images_: Sequence[bytes], batch_size: int = 64) -> np.ndarray:
        """Vectors (n, dim) float32 of encoded images; an undecodable one -> InvalidInput."""

        def prep(item: tuple[int, bytes]) -> np.ndarray:
            i, data = item
            try:
                return self.prepare(data)
            except images.ImageError as e:
                raise InvalidInput(f"image {i}: {e.reason}") from e

        items = list(enumerate(images_))
        if len(items) > 2:
            pixels = list(_decode_pool().map(prep, items))
        else:
            pixels = [prep(it) for it in items]
        return self._run_batches(pixels, batch_size)

    def embed_arrays(
        self, pixels: np.ndarray | Sequence[np.ndarray], batch_size: int = 64
    ) -> np.ndarray:
        """Vectors of in-memory images (n, H, W[, 1|3|4]) uint8/uint16/float, resized like files.

        Floats are taken as 0-1 when an image's maximum is at most 1, else as 0-255.
        """
        prepared = [images.prepare_array(p, self.input_size, self.spec.resize) for p in pixels]
        return self._run_batches(prepared, batch_size)

    def _run_batches(self, pixels: list[np.ndarray], batch_size: int) -> np.ndarray:
        out = [
            self.forward(np.stack(pixels[s : s + batch_size]))
            for s in range(0, len(pixels), batch_size)
        ]
        vecs = np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
        return self.round(vecs)

    def round(self, vectors: np.ndarray) -> np.ndarray:
        """Round through the bank's dtype, so a query equals the stored vector bit for bit."""
        return np.asarray(vectors, self.spec.dtype).astype(np.float32)

    # ------------------------------------------------------------ compilation

    def _graph_fn(self) -> Any:
        import tensorflow as tf

        model, spec = self.model, self.spec
        gray = int(model.inputs[0].shape[-1]) == 1
        pooling = spec.pooling

        def fn(x: Any) -> Any:
            y = backbones.preprocess_tf(x, spec.preprocessing)
            if gray:
                y = tf.image.rgb_to_grayscale(y)
            y = model(y, training=False)
            if isinstance(y, (list, tuple)):
                y = y[0]
            return backbones.global_pool(tf.cast(y, tf.float32), pooling)

        return fn

    def _compile(self, freeze: bool) -> Any:
        import tensorflow as tf

        fn = self._graph_fn()
        h, w = self.input_size
        concrete = tf.function(fn).get_concrete_function(tf.TensorSpec([None, h, w, 3], tf.uint8))
        out_shape = concrete.structured_outputs.shape
        if out_shape.rank != 2 or out_shape[-1] is None:
            raise InvalidInput(f"model output cannot be made a vector: shape {out_shape}")
        dim = int(out_shape[-1])
        if self.spec.dim and dim != self.spec.dim:
            raise InvalidInput(
                f"model gives {dim}-dimensional features but the spec says {self.spec.dim}: "
                f"[{self.spec.describe()}]"
            )
        if not self.spec.dim:
            self.spec = dataclasses.replace(self.spec, dim=dim)
        self.dim = dim
        if not freeze or self.model.count_params() > FREEZE_MAX_PARAMS:
            if self.placement.replicas > 1:  # traced per device: each reads its own variables
                signature = [tf.TensorSpec([None, h, w, 3], tf.uint8)]
                return self._replicate(tf.function(fn, input_signature=signature))
            return concrete
        try:
            from tensorflow.python.framework.convert_to_constants import (
                convert_variables_to_constants_v2,
            )

            frozen = convert_variables_to_constants_v2(concrete)
        except Exception as e:  # exotic layers: run the traced function with variables
            log.info("could not freeze the model graph (%s); running it unfrozen", e)
            return self._compile(freeze=False)

        def call(x: Any) -> Any:
            out = frozen(x)
            return out[0] if isinstance(out, (list, tuple)) else out

        with tf.device(self.placement.devices[0]):
            call(tf.zeros((1, h, w, 3), tf.uint8))  # graph optimisation happens on the first call
        return self._replicate(call) if self.placement.replicas > 1 else call

    def _replicate(self, fn: Any) -> Any:
        """Run `fn` on every device of the placement, one thread per device.

        Each replica's work is one compiled call, so the strategy's eager mode costs
        little, and each output stays on the device that computed it (which is how work
        per device is counted); lifted into one tf.function, outputs all come back on the
        first device.
        """
        strategy = devices.strategy(self.placement)

        def replicated(batch: Any) -> Any:
            return strategy.run(lambda x: fn(x), args=(batch,))  # a plain callable: eager mode

        self._replicated = replicated
        return fn

    def _forward_replicas(self, x: np.ndarray) -> np.ndarray:
        """Split a batch across the devices and gather the vectors back in order.

        A batch smaller than the device count is padded with copies of its last image, so
        every device has a row (an empty one fails in some kernels); the copies are dropped.
        """
        import tensorflow as tf

        strategy = devices.strategy(self.placement)
        real = len(x)
        n = self.placement.replicas
        if real < n:
            x = np.concatenate([x, np.repeat(x[-1:], n - real, axis=0)])
        parts = np.array_split(x, n)

        def value(ctx: Any) -> Any:
            return tf.constant(parts[ctx.replica_id_in_sync_group])

        dist = strategy.experimental_distribute_values_from_function(value)
        outs = strategy.experimental_local_results(self._replicated(dist))
        start = 0
        for part, out in zip(parts, outs, strict=True):
            rows = min(len(part), real - start)
            start += len(part)
            if rows > 0:
                self._count(out.device, rows)
        return np.concatenate([np.asarray(o, dtype=np.float32) for o in outs])[:real]


def _build_model(spec: Spec, placement: Placement) -> tuple[Any, Spec, Placement]:
    """The model for a spec, its variables on the placement's devices, at its precision.

    Weights and BatchNorm statistics are always made in float32 (identical to a CPU
    build); a mixed-precision placement then gets a float16 twin with those weights.
    """
    scope: Any = (
        devices.strategy(placement).scope() if placement.replicas > 1 else contextlib.nullcontext()
    )
    with scope:
        model, spec = _build_float32(spec)
        if placement.precision == "mixed":
            try:
                model = devices.mixed_precision_copy(model)
            except (TypeError, ValueError, NotImplementedError) as e:  # custom layers Keras cannot clone
                log.warning("model %s runs in float32: no mixed-precision copy (%s)", spec.backbone, e)
                placement = dataclasses.replace(placement, precision="float32")
    return model, spec, placement


def _build_float32(spec: Spec) -> tuple[Any, Spec]:
    """The Keras model for a spec: a registry family, or the user's own model cut at a layer."""
    if backbones.is_model_file(spec.backbone) or spec.weights_path == spec.backbone:
        path = backbones.check_weights_file(spec.weights, spec.weights_path or spec.backbone)
        # A new job (no dim yet) without --layer is cut before a classifier; a bank's own
        # spec is rebuilt exactly as recorded.
        model, layer = backbones.load_user_model(path, spec.layer, cut_classifier=not spec.dim)
        spec = dataclasses.replace(spec, layer=layer)
        fixed = backbones.model_input_size(model)
        if spec.input_size is None:  # a new job: the model's own size, else 224
            spec = dataclasses.replace(spec, input_size=fixed or (224, 224))
        elif fixed is not None and fixed != tuple(spec.input_size):
            raise InvalidInput(
                f"model {path} takes {fixed[0]}x{fixed[1]} images, not "
                f"{spec.input_size[0]}x{spec.input_size[1]}"
            )
        return model, spec
    size = spec.input_size
    if not spec.has_model or size is None:
        raise FailedPrecondition(
            f"bank holds vectors made elsewhere, there is no model: [{spec.describe()}]"
        )
    model = backbones.build_family(
        spec.backbone, size, spec.pooling, spec.weights, spec.weights_path
    )
    return model, spec
