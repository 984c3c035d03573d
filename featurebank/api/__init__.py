"""The Python front door: `create`, `open` and `connect` give a bank with one set of calls.

    import featurebank as fb
    bank = fb.create("bank", backbone="model.keras", layer="features")   # in this process
    bank = fb.open("bank")
    bank = fb.connect("host:4464", token="...")                          # over gRPC

Both answer `embed`, `search`, `classify`, `suggest`, `audit`, `info`, `upsert`,
`set_labels`, `delete`, `build_index`, `train_head`, and the queries `recommend`, `scroll`,
`count` and `set_metadata` (filters on search and classify) with the same result types
(featurebank.api.results). See docs/python.md.
"""

from featurebank.api.base import FeatureBank
from featurebank.api.inputs import Keys, keys
from featurebank.api.local import LocalBank, create
from featurebank.api.local import open_bank as open  # noqa: A001 - fb.open(path), like io.open
from featurebank.api.remote import RemoteBank, connect
from featurebank.api.results import (
    Batch,
    Classification,
    Duplicate,
    Finding,
    Hits,
    Info,
    Item,
    Kept,
    Leak,
    Neighbor,
    Outlier,
    Page,
    Published,
    Quality,
    SplitCheck,
    Suggestion,
    Written,
)
from featurebank.api.serving import Served

__all__ = [
    "Batch", "Classification", "Duplicate", "FeatureBank", "Finding", "Hits", "Info", "Item", "Kept",
    "Keys", "Leak", "LocalBank", "Neighbor", "Outlier", "Page", "Published", "Quality", "RemoteBank",
    "Served", "SplitCheck", "Suggestion", "Written", "connect", "create", "keys", "open",
]  # fmt: skip
