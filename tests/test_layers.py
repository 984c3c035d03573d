"""The layers point one way, and a process that only searches never imports TensorFlow."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SEARCH_ONLY = [
    "featurebank.core.vocabulary", "featurebank.core.params", "featurebank.store",
    "featurebank.store.transfer", "featurebank.index.build", "featurebank.index.searcher",
    "featurebank.classify.classifier", "featurebank.classify.evaluate",
    "featurebank.classify.status", "featurebank.server.client", "featurebank.cli",
    "featurebank.api",
]


def test_store_index_and_classifier_import_without_tensorflow() -> None:
    code = (
        "import sys\n"
        f"for name in {SEARCH_ONLY!r}: __import__(name)\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_import_contracts_hold() -> None:
    """The import-linter contracts of pyproject.toml (layers, no cycles, no TensorFlow below)."""
    linter = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if linter is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    result = subprocess.run([linter], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


def test_one_tree_without_links_inside_the_package() -> None:
    """Every file has one path: the package holds no links; the root's links point into it."""
    import featurebank.embedder
    import featurebank.index
    import featurebank.server
    import featurebank.v1

    package = ROOT / "featurebank"
    assert not [p for p in package.rglob("*") if p.is_symlink()]
    for module, folder in ((featurebank.embedder, "embedder"), (featurebank.index, "index"),
                           (featurebank.server, "server"), (featurebank.v1, "v1")):
        assert Path(module.__file__).parent == package / folder  # imported from the real tree
    for link in ("embedder", "index", "server"):
        assert (ROOT / link).is_symlink() and (ROOT / link).resolve() == package / link
    assert (ROOT / "protos" / "featurebank" / "v1" / "featurebank.proto").is_file()
    assert not (ROOT / "protos" / "__init__.py").exists()  # the contract, not a package
