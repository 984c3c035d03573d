"""Helpers the tests share: import them as `tests.support.<module>` (tests/ is a package)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository root (where `make` and the CLI run)."""
