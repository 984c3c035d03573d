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
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurebank.classify.abstain import CALIBRATION_FILE, load_calibration, save_calibration
from featurebank.classify.head_model import FORMAT, Head
from featurebank.core.bank import Bank, current_generation, load_newest_intact, publish_files
from featurebank.core.errors import DamagedFile
from featurebank.core.integrity import read_json, require_intact
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
    if generation is None:
        return load_live_head(b)
    d = b.heads_dir / str(generation)
    if not d.is_dir():
        raise DamagedFile(f"head generation {d} is missing")
    manifest = read_json(d / MANIFEST, "the head manifest")
    try:
        version = int(manifest.get("format", 1))
        if version > FORMAT:
            raise DamagedFile(
                f"head generation {d} has format {version}; this featurebank reads formats up "
                f"to {FORMAT}: upgrade featurebank or retrain the head"
            )
        head = Head.load(d / HEAD_FILE)
        stacked = Head.load(d / STACKED_FILE) if (d / STACKED_FILE).exists() else None
        calibration = load_calibration(d / CALIBRATION_FILE)
        oof = None
        if (d / OUT_OF_FOLD_FILE).exists():
            with np.load(d / OUT_OF_FOLD_FILE, allow_pickle=False) as z:
                oof = {k: z[k] for k in z.files}
    except FileNotFoundError as e:
        raise DamagedFile(f"head generation {d} is incomplete ({e.filename} is missing)") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DamagedFile(f"head generation {d} is damaged ({e})") from None
    return LoadedHead(generation, manifest, head, stacked, calibration, oof)


def load_live_head(bank: BankLike) -> LoadedHead | None:
    """The live head, or the newest intact one when it is damaged; None if none was trained."""
    b = _bank(bank)
    found = load_newest_intact(b.heads_dir, lambda n: load_head(b, n), "head")
    return None if found is None else found[1]


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

    def write(staging: Path) -> None:
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

    return publish_files(b.heads_dir, write, "head", keep=keep)


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
    manifest = read_json(b.heads_dir / str(gen) / MANIFEST, "the head manifest")
    manifest["generation"] = gen
    return manifest


def head_status(bank: BankLike) -> dict[str, Any] | None:
    """What `store info` and `head info` show about the head; None when there is none.

    A head is stale once labels changed after it was trained (the store's
    labels_generation moved past the one recorded in the head's manifest).
    """
    with borrowed(bank) as st:
        try:
            gen = current_generation(st.bank.heads_dir)
            if gen is not None:
                require_intact(st.bank.heads_dir / str(gen))
            manifest = live_manifest(st.bank)
        except DamagedFile as e:
            return {"damaged": str(e)}
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
