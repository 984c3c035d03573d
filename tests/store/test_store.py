"""Unit tests of every store operation on a real LMDB environment."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.core.errors import FailedPrecondition, InvalidInput, NotFound, SpecMismatch
from featurebank.core.spec import Spec
from tests.support.specs import make_spec, make_vectors

KEYS = [f"img/{i:03d}.jpg" for i in range(10)]
LABELS = ["cat", "dog", None, "cat", "bird", None, "dog", "cat", "bird", "dog"]
SPLITS = ["train", "train", "val", "test", "none", "train", "val", "train", "test", "none"]


def fill(st: store_mod.Store, n: int = 10) -> np.ndarray:
    vectors = make_vectors(n)
    st.put_batch(
        KEYS[:n],
        vectors,
        labels=LABELS[:n],
        splits=SPLITS[:n],
        meta=[{"uri": f"file:///{k}", "size": i} for i, k in enumerate(KEYS[:n])],
    )
    return vectors


# ---- spec -------------------------------------------------------------------------------------


def test_spec_round_trip_and_describe() -> None:
    spec = Spec(
        "MobileNetV2",
        "imagenet",
        (224, 224),
        "crop",
        "mobilenet_v2",
        "avg",
        1280,
        "float16",
        weights_path="/w.h5",
    )
    again = Spec.from_dict(spec.to_dict())
    assert again == spec and again.input_size == (224, 224)
    assert "MobileNetV2" in spec.describe() and "dim=1280" in spec.describe()
    spec.check_same(dataclasses.replace(spec, weights_path="/elsewhere.h5"))


def test_spec_mismatch_names_both_specs() -> None:
    a = make_spec(dim=8)
    with pytest.raises(SpecMismatch) as e:
        a.check_same(make_spec(dim=16))
    assert a.describe() in str(e.value) and make_spec(dim=16).describe() in str(e.value)


def test_spec_refuses_bad_dtype() -> None:
    with pytest.raises(InvalidInput, match="dtype"):
        make_spec(dtype="int8")


# ---- create / open ----------------------------------------------------------------------------


def test_create_then_open_keeps_spec(bank: Path) -> None:
    spec = make_spec(dim=12, dtype="float16")
    with store_mod.create(bank, spec):
        pass
    with store_mod.open(bank, readonly=True) as st:
        assert st.spec == spec
        assert st.generation == 0 and st.count == 0
        assert st.path == bank / "store"


def test_open_without_store_is_not_found(bank: Path) -> None:
    with pytest.raises(NotFound, match="no store"):
        store_mod.open(bank)


def test_create_twice_refused_unless_exist_ok(bank: Path) -> None:
    with store_mod.create(bank, make_spec()):
        pass
    with pytest.raises(FailedPrecondition, match="already has a store"):
        store_mod.create(bank, make_spec())
    with store_mod.create(bank, make_spec(), exist_ok=True) as st:
        assert st.spec == make_spec()
    with pytest.raises(SpecMismatch):
        store_mod.create(bank, make_spec(dim=9), exist_ok=True)


def test_open_or_create(bank: Path) -> None:
    with store_mod.open_or_create(bank, make_spec()) as st:
        st.put_batch(["a"], make_vectors(1))
    with store_mod.open_or_create(bank, make_spec()) as st:
        assert st.count == 1
    with pytest.raises(SpecMismatch, match="dim: 8 vs 9"):
        store_mod.open_or_create(bank, make_spec(dim=9))


def test_create_needs_a_dimension(bank: Path) -> None:
    with pytest.raises(InvalidInput, match="dim"):
        store_mod.create(bank, make_spec(dim=0))


def test_readonly_store_refuses_writes(store: store_mod.Store) -> None:
    fill(store)
    with store_mod.open(store.bank.root, readonly=True) as ro:
        with pytest.raises(FailedPrecondition, match="read-only"):
            ro.put_batch(["new"], make_vectors(1))
        with pytest.raises(FailedPrecondition):
            ro.set_labels({KEYS[0]: "x"})
        assert ro.count == 10


# ---- put / get --------------------------------------------------------------------------------


def test_put_batch_assigns_sequential_ids_and_reads_back(store: store_mod.Store) -> None:
    vectors = fill(store, 7)
    ids = store.put_batch(KEYS[7:], make_vectors(3, seed=1))
    assert ids.dtype == np.uint64 and ids.tolist() == [7, 8, 9]
    items = store.get([8, 0, 3])
    assert items.keys == [KEYS[8], KEYS[0], KEYS[3]]
    np.testing.assert_array_equal(items.vectors[1:], vectors[[0, 3]])
    assert items.vectors.dtype == np.float32
    assert items.labels == [None, "cat", "cat"]
    assert items.splits == ["none", "train", "test"]
    assert items.meta[1]["uri"] == f"file:///{KEYS[0]}" and items.meta[1]["size"] == 0
    assert items.meta[0]["added"] > 1.6e9
    assert len(items) == 3


def test_every_commit_bumps_generation(store: store_mod.Store) -> None:
    assert store.generation == 0
    fill(store, 4)
    assert store.generation == 1
    store.set_labels({KEYS[0]: "fish"})
    store.delete([KEYS[1]])
    store.record_error("broken.jpg", "cannot decode")
    assert store.generation == 4
    assert store.put_batch([], np.zeros((0, 8), np.float32)).size == 0
    assert store.generation == 4


def test_float16_store_keeps_dtype(bank: Path) -> None:
    with store_mod.create(bank, make_spec(dtype="float16")) as st:
        v = make_vectors(5)
        st.put_batch(list("abcde"), v)
        got = st.to_numpy(dtype=np.float16)
        assert got.vectors.dtype == np.float16
        np.testing.assert_array_equal(got.vectors, v.astype(np.float16))
        np.testing.assert_array_equal(st.get([2]).vectors[0], v[2].astype(np.float16))


def test_get_by_keys_ids_of_missing_has(store: store_mod.Store) -> None:
    fill(store)
    assert store.ids_of([KEYS[5], KEYS[2]]).tolist() == [5, 2]
    assert store.get_by_keys([KEYS[9]]).ids.tolist() == [9]
    assert store.missing(["nope", KEYS[1], "other"]) == ["nope", "other"]
    assert store.has(KEYS[1]) and not store.has("nope")
    with pytest.raises(NotFound, match="'nope'"):
        store.get_by_keys(["nope"])
    with pytest.raises(NotFound, match="'nope'"):
        store.ids_of(["nope"])
    with pytest.raises(NotFound, match="id 99"):
        store.get([1, 99])


def test_long_and_unicode_keys(store: store_mod.Store) -> None:
    long_key = "dir/" + "é" * 400 + ".jpg"  # over LMDB's 511-byte key limit once encoded
    keys = [long_key, "猫/1.png", "tab\tand space"]
    store.put_batch(keys, make_vectors(3))
    assert store.get_by_keys(keys).keys == keys
    assert store.missing(keys + [long_key + "x"]) == [long_key + "x"]


# ---- labels and splits ------------------------------------------------------------------------


def test_set_labels_rewrites_rows_not_vectors(store: store_mod.Store) -> None:
    fill(store)
    before = _raw_records(store, "vectors")
    assert store.set_labels({KEYS[0]: "fish", KEYS[2]: "cat", KEYS[1]: "dog"}) == 2
    assert _raw_records(store, "vectors") == before
    assert store.labels_of([0, 2, 1]) == ["fish", "cat", "dog"]
    assert store.set_labels({KEYS[0]: None}) == 1
    assert store.get([0]).labels == [None]


def test_set_splits(store: store_mod.Store) -> None:
    fill(store)
    assert store.set_splits({KEYS[4]: "train", KEYS[0]: "train"}) == 1
    assert store.get([4]).splits == ["train"]
    assert store.relabel({KEYS[3]: "emu"}, {KEYS[3]: "val", KEYS[5]: "test"}) == 2
    items = store.get([3, 5])
    assert items.labels == ["emu", None] and items.splits == ["val", "test"]


def test_labels_generation_follows_label_changes(store: store_mod.Store) -> None:
    store.put_batch(["u1"], make_vectors(1))  # unlabelled: training data unchanged
    assert store.labels_generation == 0
    fill(store, 3)
    assert store.labels_generation == store.generation == 2
    store.record_error("x", "bad")
    assert store.labels_generation == 2
    store.set_labels({"u1": "cat"})
    assert store.labels_generation == store.generation == 4


def test_label_table_vocabulary_labels_of(store: store_mod.Store) -> None:
    fill(store)
    store.delete([KEYS[4]])  # one of the two birds
    ids, codes, vocab = store.label_table()
    assert vocab == ["bird", "cat", "dog"] == store.label_vocabulary()
    assert ids.tolist() == [i for i in range(10) if i != 4]
    expect = [-1 if LABELS[i] is None else vocab.index(LABELS[i]) for i in ids.tolist()]
    assert codes.dtype == np.int32 and codes.tolist() == expect
    assert store.labels_of(np.array([1, 4, -1, 2, 0])) == ["dog", None, None, None, "cat"]


# ---- delete / compact -------------------------------------------------------------------------


def test_delete_is_gone_from_every_read(store: store_mod.Store) -> None:
    fill(store)
    assert store.delete([KEYS[3], KEYS[3], KEYS[7]]) == 2
    assert store.count == 8
    assert store.missing([KEYS[3]]) == [KEYS[3]]
    with pytest.raises(NotFound):
        store.get([3])
    with pytest.raises(NotFound):
        store.get_by_keys([KEYS[7]])
    assert 3 not in store.to_numpy().ids.tolist()
    assert [i for b in store.iter_batches(3) for i in b.ids.tolist()] == [0, 1, 2, 4, 5, 6, 8, 9]
    assert store.stats()["deleted_pending_compact"] == 2
    assert store.put_batch([KEYS[3]], make_vectors(1)).tolist() == [10]  # ids are not reused


def test_delete_unknown_key_deletes_nothing(store: store_mod.Store) -> None:
    fill(store)
    gen = store.generation
    with pytest.raises(NotFound, match="'ghost'"):
        store.delete([KEYS[0], "ghost"])
    assert store.count == 10 and store.generation == gen and store.has(KEYS[0])


def test_compact_reclaims_space_and_keeps_items(bank: Path) -> None:
    spec = make_spec(dim=256, dtype="float16")
    with store_mod.create(bank, spec, block_rows=32) as st:
        keys = [f"k{i}" for i in range(2000)]
        st.put_batch(keys, make_vectors(2000, 256), labels=["a", "b"] * 1000)
        st.delete(keys[::2] + keys[1:1000:2])
        before = st.stats()
        reader = store_mod.open(bank, readonly=True)  # shares this process's environment
        expect = st.to_numpy(dtype=np.float16)
        gen = st.generation
        st.compact()
        after = st.stats()
        assert after["size_bytes"] < 0.5 * before["size_bytes"]
        assert after["deleted_pending_compact"] == 0 and after["count"] == 500
        assert st.generation == gen
        for s in (st, reader):
            got = s.to_numpy(dtype=np.float16)
            assert got.ids.tolist() == expect.ids.tolist() and got.labels == expect.labels
            np.testing.assert_array_equal(got.vectors, expect.vectors)
        assert sorted(p.name for p in (bank / "store").iterdir()) == [
            "CURRENT",
            "env-2",
            "writer.lock",
        ]
        st.put_batch(["new"], make_vectors(1, 256))
        assert reader.get_by_keys(["new"]).ids.tolist() == [2000]
        assert st.set_labels({keys[1999]: "c"}) == 1
        reader.close()


# ---- scans ------------------------------------------------------------------------------------


def test_to_numpy_filters(store: store_mod.Store) -> None:
    vectors = fill(store)
    everything = store.to_numpy()
    assert everything.ids.tolist() == list(range(10))
    np.testing.assert_array_equal(everything.vectors, vectors)
    assert everything.keys == KEYS and everything.labels == LABELS
    assert everything.splits == SPLITS and everything.meta[3]["uri"].endswith(KEYS[3])
    train = store.to_numpy(split="train")
    assert train.ids.tolist() == [i for i, s in enumerate(SPLITS) if s == "train"]
    labelled = store.to_numpy(split="val", labelled_only=True)
    assert labelled.ids.tolist() == [6]
    assert store.to_numpy(ids=[9, 1]).keys == [KEYS[9], KEYS[1]]
    with pytest.raises(NotFound, match="id 999 "):
        store.to_numpy(ids=[1, 999])
    with pytest.raises(InvalidInput, match="split"):
        store.to_numpy(split="holdout")


def test_iter_batches_covers_the_snapshot(store: store_mod.Store) -> None:
    vectors = fill(store)
    batches = list(store.iter_batches(batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([b.vectors for b in batches]), vectors)
    it = store.iter_batches(batch_size=4, labelled_only=True)
    first = next(it)
    store.delete([KEYS[9]])  # after the snapshot: the scan still sees generation it started at
    rest = list(it)
    assert [i for b in [first, *rest] for i in b.ids.tolist()] == [0, 1, 3, 4, 6, 7, 8, 9]
    picked = list(store.iter_batches(batch_size=2, ids=np.array([8, 0, 7])))
    assert [b.ids.tolist() for b in picked] == [[8, 0], [7]]
    with pytest.raises(NotFound):
        list(store.iter_batches(ids=[9]))


def test_empty_store_scans(store: store_mod.Store) -> None:
    assert len(store.to_numpy()) == 0 and store.to_numpy().vectors.shape == (0, 8)
    assert list(store.iter_batches()) == []
    with pytest.raises(NotFound, match="id 5 "):
        store.to_numpy(ids=[5])
    ids, codes, vocab = store.label_table()
    assert len(ids) == len(codes) == 0 and vocab == []
    assert store.stats()["count"] == 0


# ---- changes, errors, stats -------------------------------------------------------------------


def test_changes_since(store: store_mod.Store) -> None:
    fill(store, 6)
    g1 = store.generation
    store.put_batch(KEYS[6:], make_vectors(4))
    store.set_labels({KEYS[0]: "fish", KEYS[7]: "fish"})
    store.delete([KEYS[1], KEYS[8]])
    ch = store.changes_since(g1)
    assert ch.added.tolist() == [6, 7, 9]
    assert ch.relabelled.tolist() == [0]
    assert ch.deleted.tolist() == [1]
    assert ch.generation == store.generation
    everything = store.changes_since(0)
    assert everything.added.tolist() == [0, 2, 3, 4, 5, 6, 7, 9]
    assert len(everything.deleted) == len(everything.relabelled) == 0
    assert len(store.changes_since(store.generation).added) == 0
    with pytest.raises(InvalidInput):
        store.changes_since(-1)


def test_errors_are_recorded_and_cleared(store: store_mod.Store) -> None:
    store.record_error("a.jpg", "cannot decode")
    store.record_error("b.jpg", "truncated")
    assert [(e["key"], e["reason"]) for e in store.errors()] == [
        ("a.jpg", "cannot decode"),
        ("b.jpg", "truncated"),
    ]
    assert store.clear_error("a.jpg") and not store.clear_error("a.jpg")
    store.put_batch(["b.jpg"], make_vectors(1))  # embedded after all: the error goes
    assert store.errors() == []


def test_stats(store: store_mod.Store) -> None:
    fill(store)
    store.record_error("bad.jpg", "nope")
    s = store.stats()
    assert s["count"] == 10 and s["labelled"] == 8 and s["unlabelled"] == 2
    assert s["labels"] == {"bird": 2, "cat": 3, "dog": 3}
    assert s["splits"] == {"train": 4, "val": 2, "test": 2, "none": 2}
    assert s["errors"] == 1 and s["blocks"] == 3 and s["size_bytes"] > 0


def test_blocks_keep_file_near_raw_size(bank: Path) -> None:
    """dim 1280 float16 in blocks: file within 1.15x the raw vectors (one record each: ~1.6x)."""
    with store_mod.create(bank, make_spec(dim=1280, dtype="float16")) as st:
        for b in range(6):
            keys = [f"img/{b}/{i:05d}.jpg" for i in range(500)]
            st.put_batch(keys, make_vectors(500, 1280, seed=b), meta=[{"uri": k} for k in keys])
        s = st.stats()
    assert s["size_bytes"] <= 1.15 * s["vector_bytes"], s


def test_map_grows_by_itself(bank: Path) -> None:
    with store_mod.create(bank, make_spec(dim=512), map_size=1 << 20) as st:
        for b in range(4):
            st.put_batch([f"{b}-{i}" for i in range(500)], make_vectors(500, 512, seed=b))
        assert st.count == 2000 and st.stats()["map_size"] > 1 << 20
        np.testing.assert_array_equal(st.get([1999]).vectors, make_vectors(500, 512, seed=3)[-1:])


def _raw_records(st: store_mod.Store, db: str) -> list[tuple[bytes, bytes]]:
    with st._sh().read() as (txn, h):
        return [(bytes(k), bytes(v)) for k, v in txn.cursor(db=h.dbs[db])]


def test_small_appends_leave_a_full_tail_block_unwritten(bank: Path) -> None:
    """A 1-item put must not rewrite a big last block (LMDB rewrites a value whole)."""
    spec = make_spec(dim=128)
    with store_mod.create(bank, spec) as st:
        first = make_vectors(300, 128)
        st.put_batch([f"bulk/{i}" for i in range(300)], first, labels=["a"] * 300)
        tail_before = _raw_records(st, "vectors")
        assert len(tail_before) == 1 and len(tail_before[0][1]) > store_mod.store.TAIL_BYTES
        extra = make_vectors(40, 128, seed=5)
        for i in range(40):
            st.put_batch([f"one/{i}"], extra[i : i + 1], labels=["b"], meta=[{"i": i}])
        blocks = _raw_records(st, "vectors")
        assert blocks[0] == tail_before[0]  # the full block was never rewritten
        assert len(blocks) > 2 and all(len(v) <= store_mod.store.TAIL_BYTES for _, v in blocks[1:])
        expect = np.concatenate([first, extra])
        got = st.to_numpy()
        np.testing.assert_array_equal(got.vectors, expect)
        assert got.keys[-1] == "one/39" and got.labels[-1] == "b"
        assert st.get_by_keys(["one/7"]).meta[0]["i"] == 7
        st.compact()  # packs the small blocks back into full ones
        assert len(_raw_records(st, "vectors")) == 1
        np.testing.assert_array_equal(st.to_numpy().vectors, expect)


def test_get_keeps_any_order_within_a_block(store: store_mod.Store) -> None:
    vectors = fill(store)
    order = [0, 2, 1, 3, 9, 8, 4]  # block 0 permuted, block 2 reversed
    for items in (store.get(order), store.to_numpy(ids=order)):
        assert items.ids.tolist() == order and items.keys == [KEYS[i] for i in order]
        np.testing.assert_array_equal(items.vectors, vectors[order])
        assert list(items.meta) == [{"uri": f"file:///{KEYS[i]}", "size": i,
                                     "added": items.meta[j]["added"]}
                                    for j, i in enumerate(order)]  # fmt: skip


def test_scans_hold_no_transaction_between_batches(store: store_mod.Store) -> None:
    fill(store)
    it = store.iter_batches(batch_size=2)
    next(it)
    assert store._sh().rw._readers == 0  # the caller's code runs outside any read txn
    with store_mod.open(store.bank.root, readonly=True) as other:
        other_batches = list(other.iter_batches(batch_size=4))
    assert sum(len(b) for b in it) == 8 and sum(len(b) for b in other_batches) == 10


def test_compaction_keeps_the_change_log(store: store_mod.Store) -> None:
    fill(store)
    store.delete([KEYS[0]])
    store.set_labels({KEYS[5]: "cat"})
    before = store.changes_since(1)
    store.compact()
    after = store.changes_since(1)
    assert before.deleted.tolist() == after.deleted.tolist() == [0]
    assert before.relabelled.tolist() == after.relabelled.tolist() == [5]
    assert store.labels_generation == store.generation


def test_put_batch_replace_is_an_atomic_upsert(store: store_mod.Store) -> None:
    fill(store, 3)
    gen = store.generation
    new = make_vectors(2, seed=9)
    ids = store.put_batch([KEYS[1], "fresh"], new, labels=["emu", None], replace=True)
    assert ids.tolist() == [3, 4] and store.generation == gen + 1 and store.count == 4
    items = store.get_by_keys([KEYS[1], "fresh"])
    assert items.ids.tolist() == [3, 4] and items.labels == ["emu", None]
    np.testing.assert_array_equal(items.vectors, new)
    ch = store.changes_since(gen)
    assert ch.added.tolist() == [3, 4] and ch.deleted.tolist() == [1]
    with pytest.raises(NotFound):
        store.get([1])


def test_scan_columns_decode_later_from_the_snapshot(store: store_mod.Store) -> None:
    fill(store)
    items = store.to_numpy(split="train")
    store.set_labels({KEYS[0]: "changed"})
    store.delete([KEYS[1]])
    store.compact()
    assert items.labels == ["cat", "dog", None, "cat"]  # as of the scan, read afterwards
    assert items.keys == [KEYS[i] for i in (0, 1, 5, 7)]
    assert [m["size"] for m in items.meta] == [0, 1, 5, 7]
    assert items.splits == ["train"] * 4 and len(items) == 4
    items.labels = ["x"] * 4
    assert items.labels == ["x"] * 4


def test_ids_in_split_lists_live_items_of_that_split(store):
    ids = store.put_batch(
        ["a", "b", "c", "d"],
        make_vectors(4, store.spec.dim),
        labels=["x", "y", None, "x"],
        splits=["train", "test", "test", "val"],
    )
    assert store.ids_in_split("test").tolist() == [int(ids[1]), int(ids[2])]
    store.delete(["b"])
    assert store.ids_in_split("test").tolist() == [int(ids[2])]
    assert store.ids_in_split("val").tolist() == [int(ids[3])]


def test_keys_of_reads_live_keys_only(store: store_mod.Store) -> None:
    fill(store, 7)
    store.put_batch(KEYS[7:], make_vectors(3, seed=1))  # appended to the tail block
    store.delete([KEYS[2]])
    assert store.keys_of([9, 0, 2, 7, 10**6]) == {9: KEYS[9], 0: KEYS[0], 7: KEYS[7]}
    assert store.keys_of([]) == {}
