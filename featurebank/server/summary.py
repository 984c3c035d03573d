"""What a bank holds, in brief: store counts, the live index and the live head, read from disk.

`featurebank store info` prints it; one function, so the CLI reads no manifest itself.
It sits in the server layer beside the served bank's `info` (the layer that sees both the
index and the head) and imports neither gRPC nor TensorFlow, so the CLI reads a bank
with no server running.
"""

from __future__ import annotations

from typing import Any

from featurebank.classify.published_heads import head_status
from featurebank.core.bank import Bank, current_generation
from featurebank.core.errors import DamagedFile
from featurebank.core.integrity import require_intact
from featurebank.index.views import read_manifest
from featurebank.store import BankLike, borrowed

INDEX_FIELDS = ("factory", "metric", "ntotal", "k", "recall_at_k", "recall_lower_bound",
                "recall_confidence", "target_recall", "target_reached", "store_generation",
                "index_params", "transform")


def index_status(bank: Bank) -> dict[str, Any] | None:
    """The live index generation's manifest fields users read; None before the first build."""
    indexes = bank.indexes_dir
    try:
        gen = current_generation(indexes)
        if gen is None:
            return None
        require_intact(indexes / str(gen))
        manifest = read_manifest(indexes / str(gen))
    except DamagedFile as e:
        return {"damaged": str(e)}
    return {"generation": gen, **{k: manifest.get(k) for k in INDEX_FIELDS}}


def bank_status(bank: BankLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(statistics with "index" and "head" entries, the list of recorded embedding errors)."""
    with borrowed(bank) as st:
        stats = st.stats()
        errors = st.errors()
        stats["index"] = index_status(st.bank)
        stats["head"] = head_status(st)
    return stats, errors
