"""featurebank: a feature-embedding store with similarity search and classification over gRPC.

    import featurebank as fb
    bank = fb.open("bank")            # or fb.create(...), fb.connect("host:port")
    bank.classify(images)

The names below come from featurebank.api, imported on first use (PEP 562), so
`import featurebank` stays light: it loads neither TensorFlow nor gRPC.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from featurebank.api import (
        Batch,
        Classification,
        Duplicate,
        FeatureBank,
        Finding,
        Hits,
        Info,
        Item,
        Kept,
        Keys,
        Leak,
        LocalBank,
        Neighbor,
        Outlier,
        Page,
        Published,
        Quality,
        RemoteBank,
        Served,
        SplitCheck,
        Suggestion,
        Written,
        connect,
        create,
        keys,
        open,
    )

__all__ = [
    "Batch", "Classification", "Duplicate", "FeatureBank", "Finding", "Hits", "Info", "Item", "Kept",
    "Keys", "Leak", "LocalBank", "Neighbor", "Outlier", "Page", "Published", "Quality", "RemoteBank",
    "Served", "SplitCheck", "Suggestion", "Written", "connect", "create", "keys", "open",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    """The public API's names, loaded from featurebank.api when first asked for."""
    if name in __all__:
        return getattr(importlib.import_module("featurebank.api"), name)
    raise AttributeError(f"module 'featurebank' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
