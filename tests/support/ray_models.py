"""Stand-in model stages for the Ray tests: importable by Ray's workers (tests/ is put on
their PYTHONPATH), picklable, and without TensorFlow so actors start in a moment.

`SleepingModel` sleeps a fixed time per batch, so a test of the actor pool measures the
engine, not this machine's cores; with `die_after`, the first actor to reach that many
batches kills its own process (once per `flag` file), as a crashed or preempted worker would.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurebank.core.spec import Spec

SIZE = 8
DIM = 4


def stand_in_spec(dtype: str = "float32") -> Spec:
    return Spec(backbone="stand-in", weights="none", input_size=(SIZE, SIZE), resize="stretch",
                preprocessing="raw0-255", pooling="none", dim=DIM, dtype=dtype)  # fmt: skip


def write_images(path: Path, n: int, seed: int = 0) -> Path:
    """An (n, 8, 8, 3) uint8 .npy array source."""
    rng = np.random.default_rng(seed)
    np.save(path, rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8))
    return path


class _Model:
    def __init__(self, spec: Spec, delay: float, die_after: int | None, flag: str | None):
        self.spec = spec
        self.delay = delay
        self.die_after = die_after
        self.flag = flag
        self.calls = 0

    @property
    def input_size(self) -> tuple[int, int]:
        assert self.spec.input_size is not None
        return self.spec.input_size

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.die_after is not None and self.calls >= self.die_after and self.flag:
            try:
                fd = os.open(self.flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                os._exit(1)  # no cleanup, no exception: the process is gone
        time.sleep(self.delay)
        x = pixels.astype(np.float32).reshape(len(pixels), -1, 3)
        return np.concatenate([x.mean(axis=1), x.std(axis=(1, 2))[:, None]], axis=1)


@dataclass
class SleepingModel:
    """A model factory (what `ray_job.run(model=...)` takes)."""

    delay: float = 0.0
    die_after: int | None = None
    flag: str | None = None

    def __call__(self, spec: Spec) -> _Model:
        return _Model(spec, self.delay, self.die_after, self.flag)
