"""Published head generations on disk: publishing one, loading the live one, what `info` shows.

Why one module: the files of a generation (heads/<gen>/: head, stacked head,
calibration, out-of-fold probabilities, manifest) are written and read in one place, so
a server swapping heads and a command describing them agree on what a generation holds.
The manifest's `format` says which layout a generation has (absent: the Keras heads
of format 1, which still load); a newer one than this code reads gets a one-line error.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurebank.classify.abstain import CALIBRATION_FILE, load_calibration, save_calibration
from featurebank.classify.head_model import FORMAT, Head
from featurebank.core.bank import Bank, current_generation, publish, staging_dir
from featurebank.core.errors import FailedPrecondition, NotFound
from featurebank.store import BankLike, Store, borrowed

log = logging.getLogger(__name__)

HEAD_FILE = "head.npz"
STACKED_FILE = "stacked.npz"
MANIFEST = "manifest.json"
OUT_OF_FOLD_FILE = "out_of_fold.npz"


@dataclass
class LoadedHead:
    """One published head generation: the plain head, the stacked head, calibration, manifest."""

    generation: int
    manifest: dict[str, Any]
    head: Head
    stacked: Head | None
    calibration: dict[str, tuple[np.ndarray, np.ndarray]]
    out_of_fold: dict[str, np.ndarray] | None = None
    """Per labelled item (ids, codes, scored) each mode's out-of-fold probabilities."""

    @property
    def vocabulary(self) -> list[str]:
        return list(self.manifest["vocabulary"])

    @property
    def hybrid(self) -> dict[str, Any]:
        return dict(self.manifest["hybrid"])


def _bank(bank: BankLike) -> Bank:
    """The bank directory of a path, Bank or open Store (heads are files: no store needed)."""
    return bank.bank if isinstance(bank, Store) else Bank(bank)


def load_head(bank: BankLike, generation: int | None = None) -> LoadedHead | None:
    """The live (or given) head generation, or None when no head was ever trained."""
    b = _bank(bank)
    gen = generation if generation is not None else current_generation(b.heads_dir)
    if gen is None:
        return None
    d = b.heads_dir / str(gen)
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except FileNotFoundError as e:
        raise NotFound(f"head generation {gen} in {b.heads_dir} is incomplete: {e}") from e
    except ValueError as e:
        raise FailedPrecondition(f"head generation {gen}: {d / MANIFEST} is damaged: {e}") from e
    version = int(manifest.get("format", 1))
    if version > FORMAT:
        raise FailedPrecondition(
            f"head generation {gen} in {b.heads_dir} has format {version}; this featurebank "
            f"reads formats up to {FORMAT}: upgrade featurebank or retrain the head"
        )
    if not (d / HEAD_FILE).exists():
        raise NotFound(f"head generation {gen} in {b.heads_dir} is incomplete: no {HEAD_FILE}")
    head = Head.load(d / HEAD_FILE)
    stacked = Head.load(d / STACKED_FILE) if (d / STACKED_FILE).exists() else None
    oof = None
    if (d / OUT_OF_FOLD_FILE).exists():
        with np.load(d / OUT_OF_FOLD_FILE, allow_pickle=False) as z:
            oof = {k: z[k] for k in z.files}
    return LoadedHead(gen, manifest, head, stacked, load_calibration(d / CALIBRATION_FILE), oof)


def publish_head(
    b: Bank,
    manifest: dict[str, Any],
    head: Head,
    stacked: Head | None,
    calibration: dict[str, tuple[np.ndarray, np.ndarray]],
    out_of_fold: dict[str, np.ndarray] | None = None,
    keep: int = 2,
) -> int:
    """Write a generation's files into staging and make it the live one, all or nothing."""
    staging = staging_dir(b.heads_dir)
    try:
        head.save(staging / HEAD_FILE)
        files = {"head": HEAD_FILE}
        if stacked is not None:
            stacked.save(staging / STACKED_FILE)
            files["stacked"] = STACKED_FILE
        if calibration:
            save_calibration(staging / CALIBRATION_FILE, calibration)
            files["calibration"] = CALIBRATION_FILE
        if out_of_fold is not None:
            np.savez(staging / OUT_OF_FOLD_FILE, **out_of_fold)  # type: ignore[arg-type]
            files["out_of_fold"] = OUT_OF_FOLD_FILE
        manifest["files"] = files
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, default=_json_default))
        return publish(b.heads_dir, staging, keep=keep)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def labels_generation_of(manifest: dict[str, Any]) -> int:
    """The store's labels generation a head was trained on (-1 when unknown)."""
    return int(manifest.get("labels_generation", -1))


def is_stale(manifest: dict[str, Any], store_labels_generation: int) -> bool:
    """A head is stale once the store's labels changed after it was trained."""
    return store_labels_generation > labels_generation_of(manifest)


def hybrid_mode(manifest: dict[str, Any]) -> str:
    """What hybrid answers with: "hybrid", or the single mode cross-validation preferred."""
    return str(manifest.get("hybrid", {}).get("acts_as", "hybrid"))


def live_manifest(bank: str | Path | Bank) -> dict[str, Any] | None:
    """The live head generation's manifest, None when there is no head."""
    b = Bank(bank)
    gen = current_generation(b.heads_dir)
    if gen is None:
        return None
    manifest: dict[str, Any] = json.loads((b.heads_dir / str(gen) / MANIFEST).read_text())
    manifest["generation"] = gen
    return manifest


def head_status(bank: BankLike) -> dict[str, Any] | None:
    """What `store info` and `head info` show about the head; None when there is none.

    A head is stale once labels changed after it was trained (the store's
    labels_generation moved past the one recorded in the head's manifest).
    """
    with borrowed(bank) as st:
        manifest = live_manifest(st.bank)
        if manifest is None:
            return None
        store_labels = int(st.labels_generation)
    trained_on = labels_generation_of(manifest)
    scores = manifest.get("cv_metrics") or manifest.get("val_metrics", {})
    return {
        "generation": manifest["generation"],
        "created": manifest.get("created"),
        "classes": len(manifest.get("vocabulary", [])),
        "hidden": manifest.get("hidden", 0),
        "labels_generation": trained_on,
        "store_labels_generation": store_labels,
        "stale": is_stale(manifest, store_labels),
        "hybrid_a": manifest.get("hybrid", {}).get("a"),
        "hybrid_acts_as": hybrid_mode(manifest),
        "cv_accuracy": {m: v.get("accuracy") for m, v in scores.items()},
    }


def _json_default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
