"""Small specs and vectors for externally computed features (no model needed)."""

from __future__ import annotations

import numpy as np

from featurebank.core.spec import Spec


def make_spec(dim: int = 8, dtype: str = "float32", backbone: str = "external") -> Spec:
    """A spec for externally computed vectors (no model needed)."""
    return Spec(
        backbone=backbone,
        weights="external",
        input_size=None,
        resize="none",
        preprocessing="none",
        pooling="none",
        dim=dim,
        dtype=dtype,
    )


def make_vectors(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
