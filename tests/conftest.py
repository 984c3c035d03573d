"""Fixtures shared by the test files: small banks and stores on real LMDB."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from featurebank import store as store_mod
from tests.support.specs import make_spec


@pytest.fixture
def bank(tmp_path: Path) -> Path:
    """An empty bank directory."""
    return tmp_path / "bank"


@pytest.fixture
def store(bank: Path) -> Iterator[store_mod.Store]:
    """A fresh writable store (dim 8, float32, 4 rows per block so tests cross blocks)."""
    with store_mod.create(bank, make_spec(), block_rows=4) as st:
        yield st
