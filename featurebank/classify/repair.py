"""`featurebank store repair`: rebuild what is derived from the store, and say what was done.

Indexes and heads are derived state, so no damage to them loses an item: a damaged
generation is set aside (renamed `.damaged-<gen>`, kept for inspection, never loaded);
a broken CURRENT is pointed at the newest intact generation; when no intact generation
is left, one is rebuilt from the store with the params the damaged one recorded. A
store CURRENT naming a missing environment is pointed at the environment that holds
the newest commit. A store whose data file is damaged is salvaged (`store.salvage`):
what is still readable is copied into a fresh environment, the damaged one is set aside,
and what could not be recovered is listed; the index is then rebuilt from the salvaged
store, so no search answers with an item the store lost.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

from featurebank.core.bank import (
    DAMAGED,
    Bank,
    candidates,
    current_generation,
    generations,
    newest_manifest,
    write_atomic,
)
from featurebank.core.errors import DamagedFile, FailedPrecondition
from featurebank.core.integrity import (
    CHECKSUMS,
    STAGING,
    problems,
    shard_problems,
    write_checksums,
)
from featurebank.store.env import CURRENT, ENV_PREFIX, EnvHandle
from featurebank.store.rows import get_int
from featurebank.store.verify import Verification, verify

log = logging.getLogger(__name__)


def repair(bank: str | Path | Bank) -> dict[str, Any]:
    """Repair `bank` as far as the store allows; returns what was found, done and left."""
    b = Bank(bank)
    before = verify(b, deep=True)
    actions: list[str] = []
    lost: list[str] = []
    _repair_store_pointer(b, actions)
    salvaged = _salvage_store(b, actions, lost)
    rebuilt = repair_derived(b, actions)
    _set_aside_shards(b, actions)
    if salvaged and not rebuilt["index"] and generations(b.indexes_dir):
        recorded = newest_manifest(b.indexes_dir)
        actions.append(_rebuild(b, "index", recorded) + " (it held items the store lost)")
    after = verify(b, deep=True)
    return {
        "bank": str(b.root),
        "found": [f.message for f in before.findings],
        "actions": actions,
        "left": [f.message for f in after.findings],
        "lost": lost,
        "items_before": before.items,
        "items_after": after.items,
        "severity": "store" if lost else after.severity,
    }


def repair_derived(bank: str | Path | Bank, actions: list[str]) -> dict[str, bool]:
    """Set damaged index and head generations aside, mend their CURRENT, and rebuild what
    has no intact generation left (what a server runs in the background while it serves
    from a fallback); returns which of "index" and "head" were rebuilt."""
    b = Bank(bank)
    return {what: _repair_generations(b, what, parent, actions)
            for what, parent in (("index", b.indexes_dir), ("head", b.heads_dir))}  # fmt: skip


def _set_aside_shards(b: Bank, actions: list[str]) -> None:
    """Damaged shards of an embed job: renamed aside (kept), so the job embeds them again."""
    staging = b.root / STAGING
    if not staging.is_dir():
        return
    stamp = int(time.time())
    for sid in shard_problems(staging, deep=True):
        for path in staging.glob(f"shard-{sid}.*"):
            os.rename(path, staging / f"{DAMAGED}{stamp}-{path.name}")
        actions.append(f"set aside damaged shard {sid} in {staging} (`embed --engine ray` redoes it)")


def _salvage_store(b: Bank, actions: list[str], lost: list[str]) -> bool:
    """Salvage the store when its data cannot be read back; whether a fresh one was written."""
    from featurebank.store.salvage import describe, salvage

    if not _store_unreadable(b):
        return False
    report = salvage(b)
    lines = describe(report, b.store_dir)
    if not report["switched"]:
        lost += lines
        return False
    actions.append(lines[0])
    (lost if report["lost"] != 0 else actions).extend(lines[1:])
    return True


def _store_unreadable(b: Bank) -> bool:
    """Whether some committed item cannot be read back: what a salvage is for."""
    from featurebank.store.verify import unreadable

    if not b.store_dir.is_dir() or not any(b.store_dir.glob(ENV_PREFIX + "*")):
        return False
    return unreadable(b)


def _repair_store_pointer(b: Bank, actions: list[str]) -> None:
    """Point store/CURRENT at the intact environment holding the newest commit."""
    store_dir = b.store_dir
    pointer = store_dir / CURRENT
    try:
        name = pointer.read_text(errors="replace").strip()
    except FileNotFoundError:
        name = "(missing)"
    if name.startswith(ENV_PREFIX) and (store_dir / name).is_dir():
        return
    best = _newest_environment(store_dir)
    if best is None:
        return
    write_atomic(pointer, f"{best}\n".encode())
    actions.append(f"pointed {pointer} at {best} (it named {name[:40]!r})")


def _newest_environment(store_dir: Path) -> str | None:
    """The environment whose data file is intact and holds the highest store generation."""
    import lmdb

    best: tuple[int, str] | None = None
    for env in store_dir.glob(ENV_PREFIX + "*"):
        try:
            handle = EnvHandle(env, create=False, frozen=True)
        except (DamagedFile, lmdb.Error, OSError):
            continue
        try:
            with handle.env.begin() as txn:
                gen = get_int(txn, handle, "generation")
        finally:
            handle.close()
        if best is None or gen > best[0]:
            best = (gen, env.name)
    return None if best is None else best[1]


def _repair_generations(b: Bank, what: str, parent: Path, actions: list[str]) -> bool:
    """Set damaged generations aside and mend CURRENT; whether one had to be rebuilt."""
    order, pointer_damage = candidates(parent)
    damaged = [g for g in order if problems(parent / str(g), deep=True)]
    for gen in [g for g in order if g not in damaged and not (parent / str(g) / CHECKSUMS).exists()]:
        if _loads(b, what, gen):
            write_checksums(parent / str(gen))
            actions.append(f"checked that {what} generation {gen} loads and wrote its {CHECKSUMS}")
        else:
            damaged.append(gen)
    if not pointer_damage and not damaged:
        return False
    recorded = newest_manifest(parent)
    for gen in damaged:
        aside = parent / f"{DAMAGED}{gen}-{int(time.time())}"
        os.rename(parent / str(gen), aside)
        actions.append(f"set aside damaged {what} generation {gen} as {aside}")
    intact = generations(parent)
    try:
        live = current_generation(parent)
    except DamagedFile:
        live = None
    if live in intact:
        return False
    if intact:
        write_atomic(parent / "CURRENT", f"{intact[0]}\n".encode())
        actions.append(f"pointed {parent / 'CURRENT'} at intact {what} generation {intact[0]}")
        return False
    (parent / "CURRENT").unlink(missing_ok=True)  # it names a generation set aside
    actions.append(_rebuild(b, what, recorded))
    return True


def _loads(b: Bank, what: str, gen: int) -> bool:
    """Whether a generation without checksums loads (what sealing it vouches for)."""
    try:
        if what == "index":
            from featurebank.index.views import load_generation

            load_generation(b, gen)
        else:
            from featurebank.classify.published_heads import load_head

            load_head(b, gen)
    except DamagedFile:
        return False
    return True


def _rebuild(b: Bank, what: str, recorded: tuple[int, dict[str, Any]] | None) -> str:
    """Build `what` again from the store, with the params `recorded` (generation, manifest) kept."""
    manifest = recorded[1] if recorded else None
    if what == "index":
        from featurebank.core.params import IndexParams
        from featurebank.index.build import build_index

        params = IndexParams.from_manifest(manifest)
        out = build_index(b, **dataclasses.asdict(params))
        return f"rebuilt the index from the store as generation {out['generation']}"
    from featurebank.classify.head_training import train_head
    from featurebank.core.params import HeadParams

    try:
        out = train_head(b, HeadParams.from_manifest(manifest))
    except FailedPrecondition as e:
        return f"could not retrain the head: {e}"
    return f"retrained the head from the store's labels as generation {out['generation']}"


def print_lines(report: Verification) -> list[str]:
    """`store verify`'s lines: one per finding, then a summary."""
    lines = [f"{f.severity.upper():8} {f.message}" for f in report.findings]
    gens = ", ".join(f"{w} {g or 'none'}" for w, g in report.generations.items())
    items = "unreadable" if report.items is None else f"{report.items} items read back"
    state = "intact" if not report.findings else f"{len(report.findings)} damaged"
    lines.append(f"{report.bank}: {state}; store {items}; generations: {gens}")
    return lines
