"""Whether two near neighbours are copies of one picture, by their thumbnails.

Why: a backbone trained to tell classes apart moves a copy cropped by a pixel a side,
or saved at another size, as far from its original as two different pictures of one
class, so no cut on feature distance finds such copies without taking look-alikes too.
Their pixels still agree: the copy's thumbnail, scaled by the crop it lost, matches its
original's almost exactly, while two different pictures do not.

Each candidate pair (an item and its nearest neighbour however far, or one of its next
nearest closer than `WITHIN` times the bank's typical nearest-neighbour distance) is
compared as grey `SIDE` x `SIDE` signatures of the thumbnails' centres at `SCALES`
(centred crops and resizes of up to about 10 %): the match is the best correlation of
one thumbnail at its own scale with the other at any. Like the feature cut, the cut on
it is calibrated on the bank: a pair is a copy when its mismatch (1 - match) lies
`MATCH_Z` robust standard deviations below the candidates' typical mismatch on a log
scale, and its match is at least `MIN_MATCH` whatever the spread. Items without a
thumbnail (vectors imported without images) are never compared.

Verdicts are kept by store ids across passes (an id names one item for good), so an
update compares only the pairs it has not seen.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from featurebank.classify.quality.graph import robust_log_scale

SIDE = 16  # signature side, pixels
FRAME = 24  # thumbnails are compared at this size (a 96 px JPEG decodes straight to it)
PAD = 3  # the frame's edges are repeated this far out, for the scales that zoom out
DECODE_RUN = 256  # thumbnails a thread decodes at least (fewer: one thread does them all)
SCALES = (0.90, 0.93, 0.96, 1.0, 1.04, 1.08, 1.12)
CANDIDATES = 3  # each item's nearest neighbours compared: the first always, the others
WITHIN = 1.0  # when closer than this times the typical nearest-neighbour distance
MATCH_Z = 3.0
MIN_MATCH = 0.99
FLAT_GREY = 0.5  # a signature varying less than this (grey levels, RMS) has no pattern
CALIBRATE_MIN = 20  # candidate pairs needed to calibrate; fewer: MIN_MATCH alone


def _resampling(scale: float) -> np.ndarray:
    """(SIDE, FRAME + 2 PAD) rows of bilinear weights (widened to antialias when shrinking,
    as PIL's resize does) taking the frame's centre 1/scale of FRAME down to SIDE."""
    width = FRAME + 2 * PAD
    half = FRAME / 2 / scale
    step = 2 * half / SIDE  # input pixels per output pixel
    support = max(1.0, step)
    centres = width / 2 - half + (np.arange(SIDE) + 0.5) * step
    taps = np.arange(width) + 0.5
    w = np.maximum(0.0, 1.0 - np.abs(taps[None, :] - centres[:, None]) / support)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


RESAMPLING = [_resampling(s) for s in SCALES]


def frame(jpeg: bytes) -> np.ndarray | None:
    """A thumbnail as FRAME x FRAME grey pixels (None when it cannot be decoded)."""
    from PIL import Image

    try:
        im = _decoded_small(jpeg)
        if im is None:  # not a plain baseline or progressive JPEG: the general path
            opened = Image.open(io.BytesIO(jpeg))
            opened.draft("L", (FRAME, FRAME))  # decodes straight at a fraction of its size
            im = opened if opened.mode == "L" else opened.convert("L")
        if im.size != (FRAME, FRAME):
            im = im.resize((FRAME, FRAME), Image.Resampling.BILINEAR)
        return np.asarray(im)
    except (OSError, ValueError):
        return None


def frames(jpegs: Sequence[bytes | None]) -> list[np.ndarray | None]:
    """`frame` of each thumbnail (None where it is missing), in one run of them per core:
    Pillow lets go of the GIL while it decodes (6,000 thumbnails: 0.37 s on one thread,
    0.17 s on two here)."""

    def run(lo: int, hi: int) -> list[np.ndarray | None]:
        return [None if j is None else frame(j) for j in jpegs[lo:hi]]

    parts = max(1, min(os.cpu_count() or 1, len(jpegs) // DECODE_RUN))
    if parts == 1:
        return run(0, len(jpegs))
    bounds = np.linspace(0, len(jpegs), parts + 1).astype(int).tolist()
    with ThreadPoolExecutor(parts) as pool:
        return [f for part in pool.map(run, bounds[:-1], bounds[1:]) for f in part]


def _decoded_small(jpeg: bytes) -> Any:
    """The JPEG decoded in grey at the smallest DCT scale still at least FRAME a side, by
    its size read from the frame header; None when the header is not found or the decoder
    refuses. It skips Pillow's marker parsing in Python, a third of a thumbnail's decode."""
    from PIL import Image

    at = 2
    while at + 9 <= len(jpeg) and jpeg[at] == 0xFF:
        marker = jpeg[at + 1]
        if marker == 0xFF:  # a fill byte before the marker
            at += 1
            continue
        if marker in (0xC0, 0xC1, 0xC2):
            h, w = int.from_bytes(jpeg[at + 5:at + 7], "big"), int.from_bytes(jpeg[at + 7:at + 9], "big")
            scale = next(s for s in (8, 4, 2, 1) if s == 1 or min(-(-w // s), -(-h // s)) >= FRAME)
            size = (-(-w // scale), -(-h // scale))
            try:
                return Image.frombytes("L", size, jpeg, "jpeg", "L", "", scale, False)
            except (OSError, ValueError):
                return None
        at += 2 + int.from_bytes(jpeg[at + 2:at + 4], "big")
    return None


def signatures(frames: np.ndarray) -> np.ndarray:
    """(n, len(SCALES), SIDE * SIDE) unit, zero-mean signatures of frames' centres at each
    scale (edges padded), two matrix products a scale for all frames at once."""
    n = len(frames)
    padded = np.pad(frames.astype(np.float32), ((0, 0), (PAD, PAD), (PAD, PAD)), mode="edge")
    width = padded.shape[1]
    out = np.empty((n, len(SCALES), SIDE * SIDE), np.float32)
    for i, a in enumerate(RESAMPLING):
        cols = (padded.reshape(n * width, width) @ a.T).reshape(n, width, SIDE)
        rows = (cols.transpose(0, 2, 1).reshape(n * SIDE, width) @ a.T).reshape(n, SIDE, SIDE)
        out[:, i] = rows.transpose(0, 2, 1).reshape(n, SIDE * SIDE)
    out -= out.mean(axis=2, keepdims=True)
    norms = np.sqrt(np.einsum("ijk,ijk->ij", out, out))[:, :, None]  # in place: no squares copy
    flat = norms < SIDE * FLAT_GREY  # no pattern (a blank picture): matches nothing
    out *= np.where(flat, 0.0, 1.0 / np.where(flat, 1.0, norms)).astype(np.float32)
    return out


def match(a: np.ndarray, b: np.ndarray) -> float:
    """Best correlation of one signature at its own scale (1.0) with the other at any."""
    return float(matches_of(a[None], b[None])[0])


def matches_of(a: np.ndarray, b: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """`match` of each pair of signatures a[i], b[i] ((P, len(SCALES), SIDE * SIDE) each),
    in products over chunks of pairs."""
    own = SCALES.index(1.0)
    out = np.empty(len(a), np.float32)
    for s in range(0, len(a), chunk):
        x, y = a[s:s + chunk], b[s:s + chunk]
        ab = np.einsum("pjk,pk->pj", y, x[:, own]).max(axis=1)
        ba = np.einsum("pjk,pk->pj", x, y[:, own]).max(axis=1)
        out[s:s + chunk] = np.maximum(ab, ba)
    return out


class Looks:
    """Thumbnail matches of candidate pairs, by store ids, kept across passes."""

    def __init__(self) -> None:
        self._matches: dict[tuple[int, int], float] = {}

    def matches(
        self, store: Any, ids: np.ndarray, keys: Sequence[str], pairs: Sequence[tuple[int, int]]
    ) -> np.ndarray:
        """Each row pair's match (nan where either item has no usable thumbnail); only
        pairs not seen before are read and compared."""
        at_rows = np.asarray(pairs, np.int64).reshape(-1, 2)
        key_of = list(zip(ids[at_rows[:, 0]].tolist(), ids[at_rows[:, 1]].tolist(), strict=True))
        new = np.array([k not in self._matches for k in key_of], bool)
        if new.any():
            todo, todo_keys = at_rows[new], [k for k, n in zip(key_of, new, strict=True) if n]
            rows = np.unique(todo)
            decoded = frames(store.thumbnails([keys[r] for r in rows.tolist()]))
            usable = np.array([f is not None for f in decoded], bool)
            slot = np.full(len(ids), -1, np.int64)  # row -> its signature, -1: none usable
            slot[rows[usable]] = np.arange(int(usable.sum()))
            found = np.full(len(todo), np.nan)  # nan where either has no usable thumbnail
            both = np.flatnonzero((slot[todo] >= 0).all(axis=1))
            if len(both):
                sigs = signatures(np.stack([f for f in decoded if f is not None]))
                found[both] = matches_of(sigs[slot[todo[both, 0]]], sigs[slot[todo[both, 1]]])
            self._matches.update(zip(todo_keys, found.tolist(), strict=True))
        self._matches = {k: self._matches[k] for k in key_of}  # forget pairs gone
        return np.array([self._matches[k] for k in key_of], np.float64)


def copies(matches: np.ndarray, z: float = MATCH_Z) -> np.ndarray:
    """Which matches are copies: at least MIN_MATCH and, given enough candidates to
    calibrate on, an outlier of the bank's own mismatches."""
    ok = np.isfinite(matches) & (matches >= MIN_MATCH)
    mismatch = 1.0 - matches[np.isfinite(matches)]
    if mismatch.size < CALIBRATE_MIN:
        return ok
    med, spread = robust_log_scale(mismatch)
    with np.errstate(invalid="ignore"):
        return ok & (np.log(np.maximum(1.0 - matches, 1e-12)) < med - z * spread)
