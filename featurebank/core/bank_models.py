"""What a bank needs to embed: its model file, kept in `BANK/models/` by content hash.

The spec records a model (or weights) file by its sha256 and the path it was read from.
A path stops being true when the file or the bank moves, so the bank keeps its own copy,
named by the hash: a copied or moved bank still embeds and serves, and `store relink`
re-points an older bank (made before banks kept their model) to a file with that content.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

from featurebank.core.bank import Bank, fsync_dir, full_or_read_only
from featurebank.core.errors import InvalidInput
from featurebank.core.integrity import sha256_of
from featurebank.core.spec import Spec

HASHED = "sha256:"


sha256_file = sha256_of
"""Content identity of a model/weights file, so a moved file still matches its bank."""


def models_dir(bank: Bank) -> Path:
    return bank.root / "models"


def _suffix(path: str) -> str:
    """The file's kind, which Keras reads from its name (.keras, .h5, .weights.h5)."""
    return ".weights.h5" if path.endswith(".weights.h5") else Path(path).suffix


def copy_of(bank: Bank, spec: Spec) -> Path | None:
    """The bank's copy of the spec's model file, if it keeps one."""
    if not spec.weights.startswith(HASHED):
        return None
    digest = spec.weights[len(HASHED) :]
    found = sorted(models_dir(bank).glob(f"{digest}*"))
    return found[0] if found else None


def locate(bank: Bank, spec: Spec) -> Spec:
    """The spec with its file path pointing at the bank's own copy, when there is one."""
    copy = copy_of(bank, spec)
    return dataclasses.replace(spec, weights_path=str(copy)) if copy is not None else spec


def keep(bank: Bank, spec: Spec, source: str | os.PathLike[str] | None = None) -> Path | None:
    """Copy the spec's model file (or `source`) into the bank, unless it has it already.

    The copy is checked against the recorded hash before it is given its name, so a file
    changed since the spec was made is never kept (InvalidInput says which).
    """
    if not spec.weights.startswith(HASHED):
        return None
    existing = copy_of(bank, spec)
    if existing is not None:
        return existing
    path = str(source or spec.weights_path or "")
    if not path or not Path(path).is_file():
        return None
    dest_dir = models_dir(bank)
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".copy.")
    os.close(fd)
    try:
        try:
            shutil.copyfile(path, tmp)
        except OSError as e:
            known = full_or_read_only(e, dest_dir, f"copy of {path}")
            if known is not None:
                raise known from None
            raise
        digest = sha256_file(tmp)
        if f"{HASHED}{digest}" != spec.weights:
            raise InvalidInput(
                f"model file {path} does not match the bank's spec "
                f"(spec has {spec.weights}, file is {HASHED}{digest})"
            )
        dest = dest_dir / f"{digest}{_suffix(path)}"
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(dest_dir)
    return dest
