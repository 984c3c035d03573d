"""Every kind of bad input gets a clear error naming the key, and commits nothing."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.core.errors import InvalidInput, NotFound, SpecMismatch
from tests.support.specs import make_spec, make_vectors

GOOD = ["a", "b", "c"]


def _with(row: int, value: float) -> np.ndarray:
    v = make_vectors(3)
    v[row, 2] = value
    return v


# (keys, vectors, extra put_batch kwargs, error class, text the message must contain)
BAD_BATCHES: dict[str, tuple[Any, Any, dict[str, Any], type, str]] = {
    "wrong dim": (GOOD, make_vectors(3, 9), {}, SpecMismatch, "dimension 9"),
    "empty, wrong dim": ([], make_vectors(0, 9), {}, SpecMismatch, "dimension 9"),
    "not 2-d": (GOOD, np.zeros((3, 2, 4), np.float32), {}, SpecMismatch, "2-D"),
    "int dtype": (GOOD, np.zeros((3, 8), np.int64), {}, SpecMismatch, "int64"),
    "not an array": (GOOD, [[0.0] * 8] * 3, {}, InvalidInput, "numpy array"),
    "nan": (GOOD, _with(1, np.nan), {}, InvalidInput, "'b'"),
    "inf": (GOOD, _with(2, -np.inf), {}, InvalidInput, "'c'"),
    "count mismatch": (GOOD, make_vectors(2), {}, InvalidInput, "2 vectors for 3 keys"),
    "duplicate key": (["a", "b", "a"], make_vectors(3), {}, InvalidInput, "'a' appears twice"),
    "empty key": (["a", "", "c"], make_vectors(3), {}, InvalidInput, "key #1 is empty"),
    "non-str key": (["a", 7, "c"], make_vectors(3), {}, InvalidInput, "key #1 must be str"),
    "nul in key": (["a", "b\x00", "c"], make_vectors(3), {}, InvalidInput, "NUL"),
    "surrogate key": (["a", "b\udcff", "c"], make_vectors(3), {}, InvalidInput, "UTF-8"),
    "single str keys": ("abc", make_vectors(3), {}, InvalidInput, "not a single str"),
    "label not str": (GOOD, make_vectors(3), {"labels": ["x", 3, None]}, InvalidInput, "'b'"),
    "empty label": (GOOD, make_vectors(3), {"labels": ["x", "", None]}, InvalidInput, "'b'"),
    "label too long": (
        GOOD,
        make_vectors(3),
        {"labels": [None, None, "x" * 401]},
        InvalidInput,
        "'c'",
    ),
    "labels count": (GOOD, make_vectors(3), {"labels": ["x"]}, InvalidInput, "1 labels"),
    "bad split": (
        GOOD,
        make_vectors(3),
        {"splits": ["train", "holdout", "val"]},
        InvalidInput,
        "'b'",
    ),
    "meta not dict": (GOOD, make_vectors(3), {"meta": [{}, {}, "x"]}, InvalidInput, "'c'"),
    "meta not json": (
        GOOD,
        make_vectors(3),
        {"meta": [{"f": object()}, {}, {}]},
        InvalidInput,
        "'a'",
    ),
    "other spec": (
        GOOD,
        make_vectors(3),
        {"spec": make_spec(backbone="ResNet50")},
        SpecMismatch,
        "ResNet50",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_bad_batch_is_refused_whole(store: store_mod.Store, case: str) -> None:
    keys, vectors, kwargs, error, text = BAD_BATCHES[case]
    store.put_batch(["before"], make_vectors(1))
    gen = store.generation
    with pytest.raises(error) as e:
        store.put_batch(keys, vectors, **kwargs)
    assert text in str(e.value)
    assert store.generation == gen and store.count == 1
    assert store.missing(["a", "c"]) == ["a", "c"]


def test_float16_overflow_is_refused(bank: Any) -> None:
    with store_mod.create(bank, make_spec(dtype="float16")) as st:
        with pytest.raises(InvalidInput, match="'b'.*float16 range"):
            st.put_batch(GOOD, _with(1, 1e6))
        assert st.count == 0


def test_key_already_stored_refuses_the_whole_batch(store: store_mod.Store) -> None:
    store.put_batch(["b"], make_vectors(1))
    with pytest.raises(InvalidInput, match="'b' is already in bank"):
        store.put_batch(GOOD, make_vectors(3))
    assert store.missing(GOOD) == ["a", "c"] and store.count == 1
    assert store.put_batch(["a", "c"], make_vectors(2)).tolist() == [1, 2]


@pytest.mark.parametrize(
    "mapping, text",
    [
        ({"a": "x", "ghost": "y"}, "'ghost' is not in bank"),
        ({"a": "x", "b": 5}, "label for key 'b'"),
        ({"a": "x", "b\udcff": "y"}, "UTF-8"),
        ({"a": "x", "b": "\udcff"}, "label for key 'b'"),
    ],
)
def test_bad_relabel_changes_nothing(store: store_mod.Store, mapping: Any, text: str) -> None:
    store.put_batch(GOOD, make_vectors(3))
    gen = store.generation
    with pytest.raises(InvalidInput) as e:
        store.set_labels(mapping)
    assert text in str(e.value)
    assert store.generation == gen and store.to_numpy().labels == [None] * 3


def test_bad_split_changes_nothing(store: store_mod.Store) -> None:
    store.put_batch(GOOD, make_vectors(3))
    with pytest.raises(InvalidInput, match="split for key 'c'.*holdout"):
        store.set_splits({"a": "train", "c": "holdout"})
    with pytest.raises(InvalidInput, match="'zz' is not in bank"):
        store.set_splits({"a": "train", "zz": "val"})
    assert store.to_numpy().splits == ["none"] * 3


def test_bad_ids_and_keys_on_reads(store: store_mod.Store) -> None:
    store.put_batch(GOOD, make_vectors(3))
    with pytest.raises(InvalidInput, match="integers"):
        store.get([0.5])
    with pytest.raises(NotFound, match="id 7"):
        store.get([7])
    with pytest.raises(InvalidInput, match="UTF-8"):
        store.missing(["\udcff"])
    with pytest.raises(InvalidInput, match="batch_size"):
        next(store.iter_batches(batch_size=0))
