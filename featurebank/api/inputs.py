"""Whatever a notebook holds, as one of three things a bank answers: images, vectors or keys.

Every read and write of the Python API takes one argument `x`; this module decides what it
is, once, for both the bank in process and the bank over gRPC:

- a path to an image file, a folder (every image under it, keys relative to it), or a list
  of paths; encoded image bytes; a PIL image; a uint8 or float array `(H, W, C)` (one image)
  or `(N, H, W, C)` (a batch), C being 1, 3 or 4: images;
- a 1-d array or list of numbers (one vector), a 2-d array `(N, D)` or a list of vectors:
  vectors (a grayscale image needs its channel axis, `(H, W, 1)`, to be told from vectors);
- `featurebank.keys("a.png", ...)`: stored items, by key. A plain string is always a path,
  so a key is never mistaken for a file (and a missing file is never taken for a key).

A single input gives a single result, a batch gives a list in the same order. Anything
else is an InvalidInput naming what `x` was.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurebank.core.errors import InvalidInput, NotFound, shown
from featurebank.embedder import folders
from featurebank.embedder.images import array_to_rgb, png_bytes
from featurebank.embedder.sources import DECODABLE_EXTS

IMAGES, VECTORS, KEYS = "images", "vectors", "keys"
INPUT_FORMS = (
    "a path, a folder, a list of paths, image bytes, a PIL image, an image array "
    "(H,W,C) or (N,H,W,C), a vector or (N,D) array, or featurebank.keys(...)"
)


@dataclass(frozen=True)
class Keys:
    """Stored items named by key, as `x` of a read (`featurebank.keys(...)` makes one)."""

    values: tuple[str, ...]


def keys(*names: str | Iterable[str]) -> Keys:
    """Refer to stored items by key: `bank.search(fb.keys("cat/1.png"))` or `fb.keys(list_)`.

    Keys are told apart explicitly because a key often looks like a path (it is one,
    relative to the folder it was embedded from).
    """
    flat: list[str] = []
    for n in names:
        if isinstance(n, str):
            flat.append(n)
        elif isinstance(n, Iterable):
            flat.extend(n)
        else:
            raise InvalidInput(f"keys must be strings, got {type(n).__name__}")
    bad = [k for k in flat if not isinstance(k, str) or not k]
    if bad:
        raise InvalidInput(f"keys must be non-empty strings, got {shown(bad[0])}")
    return Keys(tuple(flat))


@dataclass
class Query:
    """`x` resolved: images (encoded bytes or uint8 RGB arrays), vectors (N, D) or keys.

    `names` is each item's default key (a file's path relative to the folder given, or its
    name); `folder_labels` the class subfolder of each image of a folder with class folders.
    """

    kind: str
    batched: bool
    images: list[bytes | np.ndarray] = field(default_factory=list)
    vectors: np.ndarray | None = None
    keys: list[str] = field(default_factory=list)
    names: list[str | None] = field(default_factory=list)
    folder_labels: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        if self.kind == IMAGES:
            return len(self.images)
        if self.kind == VECTORS:
            assert self.vectors is not None
            return int(self.vectors.shape[0])
        return len(self.keys)


def as_query(x: Any) -> Query:
    """Resolve `x` (see the module docstring); InvalidInput / NotFound say what was wrong."""
    if isinstance(x, Keys):
        if not x.values:
            raise InvalidInput("featurebank.keys() got no keys")
        return Query(KEYS, batched=len(x.values) != 1, keys=list(x.values))
    if isinstance(x, np.ndarray):
        return _array(x)
    if isinstance(x, list | tuple):
        return _sequence(x)
    if _is_number(x) or x is None:
        raise InvalidInput(f"x: got {shown(x)}; expected {INPUT_FORMS}")
    q = _sequence([x])
    q.batched = len(q) != 1 or _is_folder(x)
    return q


def _is_folder(x: Any) -> bool:
    return isinstance(x, str | os.PathLike) and Path(x).expanduser().is_dir()


def _array(a: np.ndarray) -> Query:
    if not np.issubdtype(a.dtype, np.number) or a.dtype.kind == "c":
        raise InvalidInput(f"x: an array of {a.dtype} is neither images nor vectors")
    if a.size == 0:
        raise InvalidInput(f"x: the array is empty (shape {a.shape})")
    if a.ndim == 1:
        return Query(VECTORS, batched=False, vectors=_vectors(a[None, :]))
    if a.ndim == 2:
        return Query(VECTORS, batched=True, vectors=_vectors(a))
    if a.ndim == 3:
        return Query(IMAGES, batched=False, images=[_pixels(a, "x")], names=[None])
    if a.ndim == 4:
        rng = _float_range(a)
        pixels: list[bytes | np.ndarray] = [
            _pixels(img, f"x[{i}]", rng) for i, img in enumerate(a)
        ]
        return Query(IMAGES, batched=True, images=pixels, names=[None] * len(a))
    raise InvalidInput(
        f"x: an array of shape {a.shape} is neither images (H,W,C) / (N,H,W,C) "
        "nor vectors (D,) / (N,D)"
    )


def _vectors(a: np.ndarray) -> np.ndarray:
    v = np.asarray(a, dtype=np.float32)
    if not np.isfinite(v).all():
        raise InvalidInput("x: the vectors contain NaN or infinity")
    return np.ascontiguousarray(v)


def _float_range(a: np.ndarray) -> str:
    """Floats are 0-1 or 0-255 for a whole batch at once (as the batch embed job decides)."""
    if not np.issubdtype(a.dtype, np.floating):
        return "auto"
    return "0-1" if float(np.nanmax(a)) <= 1.0 else "0-255"


def _pixels(a: np.ndarray, where: str, float_range: str = "auto") -> np.ndarray:
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise InvalidInput(
            f"{where}: an image array must be (H, W, C) with C = 1, 3 or 4, got shape {a.shape}"
        )
    try:
        return array_to_rgb(a, float_range)
    except InvalidInput as e:
        raise InvalidInput(f"{where}: {e}") from None


def _sequence(items: Sequence[Any]) -> Query:
    if len(items) == 0:
        raise InvalidInput("x: got an empty list (nothing to embed, search or classify)")
    if all(_is_number(v) for v in items):
        return Query(VECTORS, batched=False, vectors=_vectors(np.asarray(items, np.float64)[None]))
    if all(_is_vector(v) for v in items):
        rows = [np.asarray(v, dtype=np.float64).ravel() for v in items]
        if len({len(r) for r in rows}) != 1:
            raise InvalidInput(f"x: vectors of different lengths {sorted({len(r) for r in rows})}")
        return Query(VECTORS, batched=True, vectors=_vectors(np.stack(rows)))
    q = Query(IMAGES, batched=True)
    for i, item in enumerate(items):
        _add_image(q, item, f"x[{i}]" if len(items) > 1 else "x")
    return q


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | np.number) and not isinstance(v, bool)


def _is_vector(v: Any) -> bool:
    if isinstance(v, np.ndarray):
        return v.ndim == 1 and np.issubdtype(v.dtype, np.number)
    return isinstance(v, list | tuple) and len(v) > 0 and all(_is_number(e) for e in v)


def _add_image(q: Query, item: Any, where: str) -> None:
    if isinstance(item, Keys):
        raise InvalidInput(f"{where}: keys cannot be mixed with other inputs; pass keys alone")
    if isinstance(item, bytes | bytearray | memoryview):
        data = bytes(item)
        if not data:
            raise InvalidInput(f"{where}: empty image bytes")
        q.images.append(data)
        q.names.append(None)
        q.folder_labels.append(None)
    elif isinstance(item, str | os.PathLike):
        _add_path(q, Path(item).expanduser(), where)
    elif isinstance(item, np.ndarray):
        if item.ndim == 4:
            raise InvalidInput(f"{where}: a batch (N,H,W,C) inside a list; pass the batch alone")
        q.images.append(_pixels(item, where))
        q.names.append(None)
        q.folder_labels.append(None)
    elif _is_pil(item):
        q.images.append(_pil_pixels(item))
        q.names.append(getattr(item, "filename", None) and Path(item.filename).name or None)
        q.folder_labels.append(None)
    else:
        raise InvalidInput(f"{where}: got {type(item).__name__}; expected {INPUT_FORMS}")


def _add_path(q: Query, path: Path, where: str) -> None:
    if path.is_dir():
        listing = folders.list_images(path, DECODABLE_EXTS)
        if not listing.files:
            raise InvalidInput(f"{where}: no image files under folder {path}")
        nested = any("/" in key for key, _ in listing.files)
        for key, full in listing.files:
            q.images.append(_read(Path(full), where))
            q.names.append(key)
            q.folder_labels.append(key.split("/", 1)[0] if nested and "/" in key else None)
        return
    if not path.exists():
        raise NotFound(
            f"{where}: no such file or folder {shown(str(path))} "
            "(to name stored items, use featurebank.keys(...))"
        )
    q.images.append(_read(path, where))
    q.names.append(path.name)
    q.folder_labels.append(None)


def _read(path: Path, where: str) -> bytes:
    try:
        data = folders.read_regular_file(str(path), 1 << 30)
    except OSError as e:
        raise InvalidInput(f"{where}: cannot read {path}: {e.strerror or e}") from None
    if not data:
        raise InvalidInput(f"{where}: {path} is empty (0 bytes)")
    return data


def _is_pil(item: Any) -> bool:
    return any(c.__module__.startswith("PIL.") for c in type(item).__mro__)


def _pil_pixels(im: Any) -> np.ndarray:
    from featurebank.embedder.images import to_rgb

    return np.asarray(to_rgb(im), dtype=np.uint8)


def check_dim(vectors: np.ndarray, dim: int) -> None:
    """Vectors of another dimension than the bank's: say so, and how images are told apart."""
    got = int(vectors.shape[1])
    if got != dim:
        raise InvalidInput(
            f"x: {len(vectors)} vector(s) of dimension {got}, the bank's dimension is {dim} "
            "(an image array needs a channel axis: (H, W, C) or (N, H, W, C))"
        )


def encoded(item: bytes | np.ndarray) -> bytes:
    """An image of a Query as bytes to send: files as they are, arrays as PNG."""
    return item if isinstance(item, bytes) else png_bytes(item)
