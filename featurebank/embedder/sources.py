"""Where images come from: a folder tree, a CSV/TSV manifest, or an array file.

Every source becomes the same list of records (key, label, split), read one at a time
by `load`, so the pipeline does not care which kind it is. Keys are stable across runs
(relative paths, or `file#row`), which is what lets a rerun skip what is stored.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from featurebank.core.errors import InvalidInput, NotFound
from featurebank.core.vocabulary import LABEL_SOURCES, SPLIT_ALIASES, check_choice
from featurebank.embedder import folders, images
from featurebank.store.metadata import check_user_meta

# Files the decoder supports, and other image files listed so that they are reported as
# unsupported rather than dropped silently. Anything else in a folder is ignored (counted).
DECODABLE_EXTS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib"}
OTHER_IMAGE_EXTS = {".webp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".ico", ".jp2",
                    ".ppm", ".pgm", ".pbm", ".pnm", ".svg", ".psd", ".tga"}  # fmt: skip
IMAGE_EXTS = DECODABLE_EXTS | OTHER_IMAGE_EXTS
MANIFEST_EXTS = {".csv", ".tsv", ".tab", ".txt"}
HDF5_EXTS = (".h5", ".hdf5", ".hdf")


@dataclass(frozen=True)
class Record:
    """One input: its stable key, label, split and user metadata, and where to read it from."""

    key: str
    label: str | None = None
    split: str = "none"
    path: str | None = None  # absolute file path (file sources)
    row: int = -1  # row of an array source
    meta: dict[str, Any] = field(default_factory=dict, hash=False)  # the store's user map


class Source:
    """A list of records plus a way to load one as RGB pixels at the model's size."""

    kind = "files"

    def __init__(
        self,
        description: str,
        records: list[Record],
        ignored: int = 0,
        skipped: list[str] | None = None,
    ) -> None:
        self.description = description
        self.records = records
        self.ignored = ignored
        self.skipped = skipped or []  # folders left out of a folder source, with why
        keys = [r.key for r in records]
        if len(set(keys)) != len(keys):
            seen: set[str] = set()
            for key in keys:
                if key in seen:
                    raise InvalidInput(f"source {description} lists key {key!r} more than once")
                seen.add(key)

    def __len__(self) -> int:
        return len(self.records)

    def load(
        self,
        rec: Record,
        size: tuple[int, int] | None,
        resize: str,
        max_pixels: int = images.DEFAULT_MAX_PIXELS,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Pixels (h, w, 3) uint8 and source metadata; ImageError says why an input failed.

        Only regular files are read (a FIFO named like an image would block forever),
        and at most max(64 MiB, 4 bytes per allowed pixel) of them.
        """
        assert rec.path is not None
        try:
            data = folders.read_regular_file(rec.path, max(64 << 20, 4 * max_pixels))
        except FileNotFoundError as e:
            raise images.ImageError("file not found (deleted after listing?)") from e
        except (folders.NotRegularFile, folders.FileTooLarge) as e:
            raise images.ImageError(str(e)) from e
        except OSError as e:
            raise images.ImageError(f"unreadable: {e.strerror or e}") from e
        uri = folders.storable_key(rec.path)
        meta = {"uri": uri, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        return images.decode(data, size, resize, max_pixels), meta

    def close(self) -> None:
        pass


class ArraySource(Source):
    """Images held in an array (N, H, W[, C]): a .npy/.npz file or an HDF5 dataset."""

    kind = "arrays"

    def __init__(
        self, description: str, array: Any, labels: list[str | None] | None, closer: Any = None
    ) -> None:
        shape = tuple(array.shape)
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3, 4)):
            raise InvalidInput(
                f"{description}: image array must be (N, H, W) or (N, H, W, 1|3|4), got {shape}"
            )
        if labels is not None and len(labels) != shape[0]:
            raise InvalidInput(f"{description}: {len(labels)} labels for {shape[0]} images")
        self.array = array
        self._closer = closer
        self.float_range = _float_range(array)
        records = [
            Record(key=f"{description}#{i}", label=labels[i] if labels else None, row=i)
            for i in range(shape[0])
        ]
        super().__init__(description, records)

    def load(
        self,
        rec: Record,
        size: tuple[int, int] | None,
        resize: str,
        max_pixels: int = images.DEFAULT_MAX_PIXELS,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        pixels = np.asarray(self.array[rec.row])
        try:
            out = images.prepare_array(pixels, size, resize, self.float_range)
        except InvalidInput as e:
            raise images.ImageError(str(e)) from e
        return out, {"uri": rec.key}

    def close(self) -> None:
        if self._closer is not None:
            self._closer()


def _float_range(array: Any) -> str:
    """Decide once per source whether float pixels are 0-1 or 0-255 (not per image)."""
    if not np.issubdtype(np.dtype(array.dtype), np.floating):
        return "auto"
    head = np.asarray(array[: min(len(array), 256)], dtype=np.float64)
    return "0-1" if head.size and np.nanmax(head) <= 1.0 else "0-255"


# ------------------------------------------------------------------ opening


def check_exists(source: str | os.PathLike[str]) -> Path:
    """The file or folder a SOURCE argument names (an HDF5 file without its dataset part),
    or NotFound: cheap, so a command checks it before it starts a model."""
    text = os.fspath(source)
    h5 = _split_hdf5(text)
    path = h5[0] if h5 is not None else Path(text).expanduser()
    if not path.exists():
        raise NotFound(f"source {text} does not exist")
    return path


def open_source(
    source: str | os.PathLike[str],
    labels: str = "folders",
    follow_links: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> Source:
    """Turn a SOURCE argument into records: folder, manifest, .npy/.npz, or `file.h5:dataset`.

    labels: "folders" takes class subfolders (or a manifest's / array file's own labels),
    "manifest" insists on a manifest's label column, "none" stores everything unlabelled.
    follow_links: walk directory symlinks of a folder source (never into a folder
    already walked); by default they are left out and listed in `Source.skipped`.
    meta: user metadata for every record (`--meta`); a manifest's own columns win per row.
    """
    src = _open_source(source, labels, follow_links)
    if meta:
        if src.records:
            _checked_meta(src.records[0].key, dict(meta), "--meta")
        src.records = [replace(r, meta={**meta, **r.meta}) for r in src.records]
    return src


def _open_source(source: str | os.PathLike[str], labels: str, follow_links: bool) -> Source:
    check_choice(labels, LABEL_SOURCES, "--labels")
    text = os.fspath(source)
    h5 = _split_hdf5(text)
    if h5 is not None:
        return _open_hdf5(h5[0], h5[1], h5[2], labels)
    path = check_exists(text)
    if path.is_dir():
        if labels == "manifest":
            raise InvalidInput(f"--labels manifest needs a CSV/TSV manifest, {text} is a folder")
        return _open_directory(path, labels, follow_links)
    ext = path.suffix.lower()
    if ext in (".npy", ".npz"):
        return _open_numpy(path, labels)
    if ext in MANIFEST_EXTS:
        return _open_manifest(path, labels)
    raise InvalidInput(
        f"source {text}: expected a folder, a .csv/.tsv manifest, a .npy/.npz file "
        "or file.h5:dataset"
    )


SPLIT_FOLDERS = {name for name, split in SPLIT_ALIASES.items() if split != "none"}
"""Top folders that name splits (`train/ val/ test/`, as image_dataset_from_directory users
lay data out); class folders sit inside them."""


def _open_directory(root: Path, labels: str, follow_links: bool) -> Source:
    listing = folders.list_images(root, IMAGE_EXTS, follow_links)
    nested = any("/" in rel for rel, _ in listing.files)
    by_split = bool(listing.files) and all(
        "/" in rel and rel.split("/", 1)[0].lower() in SPLIT_FOLDERS for rel, _ in listing.files
    )
    records = []
    for rel, full in listing.files:
        split, inner = "none", rel
        if by_split:
            top, inner = rel.split("/", 1)
            split = SPLIT_ALIASES[top.lower()]
        deep = (nested and not by_split) or "/" in inner
        label = inner.split("/", 1)[0] if labels == "folders" and deep and "/" in inner else None
        records.append(Record(key=rel, label=label, split=split, path=full))
    if not records:
        raise InvalidInput(
            f"no image files under {root} ({listing.ignored} other files ignored"
            + (f", {len(listing.skipped)} folders left out" if listing.skipped else "")
            + ")"
        )
    return Source(str(root), records, listing.ignored, listing.skipped)


_PATH_NAMES = {"path", "file", "filename", "image", "uri"}
_LABEL_NAMES = {"label", "class", "category"}
META_PREFIX = "meta."
META_COLUMN = "metadata"


def typed(text: str) -> Any:
    """A metadata value written as text: a number, true/false, or else the text itself
    (JSON-quoted text, e.g. "42", stays a string)."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (str, int, float, bool)) else text


def parse_meta_args(pairs: list[str] | None) -> dict[str, Any]:
    """`--meta KEY=VALUE` options as a map (values typed as `typed` says)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise InvalidInput(f"--meta {pair!r}: expected KEY=VALUE, e.g. --meta camera=4")
        out[name.strip()] = typed(value.strip())
    return out


def _checked_meta(key: str, meta: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        return check_user_meta(key, meta)
    except InvalidInput as e:
        raise InvalidInput(f"{where}: {e}") from None


def _row_meta(
    key: str, cells: list[str], columns: dict[str, int], json_col: int | None, where: str
) -> dict[str, Any]:
    """A manifest row's metadata: its `metadata` JSON object, then its `meta.NAME` cells."""
    out: dict[str, Any] = {}
    if json_col is not None and json_col < len(cells) and cells[json_col]:
        try:
            value = json.loads(cells[json_col])
        except json.JSONDecodeError as e:
            raise InvalidInput(f"{where}: the metadata column is not JSON ({e.msg})") from None
        if not isinstance(value, dict):
            raise InvalidInput(f"{where}: the metadata column must be a JSON object")
        out.update(value)
    for name, i in columns.items():
        if i < len(cells) and cells[i]:
            out[name] = typed(cells[i])
    return _checked_meta(key, out, where) if out else out


def _open_manifest(path: Path, labels: str) -> Source:
    """`path[,label][,split][,key]` rows, with or without a header naming those columns;
    a header's `meta.NAME` columns and `metadata` (a JSON object) column give user metadata."""
    base = path.parent
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise InvalidInput(f"manifest {path} line {line}: not valid UTF-8 ({e.reason})") from None
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip() and not ln.startswith("#")), "")
    ext = path.suffix.lower()
    tabs = ext in (".tsv", ".tab") or (ext == ".txt" and "\t" in first)
    delim = "\t" if tabs else ","
    rows = [
        (n, row)
        for n, row in enumerate(csv.reader(lines, delimiter=delim), start=1)
        if row and any(c.strip() for c in row) and not row[0].startswith("#")
    ]
    if not rows:
        raise InvalidInput(f"manifest {path} lists no images")
    head = [c.strip().lower() for c in rows[0][1]]
    cols: dict[str, int]
    meta_cols: dict[str, int] = {}
    if _PATH_NAMES & set(head):
        cols = {}
        for i, name in enumerate(head):
            if name in _PATH_NAMES:
                cols.setdefault("path", i)
            elif name in _LABEL_NAMES:
                cols.setdefault("label", i)
            elif name in ("split", "key", META_COLUMN):
                cols.setdefault(name, i)
            elif name.startswith(META_PREFIX) and len(name) > len(META_PREFIX):
                meta_cols[rows[0][1][i].strip()[len(META_PREFIX) :]] = i
        rows = rows[1:]
    else:
        cols = {"path": 0, "label": 1, "split": 2, "key": 3}
    if labels == "manifest" and "label" not in cols:
        raise InvalidInput(f"--labels manifest: manifest {path} has no label column")
    records = []
    for n, row in rows:
        cells = [c.strip() for c in row]

        def cell(name: str, cells: list[str] = cells) -> str:
            i = cols.get(name)
            return cells[i] if i is not None and i < len(cells) else ""

        rel = cell("path")
        if not rel:
            raise InvalidInput(f"manifest {path} line {n}: empty path")
        split = cell("split").lower()
        if split not in SPLIT_ALIASES:
            raise InvalidInput(
                f"manifest {path} line {n}: split {cell('split')!r} is not train, val, test or none"
            )
        label = cell("label") or None
        full = Path(rel) if os.path.isabs(rel) else base / rel
        key = cell("key") or Path(os.path.normpath(rel)).as_posix()
        where = f"manifest {path} line {n}"
        meta = _row_meta(key, cells, meta_cols, cols.get(META_COLUMN), where)
        records.append(
            Record(
                key=key,
                label=label if labels != "none" else None,
                split=SPLIT_ALIASES[split],
                path=str(full),
                meta=meta,
            )
        )
    return Source(str(path), records)


def _labels_list(values: Any, where: str) -> list[str | None]:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise InvalidInput(f"{where}: labels must be 1-D, got shape {arr.shape}")
    out: list[str | None] = []
    for v in arr.tolist():
        if isinstance(v, bytes):
            v = v.decode("utf-8")
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        s = str(v)
        out.append(s if s != "" else None)
    return out


def _open_numpy(path: Path, labels: str) -> Source:
    if labels == "manifest":
        raise InvalidInput(f"--labels manifest needs a CSV/TSV manifest, not {path.name}")
    lab: list[str | None] | None = None
    if path.suffix.lower() == ".npz":
        z = np.load(path, allow_pickle=False)
        key = next((k for k in ("images", "x", "X", "pixels") if k in z.files), None)
        if key is None:
            raise InvalidInput(f"{path}: no 'images' or 'x' array (has {', '.join(z.files)})")
        array = z[key]
        lkey = next((k for k in ("labels", "y", "Y") if k in z.files), None)
        if labels != "none" and lkey is not None:
            lab = _labels_list(z[lkey], str(path))
        return ArraySource(path.name, array, lab)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise InvalidInput(f"{path}: not a plain .npy array ({e})") from e
    for cand in (path.with_name(path.stem + "_labels.npy"), path.with_suffix(".labels.npy")):
        if labels != "none" and cand.is_file():
            lab = _labels_list(np.load(cand, allow_pickle=False), str(cand))
            break
    return ArraySource(path.name, array, lab)


def _split_hdf5(text: str) -> tuple[Path, str | None, str | None] | None:
    """`file.h5[:dataset[:labels]]` -> parts, or None when `text` is not an HDF5 source."""
    for ext in HDF5_EXTS:
        i = text.lower().find(ext)
        if i < 0:
            continue
        end = i + len(ext)
        if end < len(text) and text[end] != ":":
            continue
        rest = text[end + 1 :].split(":") if end < len(text) else []
        ds = rest[0] if rest and rest[0] else None
        lab = rest[1] if len(rest) > 1 and rest[1] else None
        return Path(text[:end]).expanduser(), ds, lab
    return None


def _open_hdf5(path: Path, dataset: str | None, label_ds: str | None, labels: str) -> Source:
    import h5py

    if not path.is_file():
        raise NotFound(f"source {path} does not exist")
    if labels == "manifest":
        raise InvalidInput(f"--labels manifest needs a CSV/TSV manifest, not {path.name}")
    f = h5py.File(path, "r")
    try:
        names: list[str] = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        if dataset is None:
            cands = [n for n in names if f[n].ndim in (3, 4) and f[n].shape[0] > 0]
            if len(cands) != 1:
                raise InvalidInput(
                    f"{path}: say which dataset holds the images, as {path.name}:NAME "
                    f"(datasets: {', '.join(names)})"
                )
            dataset = cands[0]
        if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
            raise NotFound(f"{path} has no dataset {dataset!r} (datasets: {', '.join(names)})")
        lab = None
        if labels != "none":
            parent = dataset.rsplit("/", 1)[0] + "/" if "/" in dataset else ""
            for cand in [label_ds] if label_ds else [f"{dataset}_labels", f"{parent}labels"]:
                if cand in f and isinstance(f[cand], h5py.Dataset):
                    lab = _labels_list(f[cand][()], f"{path}:{cand}")
                    break
            else:
                if label_ds:
                    raise NotFound(f"{path} has no labels dataset {label_ds!r}")
        return ArraySource(f"{path.name}:{dataset}", f[dataset], lab, closer=f.close)
    except BaseException:
        f.close()
        raise
