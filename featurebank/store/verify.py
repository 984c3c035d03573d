"""`featurebank store verify`: what is damaged in a bank, one finding per file.

Two severities, because they call for different acts: a damaged *derived* file (an index
or head generation, a CURRENT pointer under indexes/ or heads/) loses nothing, since
`featurebank store repair` rebuilds it from the store; damage to the *store* puts
committed items at risk. Reads only: safe on a bank that is being served.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from featurebank.core.bank import Bank, candidates, generations
from featurebank.core.errors import FeaturebankError
from featurebank.core.integrity import CHECKSUMS, STAGING, problems, sha256_of, shard_problems
from featurebank.store.rows import LogTrimmed

SEVERITY = {"ok": 0, "derived": 1, "store": 2}
"""Exit codes of `store verify`: the worst finding's severity."""

_BATCH = 65536


@dataclass(frozen=True)
class Finding:
    """One damaged thing: how bad, and a line naming the file and what is wrong."""

    severity: str  # "derived" or "store" (a key of SEVERITY)
    message: str
    unreadable: bool = False  # committed items cannot be read back: `store repair` salvages


@dataclass
class Verification:
    """What `verify` found, and what it checked."""

    bank: str
    items: int | None = None  # live items read back from the store (None: unreadable)
    generations: dict[str, list[int]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def severity(self) -> str:
        worst = max((SEVERITY[f.severity] for f in self.findings), default=0)
        return next(name for name, code in SEVERITY.items() if code == worst)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "severity": self.severity, "exit_code": SEVERITY[self.severity]}


def verify(bank: str | Path | Bank, deep: bool = True) -> Verification:
    """Check the store (every item readable, keys and ids agreeing, the change log covering
    them) and every published generation (checksums; `deep` hashes the contents)."""
    b = Bank(bank)
    report = Verification(bank=str(b.root))
    report.items = _read_back(b, report.findings)
    for what, parent in (("index", b.indexes_dir), ("head", b.heads_dir)):
        report.generations[what] = generations(parent)
        order, damaged = candidates(parent)
        report.findings += [Finding("derived", m) for m in damaged]
        for gen in order:
            directory = parent / str(gen)
            report.findings += [
                Finding("derived", f"{what} generation {gen}: {m}") for m in problems(directory, deep)
            ]
            if directory.is_dir() and not (directory / CHECKSUMS).exists():
                report.findings.append(Finding(
                    "derived", f"{what} generation {gen}: {directory / CHECKSUMS} is missing, so "
                    "its files cannot be checked (`store repair` checks they load and seals them)"
                ))
    staging = b.root / STAGING
    if staging.is_dir():
        report.findings += [
            Finding("derived", f"{line} (an embedding shard: `store repair` sets it aside and "
                               "`embed --engine ray` embeds it again)")
            for line in shard_problems(staging, deep).values()
        ]  # fmt: skip
    if deep:
        report.findings += _check_models(b)
    return report


def _check_models(b: Bank) -> list[Finding]:
    """The bank's copies of its model files are named by their sha256: they must still match.

    A damaged copy is "store" severity: vectors can still be served, but nothing can embed
    until `store relink --model FILE` brings a good copy back.
    """
    found = []
    for path in sorted((b.root / "models").glob("*")):
        digest = path.name.split(".", 1)[0]
        if path.is_file() and len(digest) == 64 and sha256_of(path) != digest:
            found.append(Finding("store", f"{path} is damaged (its content no longer matches "
                                          "its name; `store relink --model FILE` restores it)"))
    return found


def unreadable(b: Bank) -> bool:
    """Whether some committed item cannot be read back (the store needs a salvage), as
    opposed to items that read back with something wrong in them."""
    findings: list[Finding] = []
    _read_back(b, findings)
    return any(f.unreadable for f in findings)


def _read_back(b: Bank, findings: list[Finding]) -> int | None:
    """Read every live item back; returns how many, or None when the store cannot be read."""
    from featurebank import store as store_mod

    try:
        with store_mod.open(b, readonly=True) as st:
            expected = int(st.count)
            seen = 0
            for items in st.iter_batches(batch_size=_BATCH):
                seen += len(items.ids)
                _check_batch(st, items, findings)
            if seen != expected:
                findings.append(Finding(
                    "store", f"{st.path}: {seen} items read back, the store counts {expected}", True
                ))
            _check_log(st, findings)
            return seen
    except FeaturebankError as e:
        findings.append(Finding("store", str(e), True))
        return None
    except lmdb.Error as e:  # a damaged page LMDB noticed: name the file it is in
        findings.append(Finding("store", f"{_data_file(b)} is damaged ({e})", True))
        return None


def _data_file(b: Bank) -> Path:
    """The live environment's data file (as store/CURRENT names it)."""
    try:
        name = (b.store_dir / "CURRENT").read_text(errors="replace").strip()
    except OSError:
        name = "env-?"
    return b.store_dir / name / "data.mdb"


def _check_batch(st: Any, items: Any, findings: list[Finding]) -> None:
    bad = ~np.isfinite(np.asarray(items.vectors, dtype=np.float32)).all(axis=1)
    if bad.any():
        findings.append(Finding(
            "store", f"{st.path}: {int(bad.sum())} vectors are not finite "
            f"(first key {items.keys[int(np.argmax(bad))]!r})"
        ))
    ids = np.asarray(st.ids_of(list(items.keys)), dtype=np.int64)
    wrong = ids != np.asarray(items.ids, dtype=np.int64)
    if wrong.any():
        findings.append(Finding(
            "store", f"{st.path}: {int(wrong.sum())} keys map to another id than their item's "
            f"(first key {items.keys[int(np.argmax(wrong))]!r})"
        ))


def _check_log(st: Any, findings: list[Finding]) -> None:
    """Every live item was added by a logged commit (what catch-up and replicas replay)."""
    try:
        changes = st.changes_since(0)
    except LogTrimmed:
        return  # trimmed for replicas: the items it no longer names were logged before
    live = np.asarray(st.label_table()[0], dtype=np.uint64)
    added = np.asarray(changes.added, dtype=np.uint64)
    missing = np.setdiff1d(live, np.union1d(added, np.asarray(changes.relabelled, np.uint64)))
    if added.size and missing.size:
        findings.append(Finding(
            "store", f"{st.path}: {missing.size} live items have no entry in the change log"
        ))
