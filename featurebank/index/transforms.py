"""Feature transforms fitted on the bank and stored beside the index.

Why: kNN on raw backbone features is often worse than on centred, normalised or
PCA-reduced ones (CL2N: "SimpleShot", Wang et al. 2019), and the very same
transform must be applied to queries at search time, so it is fitted once at
build time and saved with the index generation it belongs to.

Specs: ``none`` | ``l2`` | ``cl2n`` | ``pca:D`` | ``pca-whiten:D``.
For the cosine metric the output is always L2-normalised (inner product on unit
vectors is cosine similarity).
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurebank.core.errors import DamagedFile, FailedPrecondition, InvalidInput

FILE_NAME = "transform.npz"
PCA_MAX_SAMPLE = 200_000
_SPEC = re.compile(r"^(none|l2|cl2n|pca|pca-whiten)(?::(\d+))?$")


def parse(spec: str) -> tuple[str, int | None]:
    """'pca:64' -> ('pca', 64); bad strings -> InvalidInput listing what is accepted."""
    m = _SPEC.match(spec.strip().lower())
    if not m:
        raise InvalidInput(f"unknown transform {spec!r}: use none, l2, cl2n, pca:D or pca-whiten:D")
    kind, dim = m.group(1), m.group(2)
    if kind.startswith("pca") and dim is None:
        raise InvalidInput(f"transform {spec!r} needs a dimension, e.g. {kind}:64")
    if not kind.startswith("pca") and dim is not None:
        raise InvalidInput(f"transform {kind!r} takes no dimension (got {spec!r})")
    return kind, (int(dim) if dim is not None else None)


def check_fits(spec: str, in_dim: int) -> None:
    """Fail early (before reading the bank) when a PCA target cannot fit the dimension."""
    _, dim = parse(spec)
    if dim is not None and not 0 < dim <= in_dim:
        raise InvalidInput(
            f"transform {spec!r} does not fit vectors of dimension {in_dim}: "
            f"the output dimension must be between 1 and {in_dim}"
        )


def as_vectors(x: object, dim: int, what: str = "vectors") -> np.ndarray:
    """Validate a query/bank batch: 2-D (or one 1-D vector), the right width, all finite."""
    arr = np.asarray(x)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise InvalidInput(f"{what}: expected a 2-D array (n, {dim}), got shape {arr.shape}")
    if arr.shape[1] != dim:
        raise InvalidInput(f"{what}: expected dimension {dim}, got {arr.shape[1]}")
    if arr.dtype.kind not in "fiu":
        raise InvalidInput(f"{what}: expected numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)[:5].tolist()
        raise InvalidInput(f"{what}: NaN or infinite values in rows {bad}")
    return arr


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


@dataclass
class Transform:
    """A fitted transform: subtract `mean`, project by `matrix`, then maybe L2-normalise."""

    spec: str
    in_dim: int
    out_dim: int
    normalize: bool
    mean: np.ndarray | None = None  # (in_dim,)
    matrix: np.ndarray | None = None  # (in_dim, out_dim), whitening folded in

    def apply(self, x: np.ndarray) -> np.ndarray:
        """What the index stores for vectors `x` (already validated, float32)."""
        y = x
        if self.mean is not None:
            y = y - self.mean
        if self.matrix is not None:
            y = y @ self.matrix
        if self.normalize:
            y = l2_normalize(y)
        if y is x:
            return x
        return np.ascontiguousarray(y, dtype=np.float32)

    def to_dict(self) -> dict[str, object]:
        return {
            "spec": self.spec,
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "normalize": self.normalize,
            "file": FILE_NAME if (self.mean is not None or self.matrix is not None) else None,
        }

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The transform as named arrays: what `save` writes, and what a head embeds."""
        arrays: dict[str, np.ndarray] = {f"{prefix}meta": np.array(json.dumps(self.to_dict()))}
        if self.mean is not None:
            arrays[f"{prefix}mean"] = np.asarray(self.mean, np.float32)
        if self.matrix is not None:
            arrays[f"{prefix}matrix"] = np.asarray(self.matrix, np.float32)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = "") -> Transform:
        """What `to_arrays` wrote (KeyError when its meta is missing)."""
        meta = json.loads(str(arrays[f"{prefix}meta"]))
        return cls(
            spec=meta["spec"],
            in_dim=int(meta["in_dim"]),
            out_dim=int(meta["out_dim"]),
            normalize=bool(meta["normalize"]),
            mean=arrays.get(f"{prefix}mean"),
            matrix=arrays.get(f"{prefix}matrix"),
        )

    @classmethod
    def identity(cls, dim: int) -> Transform:
        """The transform that changes nothing ("none", no normalisation)."""
        return cls("none", dim, dim, False)

    def save(self, directory: Path) -> None:
        with open(directory / FILE_NAME, "wb") as f:
            np.savez(f, **self.to_arrays())  # type: ignore[arg-type]

    @classmethod
    def load(cls, directory: Path) -> Transform:
        path = directory / FILE_NAME
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls.from_arrays({k: z[k] for k in z.files})
        except FileNotFoundError:
            raise DamagedFile(f"{path} is missing (index generation {directory.name})") from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise DamagedFile(f"{path} is damaged ({e})") from None


def fit(spec: str, sample: np.ndarray, normalize_output: bool = False) -> Transform:
    """Fit `spec` on bank vectors (a sample is enough for the mean and PCA axes).

    `normalize_output` forces L2 normalisation of the output (the cosine metric).
    """
    kind, dim = parse(spec)
    in_dim = sample.shape[1]
    check_fits(spec, in_dim)
    if sample.shape[0] == 0:
        raise FailedPrecondition(f"cannot fit transform {spec!r} on an empty bank")
    if sample.shape[0] > PCA_MAX_SAMPLE:
        pick = np.random.default_rng(0).choice(sample.shape[0], PCA_MAX_SAMPLE, replace=False)
        sample = sample[np.sort(pick)]
    if kind == "none":
        return Transform(spec, in_dim, in_dim, normalize_output)
    if kind == "l2":
        return Transform(spec, in_dim, in_dim, True)
    x = sample.astype(np.float64)
    mean = x.mean(axis=0)
    if kind == "cl2n":
        return Transform(spec, in_dim, in_dim, True, mean=mean.astype(np.float32))
    assert dim is not None
    if sample.shape[0] < 2:
        raise FailedPrecondition(f"transform {spec!r} needs at least 2 vectors to fit")
    matrix = pca_matrix(x - mean, dim, whiten=kind == "pca-whiten")
    return Transform(
        spec, in_dim, dim, normalize_output, mean=mean.astype(np.float32), matrix=matrix
    )


def pca_matrix(centred: np.ndarray, dim: int, whiten: bool) -> np.ndarray:
    """Top-`dim` principal axes as columns (in_dim, dim), scaled to unit variance if whitening."""
    cov = centred.T @ centred / max(centred.shape[0] - 1, 1)
    eigvals, eigvecs = np.linalg.eigh(cov)
    order = np.argsort(eigvals)[::-1][:dim]
    axes = eigvecs[:, order]
    # Fix each axis' sign so the same data always gives the same matrix.
    signs = np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(dim)])
    axes = axes * np.where(signs == 0, 1.0, signs)
    if whiten:
        vals = np.maximum(eigvals[order], 1e-6 * max(float(eigvals.max()), 1e-12))
        axes = axes / np.sqrt(vals)
    return np.ascontiguousarray(axes, dtype=np.float32)
