"""Embedding-like test data and small real banks for the index tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurebank import store as store_mod
from featurebank.core.spec import Spec


@dataclass
class World:
    """Clusters in a low-dimensional latent space mapped linearly to `dim` dimensions.

    Centres have the same spread as the points around them, so clusters overlap
    like real embeddings do (not separable blobs, not isotropic noise).
    """

    centres: np.ndarray  # (c, latent)
    mapping: np.ndarray  # (latent, dim)
    noise: float

    @classmethod
    def make(cls, dim: int, latent: int = 16, centres: int = 50, noise: float = 0.05,
             seed: int = 0) -> World:
        rng = np.random.default_rng(seed)
        return cls(
            rng.standard_normal((centres, latent)),
            rng.standard_normal((latent, dim)) / np.sqrt(latent),
            noise,
        )

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        cluster = rng.integers(0, len(self.centres), n)
        z = self.centres[cluster] + rng.standard_normal((n, self.centres.shape[1]))
        x = z @ self.mapping + self.noise * rng.standard_normal((n, self.mapping.shape[1]))
        return x.astype(np.float32), cluster


def spec(dim: int) -> Spec:
    return Spec(backbone="external", weights="external", input_size=None, resize="none",
                preprocessing="none", pooling="none", dim=dim, dtype="float32")


def make_bank(
    root: Path,
    vectors: np.ndarray,
    labels: list[str | None] | None = None,
    splits: list[str] | None = None,
    prefix: str = "item",
) -> Path:
    """A real bank (LMDB store) holding `vectors`, keyed prefix-0, prefix-1, ..."""
    with store_mod.create(root, spec(vectors.shape[1])) as st:
        st.put_batch([f"{prefix}-{i}" for i in range(len(vectors))], vectors, labels, splits)
    return root


def exact_ids(base: np.ndarray, queries: np.ndarray, k: int, metric: str = "l2") -> np.ndarray:
    """Brute-force neighbours in numpy (float64), positions into `base`."""
    b, q = base.astype(np.float64), queries.astype(np.float64)
    if metric == "l2":
        d = (q**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * q @ b.T
    else:
        if metric == "cosine":
            b = b / np.linalg.norm(b, axis=1, keepdims=True)
            q = q / np.linalg.norm(q, axis=1, keepdims=True)
        d = -(q @ b.T)
    return np.argsort(d, axis=1, kind="stable")[:, :k]
