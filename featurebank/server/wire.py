"""The proto's enums and the vocabulary's names, mapped in one place (derived, not listed).

Adding a mode to featurebank.core.vocabulary.MODES and `MODE_<NAME>` to the .proto is
all the wire needs; the servicer and the client both read these tables.
"""

from __future__ import annotations

from featurebank.core.vocabulary import MODES, SUGGEST_STRATEGIES
from featurebank.v1 import featurebank_pb2 as pb

MODE_VALUES: dict[str, pb.Mode.ValueType] = {m: pb.Mode.Value(f"MODE_{m.upper()}") for m in MODES}
"""Mode name -> proto enum value."""

MODE_NAMES: dict[int, str] = {v: k for k, v in MODE_VALUES.items()}
"""Proto enum value -> mode name (MODE_UNSPECIFIED is absent: the server's default)."""

STRATEGY_VALUES: dict[str, pb.Strategy.ValueType] = {
    s: pb.Strategy.Value(f"STRATEGY_{s.upper()}") for s in SUGGEST_STRATEGIES
}
"""Suggest strategy name -> proto enum value."""

STRATEGY_NAMES: dict[int, str] = {
    pb.STRATEGY_UNSPECIFIED: SUGGEST_STRATEGIES[0], **{v: k for k, v in STRATEGY_VALUES.items()}
}
"""Proto enum value -> strategy name (STRATEGY_UNSPECIFIED: the default, margin)."""
