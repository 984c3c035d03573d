"""The words every layer shares, each defined once.

argparse `choices`, the server's checks, the proto enum mappings and the store's
split codes all derive from these tuples and tables, so adding a mode or a split
is one edit here (and one in the .proto for the wire).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featurebank.core.errors import InvalidInput, shown

# ---- splits ---------------------------------------------------------------------------------

SPLITS = ("train", "val", "test", "none")
"""Every split an item can be in; the order is the store's on-disk split code."""

TRAIN_SPLITS = ("train", "none")
"""Items heads are trained on and neighbours vote from (val is for choices, test held out)."""

EVAL_SPLITS = ("test", "val", "train")
"""Splits an evaluation can score."""

HELD_OUT_SPLIT = "test"
"""Test items keep their labels for display but never vote."""

SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "valid": "val",
                 "test": "test", "none": "none", "": "none"}
"""Split names a source (a manifest's split column) may use, and the split each means."""

# ---- classification ---------------------------------------------------------------------------

MODES = ("knn", "head", "hybrid", "stacked")
VOTE_WEIGHTS = ("uniform", "distance", "softmax")
UNKNOWN = "unknown"
"""The label answered when a classifier abstains."""
SUGGEST_STRATEGIES = ("margin", "entropy", "diverse")
"""How `suggest` ranks unlabelled items; the first is the default."""
HEAD_INITS = ("probe", "random")
"""Where fine-tuning starts the head: the bank's linear probe (LP-FT, the default) or at random."""

# ---- embedding --------------------------------------------------------------------------------

RESIZE_MODES = ("crop", "pad", "stretch")
POOLINGS = ("avg", "max", "flatten")
PREPROCESSINGS = ("tf", "caffe", "torch", "raw0-255", "raw0-1")
STORE_DTYPES = ("float16", "float32")
LABEL_SOURCES = ("folders", "manifest", "none")
DEVICES = ("auto", "cpu", "gpu")
"""Where models run: auto is every local GPU if there is one, else the CPU."""
PRECISIONS = ("auto", "mixed", "float32")
"""What models compute in: auto is mixed on GPUs, float32 on the CPU."""


def check_choice(value: str, choices: tuple[str, ...] | dict[str, object], what: str) -> str:
    """`value` if it is one of `choices`, else InvalidInput naming `what` and the choices."""
    if value not in choices:
        raise InvalidInput(f"{what} must be one of {', '.join(choices)}, got {shown(value)}")
    return value


# ---- metrics ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """A similarity the index searches by, and how its FAISS distances become scores.

    Cosine is searched as squared L2 on unit vectors: the same order as inner
    product, and graph and PCA indexes work on distances (a centred PCA does not
    preserve inner products).
    """

    name: str
    faiss_kind: str  # "l2" or "ip": the FAISS metric the index is built with
    unit_vectors: bool  # vectors are L2-normalised before indexing
    # The transform an index gets when none is named: cosine, the default metric, is for
    # classification (cl2n measured best for CNN features); l2 and ip are asked for to get
    # the nearest by that metric of the vectors as given, so nothing changes them.
    default_transform: str = "none"

    def scores(self, dist: np.ndarray) -> np.ndarray:
        """FAISS distances -> similarity scores (higher = closer).

        l2: -Euclidean distance; cosine: 1 - d/2, the cosine similarity; ip: as is.
        """
        if self.name == "l2":
            return -np.sqrt(np.maximum(dist, 0.0))
        if self.name == "cosine":
            return 1.0 - dist / 2.0
        return np.array(dist, copy=True)

    def distances(self, scores: np.ndarray) -> np.ndarray:
        """Scores back to distances (Euclidean, or cosine 1 - s), for distance-weighted votes."""
        if self.name == "l2":
            return np.maximum(-scores, 0.0)
        return np.maximum(1.0 - scores, 0.0)


METRICS: dict[str, Metric] = {
    "cosine": Metric("cosine", "l2", unit_vectors=True, default_transform="cl2n"),
    "ip": Metric("ip", "ip", unit_vectors=False),
    "l2": Metric("l2", "l2", unit_vectors=False),
}


def metric(name: str) -> Metric:
    """The Metric called `name`; InvalidInput naming the known ones otherwise."""
    try:
        return METRICS[name]
    except KeyError:
        raise InvalidInput(f"unknown metric {shown(name)}: use one of {', '.join(METRICS)}") from None
