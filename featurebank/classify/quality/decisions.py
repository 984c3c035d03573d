"""Remembered decisions: findings a person looked at and kept, never suggested again.

Stored in the bank (`BANK/quality/decisions.json`, replaced atomically under a lock on
`decisions.lock`, so two processes keeping findings at once both land), so a copied bank
and a server over it remember them too. A decision names what was judged, not
a row: a kept label is (key, the label it had), so relabelling the item makes its
finding new again; a kept duplicate is the pair of keys; a kept outlier is its key.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featurebank.core.bank import Bank, full_or_read_only, write_atomic
from featurebank.core.errors import FailedPrecondition, InvalidInput, NotFound, shown

if TYPE_CHECKING:
    from featurebank.store import Store

FILE = Path("quality") / "decisions.json"
KEYS_PER_KIND = {"label": 1, "duplicate": 2, "outlier": 1}  # how many keys a decision names


@dataclass(frozen=True)
class Kept:
    """What a person judged and kept."""

    kind: str
    keys: tuple[str, ...]  # sorted
    label: str | None = None  # a kept label: the label it was kept with


def path_of(bank: Bank) -> Path:
    return bank.root / FILE


def stamp(bank: Bank) -> tuple[int, int] | None:
    """(modification time, size) of the decisions file, None without one: what a cached
    pass compares to know the decisions did not change."""
    try:
        st = path_of(bank).stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def content(bank: Bank) -> bytes:
    """The decisions file as it is (empty without one): what a remote replica copies."""
    try:
        return path_of(bank).read_bytes()
    except FileNotFoundError:
        return b""


def install(bank: Bank, data: bytes) -> None:
    """Make the bank's decisions file `data` (none when empty), as a replica follows its
    primary's; unchanged files are left alone."""
    if content(bank) == data:
        return
    if data:
        write_atomic(path_of(bank), data)
    else:
        path_of(bank).unlink(missing_ok=True)


def load(bank: Bank) -> set[Kept]:
    """Every remembered decision of the bank (none when it has none)."""
    path = path_of(bank)
    if not path.exists():
        return set()
    try:
        rows = json.loads(path.read_text())["kept"]
        return {Kept(r["kind"], tuple(sorted(r["keys"])), r.get("label")) for r in rows}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FailedPrecondition(
            f"quality decisions file {path} is damaged ({e}); move it away to start afresh"
        ) from None


def keep(store: Store, kind: str, keys: Sequence[str]) -> Kept:
    """Remember that the finding of `kind` about `keys` was looked at and kept."""
    want = KEYS_PER_KIND.get(kind)
    if want is None:
        raise InvalidInput(f"unknown finding kind {shown(kind)}: use one of {sorted(KEYS_PER_KIND)}")
    if len(keys) != want or len(set(keys)) != want:
        raise InvalidInput(f"a kept {kind} names {want} different key(s), got {list(keys)}")
    missing = store.missing(list(keys))
    if missing:
        raise NotFound(f"key {shown(missing[0])} is not in bank {store.bank.root}")
    label = None
    if kind == "label":
        label = store.get_by_keys(list(keys)).labels[0]
        if label is None:
            raise InvalidInput(f"key {shown(keys[0])} has no label to keep")
    kept = Kept(kind, tuple(sorted(keys)), label)
    path = path_of(store.bank)
    try:
        with _locked(path):
            decided = load(store.bank) | {kept}
            rows: list[dict[str, Any]] = [
                {"kind": k.kind, "keys": list(k.keys), **({"label": k.label} if k.label else {})}
                for k in sorted(decided, key=lambda k: (k.kind, k.keys))
            ]
            data = json.dumps({"format": 1, "updated": time.time(), "kept": rows}, indent=1)
            write_atomic(path, data.encode())
    except OSError as e:
        known = full_or_read_only(e, path.parent, "quality decisions", "the decisions file")
        if known is not None:
            raise known from None
        raise
    return kept


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the decisions' lock file, so a read-modify-write is never interleaved."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
