"""Where models run: which local devices, at what precision, and TensorFlow's start-up quiet.

One `Placement` is resolved per process from the user's `--device` and `--precision`
and used by the batch job and the server alike. Several devices of one kind (every
local GPU, or logical devices a CPU was split into) run through one MirroredStrategy,
so the code that spreads batches over GPUs is the code tests run on a split CPU.
TensorFlow is imported only inside functions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from featurebank.core.errors import DeviceUnavailable
from featurebank.core.vocabulary import DEVICES, PRECISIONS, check_choice

log = logging.getLogger(__name__)

# TensorFlow's C++ start-up lines (oneDNN, CUDA probing) are written before its log level is
# read, so no environment variable hides them all.
NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\)"
    rb"|[IWE]\d{4} \d\d:\d\d:[\d.]+ +\d+ [\w.]+:\d+\]"
    rb"|To enable the following instructions:)"
)


@dataclass(frozen=True)
class Placement:
    """The devices a model runs on (all of one kind) and the precision it computes in."""

    kind: str  # "GPU" or "CPU"
    devices: tuple[str, ...]  # logical device names, e.g. /device:GPU:0
    names: tuple[str, ...]  # what each device is (the GPU's model name), for reports
    precision: str  # "mixed" (float16 compute, float32 variables) or "float32"
    note: str = ""  # e.g. "no GPU visible", said when it explains the choice

    @property
    def replicas(self) -> int:
        return len(self.devices)

    @property
    def on_accelerator(self) -> bool:
        """Memory is scarce and fixed here, so the job searches the batch size that fits."""
        return self.kind == "GPU"

    @property
    def key(self) -> str:
        """Identifies the hardware and precision a remembered batch size was found for."""
        return f"{self.replicas}x {'|'.join(sorted(set(self.names)))} {self.precision}"

    def describe(self) -> str:
        if self.kind == "CPU":
            where = "CPU" if self.replicas == 1 else f"{self.replicas} logical CPU devices"
        else:
            models = ", ".join(sorted(set(self.names)))
            where = f"{self.replicas} GPU{'s' if self.replicas > 1 else ''} ({models})"
        where += f" ({self.note})" if self.note else ""
        precision = "mixed precision" if self.precision == "mixed" else "float32"
        return f"{where}; {precision}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(devices=list(self.devices), names=list(self.names), description=self.describe())
        return out


def resolve(device: str = "auto", precision: str = "auto") -> Placement:
    """The placement for `--device` / `--precision`; asking for a GPU that is absent fails.

    auto: every local GPU if there is one, else the CPU (all its logical devices, one
    unless the process split it). Precision auto: mixed on GPUs, float32 on the CPU.
    """
    check_choice(device, DEVICES, "device")
    check_choice(precision, PRECISIONS, "precision")
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if device == "gpu" and not gpus:
        raise DeviceUnavailable(
            "--device gpu, but TensorFlow sees no GPU on this machine (check the CUDA "
            "driver, CUDA_VISIBLE_DEVICES and that the installed TensorFlow has GPU "
            "support; --verbose shows TensorFlow's device messages); --device cpu or "
            "auto runs on the CPU"
        )
    kind = "GPU" if gpus and device != "cpu" else "CPU"
    logical = [d.name for d in tf.config.list_logical_devices(kind)]
    if kind == "GPU":
        names = tuple(_gpu_name(g) for g in gpus)
        if len(names) != len(logical):  # a GPU split into logical devices
            names = tuple(names[0] for _ in logical)
    else:
        names = tuple("CPU" for _ in logical)
    note = "" if kind == "GPU" else ("GPUs not used" if gpus else "no GPU visible")
    chosen = precision if precision != "auto" else ("mixed" if kind == "GPU" else "float32")
    return Placement(kind, tuple(logical), names, chosen, note)


def _gpu_name(gpu: Any) -> str:
    import tensorflow as tf

    try:
        return str(tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name))
    except Exception:  # details are not available on every platform
        return str(gpu.name)


_STRATEGIES: dict[tuple[str, ...], Any] = {}
_STRATEGY_LOCK = threading.Lock()


def strategy(placement: Placement) -> Any:
    """One MirroredStrategy per set of devices, shared by model building and running."""
    import tensorflow as tf

    with _STRATEGY_LOCK:
        if placement.devices not in _STRATEGIES:
            logging.getLogger("tensorflow").addFilter(_EagerStrategyNote())
            _STRATEGIES[placement.devices] = tf.distribute.MirroredStrategy(
                devices=list(placement.devices)
            )
        return _STRATEGIES[placement.devices]


class _EagerStrategyNote(logging.Filter):
    """Drops the strategy's advice to wrap `run` in a tf.function: each replica's work is
    already one compiled call (see `Embedder._replicate`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eagerly has significant overhead" not in record.getMessage()


# ---------------------------------------------------------------- precision


def mixed_precision_copy(model: Any) -> Any:
    """A copy of `model` computing in float16 with float32 variables (Keras mixed precision).

    BatchNormalization keeps float32 statistics and computes in float32 by itself under
    this policy; global pooling layers are made float32 outright, so the mean or max
    over the feature map is not taken in float16.
    """
    import keras

    pools = (
        keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D,
        keras.layers.GlobalAveragePooling3D, keras.layers.GlobalMaxPooling1D,
        keras.layers.GlobalMaxPooling2D, keras.layers.GlobalMaxPooling3D,
    )  # fmt: skip

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        config["dtype"] = "float32" if isinstance(layer, pools) else "mixed_float16"
        return layer.__class__.from_config(config)

    twin = keras.models.clone_model(model, clone_function=clone)
    twin.set_weights(model.get_weights())
    twin.trainable = False
    return twin


# ---------------------------------------------------------------- start-up noise


def load_tensorflow(verbose: bool = False) -> None:
    """Import TensorFlow and probe the devices with its start-up lines dropped unless verbose.

    For commands (the CLI, benchmarks): it swaps the process's stderr while TensorFlow
    starts, which a library must not do to its caller.
    """
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _stderr_filtered(NOISE if not verbose else None):
        import tensorflow as tf

        tf.config.list_physical_devices()  # CUDA probing logs here
    if not verbose:
        logging.getLogger("tensorflow").setLevel(logging.ERROR)


@contextlib.contextmanager
def _stderr_filtered(noise: re.Pattern[bytes] | None) -> Iterator[None]:
    """Collect what is written to file descriptor 2, then pass on the lines not matching noise."""
    if noise is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().splitlines(keepends=True) if not noise.match(ln)]
            if kept:
                write_stderr(b"".join(kept))


def write_stderr(data: bytes) -> None:
    """Write raw bytes to stderr (its text layer when it has no buffer, as under some hosts)."""
    buffer = getattr(sys.stderr, "buffer", None)
    if buffer is not None:
        buffer.write(data)
    else:
        sys.stderr.write(data.decode(errors="replace"))
    sys.stderr.flush()
