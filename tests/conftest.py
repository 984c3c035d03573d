"""Fixtures shared by the test files: small specs, banks and stores on real LMDB."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from featurebank import store as store_mod
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


@pytest.fixture
def bank(tmp_path: Path) -> Path:
    """An empty bank directory."""
    return tmp_path / "bank"


@pytest.fixture
def store(bank: Path) -> Iterator[store_mod.Store]:
    """A fresh writable store (dim 8, float32, 4 rows per block so tests cross blocks)."""
    with store_mod.create(bank, make_spec(), block_rows=4) as st:
        yield st
