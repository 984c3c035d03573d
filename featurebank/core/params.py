"""The settings of an index build, a head and an embed job: one type each, defaults in one place.

A build persists its `IndexParams` in the generation's manifest; every later
rebuild (the CLI's `index build` and `rebuild`, the server's RebuildIndex, an
update's fallback) starts from the live generation's params and changes only
the fields the caller names, so a transform or budget an operator chose is
never silently dropped.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from featurebank.core.errors import InvalidInput, shown
from featurebank.core.vocabulary import METRICS, POOLINGS, RESIZE_MODES, check_choice

AUTO_TRANSFORM = "auto"  # IndexParams.transform: the metric's default transform


def parse_memory(text: str | int) -> int:
    """'4G', '512M', '100k', '123' -> bytes (binary units), for --memory-budget."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", text)
        if not m:
            raise InvalidInput(f"memory budget {shown(text)}: expected a size like 4G, 512M or 1000000")
        power = " KMGT".index(m.group(2).upper() or " ")
        value = int(float(m.group(1)) * (1024**power))
    if value <= 0:
        raise InvalidInput(f"memory budget must be positive, got {shown(text)}")
    return value


@dataclass(frozen=True)
class IndexParams:
    """What to build: factory (or auto), metric, transform, memory budget, recall target.

    A build or fold whose measured recall@k is below `target_recall` is refused
    (RecallBelowTarget) unless `allow_below_target`; the permission is persisted
    like the other fields, so later folds of that index inherit it.

    `transform` "auto" is the metric's default (`Metric.default_transform`): cl2n (centre
    on the bank's mean, then L2-normalise; measured best for CNN features by
    benchmarks/classify_quality.py) for cosine, none for l2 and ip, whose users ask for
    the nearest by that metric. "auto" is persisted, so a rebuild with another metric
    gets that metric's default; a transform the caller names is kept.
    """

    factory: str = "auto"
    metric: str = "cosine"
    transform: str = AUTO_TRANSFORM
    memory_budget: int = 4 << 30
    target_recall: float = 0.95
    k: int = 10
    allow_below_target: bool = False  # publish an index measured below target_recall
    ondisk: bool = False  # inverted lists in a memory-mapped file beside the index (IVF only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "memory_budget", parse_memory(self.memory_budget))
        if not isinstance(self.factory, str) or not self.factory.strip():
            raise InvalidInput(f"factory must be 'auto' or a faiss factory string, got {shown(self.factory)}")
        if self.metric not in METRICS:
            raise InvalidInput(f"unknown metric {shown(self.metric)}: use one of {', '.join(METRICS)}")
        k = self.k
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise InvalidInput(f"k must be a positive integer, got {k!r}")
        if not isinstance(self.allow_below_target, bool):
            raise InvalidInput(f"allow_below_target must be true or false, got {self.allow_below_target!r}")
        if not isinstance(self.ondisk, bool):
            raise InvalidInput(f"ondisk must be true or false, got {self.ondisk!r}")
        if not 0 < self.target_recall <= 1:
            raise InvalidInput(f"target recall must be in (0, 1], got {self.target_recall}")

    @property
    def resolved_transform(self) -> str:
        """The transform a build applies: the one named, or the metric's default."""
        if self.transform == AUTO_TRANSFORM:
            return METRICS[self.metric].default_transform
        return self.transform

    @property
    def transform_source(self) -> str:
        """Why that transform, in words (index build's summary and the manifest)."""
        if self.transform == AUTO_TRANSFORM:
            return f"the default for metric {self.metric}"
        return "as given"

    def override(self, **changes: Any) -> IndexParams:
        """A copy with the named fields changed; None (or "" from a proto) means "keep"."""
        named = {k: v for k, v in changes.items() if v is not None and v != ""}
        unknown = set(named) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InvalidInput(f"unknown index parameter(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **named)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any] | None) -> IndexParams:
        """The params a generation was built with (older manifests: their separate keys)."""
        if not manifest:
            return cls()
        saved = manifest.get("index_params")
        if isinstance(saved, Mapping):
            return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})
        transform = manifest.get("transform")
        return cls().override(
            factory=manifest.get("requested_factory"),
            metric=manifest.get("metric"),
            transform=transform.get("spec") if isinstance(transform, Mapping) else None,
            memory_budget=manifest.get("memory_budget"),
            target_recall=manifest.get("target_recall"),
            k=manifest.get("k"),
        )


HEAD_CLASS_WEIGHTS = ("balanced", "none")


@dataclass(frozen=True)
class HeadParams:
    """How to train a head: its shape, its optimiser, and how its choices are made.

    A head generation persists its `HeadParams` in its manifest; `head train` and the
    server's RebuildIndex with retrain_head start from the live generation's params
    and change only the fields the caller names. `epochs` is the budget: the epochs
    actually trained are chosen by cross-validation (`folds` stratified folds) within it.
    `denoise` down-weights, in the head's loss, items whose leave-one-out neighbours
    vote for another label (a likely wrong label); see classify/cross_validation.py.
    """

    hidden: int = 0
    dropout: float = 0.2
    epochs: int = 100
    label_smoothing: float = 0.0
    class_weight: str = "balanced"
    learning_rate: float = 1e-2
    stacked: bool = True
    denoise: bool = True
    folds: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        def whole(name: str, low: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise InvalidInput(f"head {name} must be an integer >= {low}, got {v!r}")

        whole("hidden", 0)
        whole("epochs", 1)
        whole("folds", 2)
        whole("seed", 0)
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidInput(f"head dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise InvalidInput(f"head label smoothing must be in [0, 1), got {self.label_smoothing}")
        if not self.learning_rate > 0:
            raise InvalidInput(f"head learning rate must be positive, got {self.learning_rate}")
        if self.class_weight not in HEAD_CLASS_WEIGHTS:
            raise InvalidInput(
                f"head class weight must be one of {', '.join(HEAD_CLASS_WEIGHTS)}, "
                f"got {self.class_weight!r}"
            )

    def override(self, **changes: Any) -> HeadParams:
        """A copy with the named fields changed; None (or "" from a proto) means "keep"."""
        named = {k: v for k, v in changes.items() if v is not None and v != ""}
        unknown = set(named) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InvalidInput(f"unknown head parameter(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **named)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any] | None) -> HeadParams:
        """The params a head generation was trained with (older manifests: their separate keys)."""
        if not manifest:
            return cls()
        saved = manifest.get("head_params")
        source = saved if isinstance(saved, Mapping) else manifest
        return cls().override(**{f.name: source.get(f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class EmbedParams:
    """What an embed job makes of its source: the extractor (what the bank's spec records)
    and how the source is read.

    A job persists its `EmbedParams` in the bank's job record (`BANK/jobs/embed.json`); the
    next job into that bank (`featurebank embed`, `pipeline.embed`, the Ray job) starts from
    them and changes only the fields the caller names, so a resumed or extended bank keeps
    the options it was made with. `backbone` has no default: a new bank must name one.
    None for `layer`, `image_size` and `preprocessing` means the backbone's own.
    """

    backbone: str | None = None
    weights: str = "imagenet"
    layer: str | None = None
    image_size: tuple[int, int] | None = None
    resize: str = "crop"
    pooling: str = "avg"
    preprocessing: str | None = None
    dtype: str = "float16"
    labels: str = "folders"
    max_pixels: int = 100_000_000  # larger images fail, before they are decoded
    follow_links: bool = False
    thumbnails: bool = False

    def __post_init__(self) -> None:
        check_choice(self.resize, RESIZE_MODES, "resize")
        check_choice(self.pooling, POOLINGS, "pooling")
        size = self.image_size
        if size is not None:
            pair = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
            if min(pair) < 1:
                raise InvalidInput(f"image size must be positive, got {size}")
            object.__setattr__(self, "image_size", pair)
        for name in ("follow_links", "thumbnails"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInput(f"{name} must be true or false, got {getattr(self, name)!r}")

    def override(self, **changes: Any) -> EmbedParams:
        """A copy with the named fields changed; None (or "") means "keep"."""
        named = {k: v for k, v in changes.items() if v is not None and v != ""}
        unknown = set(named) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InvalidInput(f"unknown embed option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **named)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> EmbedParams:
        """The params the bank's last embed job used (a record without them: the defaults)."""
        saved = (record or {}).get(EMBED_RECORD_KEY)
        if not isinstance(saved, Mapping):
            return cls()
        return cls().override(**{f.name: saved.get(f.name) for f in dataclasses.fields(cls)})


EMBED_RECORD_KEY = "embed_params"  # where a job record keeps its EmbedParams
