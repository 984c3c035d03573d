"""What the vectors of a bank mean, fixed when the bank is created.

Two vectors are only comparable when the same backbone, weights, input size,
resizing, preprocessing, pooling, dimension and dtype produced them, so the
store refuses anything made under another spec and says which two differ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from featurebank.core.errors import InvalidInput, SpecMismatch
from featurebank.core.vocabulary import STORE_DTYPES

EXTERNAL = "external"
"""The weights identity of vectors made outside featurebank (imported, no model here)."""
# Fields that say where a file lives rather than what the vectors mean.
_LOCATION_FIELDS = ("weights_path",)


@dataclass(frozen=True)
class Spec:
    """Identity of the feature extractor behind every vector of a bank."""

    backbone: str
    weights: str
    input_size: tuple[int, int] | None
    resize: str = "crop"
    preprocessing: str = "none"
    pooling: str = "avg"
    dim: int = 0
    dtype: str = "float32"
    weights_path: str | None = field(default=None, compare=False)  # where, not what: not equality
    layer: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in STORE_DTYPES:
            raise InvalidInput(f"spec dtype must be one of {STORE_DTYPES}, got {self.dtype!r}")
        if not isinstance(self.dim, int) or self.dim < 0:
            raise InvalidInput(f"spec dim must be a non-negative int, got {self.dim!r}")
        if self.input_size is not None:
            size = tuple(int(v) for v in self.input_size)
            if len(size) != 2 or min(size) <= 0:
                raise InvalidInput(f"spec input_size must be (height, width), got {size}")
            object.__setattr__(self, "input_size", size)

    @classmethod
    def external(cls, model: str, dim: int, dtype: str = "float32") -> Spec:
        """The spec of vectors made elsewhere by `model` (no image can be embedded here)."""
        return cls(backbone=model, weights=EXTERNAL, input_size=None, resize="none",
                   preprocessing="none", pooling="none", dim=dim, dtype=dtype)

    @property
    def has_model(self) -> bool:
        """Whether featurebank can embed images for this bank: the one test every layer uses."""
        return self.weights != EXTERNAL

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size) if self.input_size is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Spec:
        """Rebuild a spec from `to_dict` output; unknown keys (from newer versions) are ignored."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if kwargs.get("input_size") is not None:
            kwargs["input_size"] = tuple(kwargs["input_size"])
        return cls(**kwargs)

    def describe(self) -> str:
        """One line naming everything that makes vectors comparable, for error messages."""
        size = f"{self.input_size[0]}x{self.input_size[1]}" if self.input_size else "no-input-size"
        layer = f" layer={self.layer}" if self.layer else ""
        return (
            f"{self.backbone}{layer} weights={self.weights} {size} resize={self.resize} "
            f"preprocessing={self.preprocessing} pooling={self.pooling} "
            f"dim={self.dim} {self.dtype}"
        )

    @property
    def model_file(self) -> bool:
        """Whether the backbone is the user's own model file (named by its path)."""
        return self.weights.startswith("sha256:") and Path(self.backbone).is_absolute()

    def identity(self) -> dict[str, Any]:
        """The fields that must match (file locations may differ between machines).

        A model file's path is where it was, not what it is: its sha256 (the weights
        identity) says that, so a moved model still matches its bank.
        """
        d = self.to_dict()
        for name in _LOCATION_FIELDS:
            d.pop(name)
        if self.model_file:
            d["backbone"] = "model file"
        return d

    def check_same(self, other: Spec) -> None:
        """Refuse `other` unless it produces vectors comparable with this spec."""
        mine, theirs = self.identity(), other.identity()
        if mine == theirs:
            return
        diff = ", ".join(f"{k}: {mine[k]!r} vs {theirs[k]!r}" for k in mine if mine[k] != theirs[k])
        raise SpecMismatch(
            f"spec mismatch ({diff}): bank has [{self.describe()}], got [{other.describe()}]"
        )
