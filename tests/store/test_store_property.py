"""Random sequences of store operations checked against a plain dict model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from featurebank import store as store_mod
from featurebank.core.errors import InvalidInput, NotFound
from tests.support.specs import make_spec

KEYS = st.sampled_from([f"k{i}" for i in range(24)] + ["é/ü", "long/" + "x" * 600])
LABELS = st.sampled_from(["cat", "dog", "bird", None])
SPLITS = st.sampled_from(["train", "val", "test", "none"])
DIM = 4


class StoreVsDict(RuleBasedStateMachine):
    """The store must always read back exactly what a dict of key -> item says."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.tmp = tempfile.TemporaryDirectory()
        self.bank = Path(self.tmp.name) / "bank"
        self.st = store_mod.create(self.bank, make_spec(dim=DIM, dtype="float16"), block_rows=3)
        self.model: dict[str, dict[str, Any]] = {}
        self.next_value = 0.0

    def teardown(self) -> None:
        self.st.close()
        self.tmp.cleanup()

    @rule(
        keys=st.lists(KEYS, min_size=1, max_size=7, unique=True),
        labels=st.lists(LABELS, min_size=7, max_size=7),
        splits=st.lists(SPLITS, min_size=7, max_size=7),
    )
    def put(self, keys: list[str], labels: list[Any], splits: list[str]) -> None:
        n = len(keys)
        vectors = (self.next_value + np.arange(n * DIM).reshape(n, DIM)).astype(np.float32)
        self.next_value += n * DIM
        if any(k in self.model for k in keys):
            try:
                self.st.put_batch(keys, vectors, labels=labels[:n], splits=splits[:n])
            except InvalidInput:
                return
            raise AssertionError("a batch with a stored key was accepted")
        self.st.put_batch(keys, vectors, labels=labels[:n], splits=splits[:n])
        for k, v, lab, sp in zip(keys, vectors, labels, splits, strict=False):
            self.model[k] = {"vector": v, "label": lab, "split": sp}

    @rule(keys=st.lists(KEYS, min_size=1, max_size=5, unique=True), label=LABELS)
    def upsert(self, keys: list[str], label: Any) -> None:
        n = len(keys)
        vectors = (self.next_value + np.arange(n * DIM).reshape(n, DIM)).astype(np.float32)
        self.next_value += n * DIM
        self.st.put_batch(keys, vectors, labels=[label] * n, replace=True)
        for k, v in zip(keys, vectors, strict=True):
            self.model[k] = {"vector": v, "label": label, "split": "none"}

    @precondition(lambda self: self.model)
    @rule(data=st.data(), label=LABELS, split=SPLITS)
    def relabel(self, data: Any, label: Any, split: str) -> None:
        keys = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1, unique=True))
        self.st.relabel({k: label for k in keys}, {k: split for k in keys[::2]})
        for k in keys:
            self.model[k]["label"] = label
        for k in keys[::2]:
            self.model[k]["split"] = split

    @rule(keys=st.lists(KEYS, min_size=1, max_size=5, unique=True))
    def delete(self, keys: list[str]) -> None:
        if all(k in self.model for k in keys):
            assert self.st.delete(keys) == len(keys)
            for k in keys:
                del self.model[k]
        else:
            try:
                self.st.delete(keys)
            except NotFound:
                return
            raise AssertionError("deleting an unknown key succeeded")

    @rule()
    def compact(self) -> None:
        self.st.compact()

    @rule(readonly=st.booleans())
    def reopen(self, readonly: bool) -> None:
        self.st.close()
        self.st = store_mod.open(self.bank, readonly=readonly)
        if readonly:
            self.st.close()
            self.st = store_mod.open(self.bank)

    @invariant()
    def matches_model(self) -> None:
        items = self.st.to_numpy(dtype=np.float16)
        assert sorted(items.keys) == sorted(self.model)
        assert self.st.count == len(self.model)
        for i, key in enumerate(items.keys):
            m = self.model[key]
            np.testing.assert_array_equal(items.vectors[i], m["vector"].astype(np.float16))
            assert (items.labels[i], items.splits[i]) == (m["label"], m["split"])
        assert items.ids.tolist() == sorted(items.ids.tolist())
        assert self.st.changes_since(0).added.tolist() == items.ids.tolist()
        want = sorted({m["label"] for m in self.model.values()} - {None})
        assert self.st.label_vocabulary() == want
        if self.model:
            key = sorted(self.model)[0]
            assert self.st.get_by_keys([key]).labels == [self.model[key]["label"]]


StoreVsDict.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreVsDict = StoreVsDict.TestCase
