"""Filter expressions: the grammar, what each operator matches, and filtered search recall."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.core.errors import InvalidInput
from featurebank.index import filters
from featurebank.index.build import build_index
from featurebank.index.searcher import Searcher
from tests.support.index_data import World, exact_ids, spec


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> filters.Table:
    root = tmp_path_factory.mktemp("f") / "bank"
    keys = [f"cam{i % 3}/img-{i:02d}" for i in range(12)]
    meta = [{"camera": i % 3, "night": i % 2 == 0, "site": "north" if i < 6 else "south"}
            for i in range(12)]
    meta[11] = {}  # an item without user metadata
    labels = [None if i % 4 == 0 else ("cat" if i % 2 else "dog") for i in range(12)]
    splits = ["test" if i == 5 else "train" for i in range(12)]
    with store_mod.create(root, spec(4)) as st:
        st.put_batch(keys, np.eye(12, 4, dtype=np.float32), labels, splits, meta)
        return filters.Table.of_store(st)


def keys_of(table: filters.Table, text: str) -> list[int]:
    node = filters.parse(text)
    return np.flatnonzero(table.mask(node)).tolist() if node is not None else []


@pytest.mark.parametrize(
    ("text", "rows"),
    [
        ('label == "cat"', [1, 3, 5, 7, 9, 11]),
        ('label != "cat"', [2, 6, 10]),  # unlabelled items have no label to differ
        ('not label == "cat"', [0, 2, 4, 6, 8, 10]),
        ("label exists", [1, 2, 3, 5, 6, 7, 9, 10, 11]),
        ('label in ("dog", "bird")', [2, 6, 10]),
        ('split == "test"', [5]),
        ('key prefix "cam1/"', [1, 4, 7, 10]),
        ('key < "cam1"', [0, 3, 6, 9]),
        ("meta.camera == 2", [2, 5, 8]),
        ("meta.camera >= 1 and meta.camera < 2", [1, 4, 7, 10]),
        ("meta.camera > 1", [2, 5, 8]),
        ("meta.camera <= 0", [0, 3, 6, 9]),
        ("meta.night == true", [0, 2, 4, 6, 8, 10]),
        ('meta.camera == "2"', []),  # a number never equals a string
        ("meta.site exists and not meta.night == true", [1, 3, 5, 7, 9]),
        ('(meta.site == "south" or label == "dog") and meta.camera in (0, 1)', [6, 7, 9, 10]),
        ('meta.missing exists or meta.site prefix "no"', [0, 1, 2, 3, 4, 5]),
        ("added > 0", list(range(12))),
        ('added < "2000-01-01"', []),
        ('NOT label == "cat" AND meta.camera == 0', [0, 6]),
    ],
)
def test_each_operator_matches_what_the_grammar_says(
    table: filters.Table, text: str, rows: list[int]
) -> None:
    assert keys_of(table, text) == rows


@pytest.mark.parametrize(
    ("text", "position", "wanted"),
    [
        ('label = "cat"', 7, "unexpected"),
        ('label == ', 10, "a value"),
        ('colour == "red"', 1, "a field"),
        ('label == "cat" and', 19, "a field"),
        ('(label == "cat"', 16, "')'"),
        ('label == "cat" label', 16, "'and', 'or' or the end"),
        ('meta.x in (1, 2', 16, "')'"),
        ("meta.x prefix 3", 15, "quoted string"),
        ('added > "yesterday"', 9, "not a date"),
        ("label ~ 1", 7, "unexpected"),
        ("meta. == 1", 5, "unexpected"),
        ("meta == 1", 1, "a field"),
    ],
)
def test_a_malformed_filter_names_the_position(text: str, position: int, wanted: str) -> None:
    with pytest.raises(InvalidInput) as e:
        filters.parse(text)
    assert f"position {position}" in str(e.value), str(e.value)
    assert wanted in str(e.value)


def test_filters_are_parsed_never_evaluated() -> None:
    for text in ("__import__('os').system('true')", "label == open('x')", "meta.a == 1; 1"):
        with pytest.raises(InvalidInput):
            filters.parse(text)
    with pytest.raises(InvalidInput, match="nested"):
        filters.parse("not " * 100 + "label exists")
    assert filters.parse("   ") is None


def test_set_meta_changes_metadata_and_keeps_vectors(tmp_path: Path) -> None:
    with store_mod.create(tmp_path / "b", spec(4)) as st:
        v = np.arange(8, dtype=np.float32).reshape(2, 4)
        st.put_batch(["a", "b"], v, meta=[{"x": 1, "y": "keep"}, None])
        gen = st.generation
        assert st.set_meta({"a": {"x": 2, "y": None}, "b": {"z": True}}) == 2
        items = st.get_by_keys(["a", "b"])
        assert {k: m.get(k) for m in [items.meta[0]] for k in ("x", "y")} == {"x": 2, "y": None}
        assert items.meta[1]["z"] is True and "added" in items.meta[1]
        np.testing.assert_array_equal(items.vectors, v)
        assert st.generation == gen + 1
        assert st.set_meta({"a": {"w": 1}}, merge=False) == 1
        assert "x" not in st.get_by_keys(["a"]).meta[0]
        with pytest.raises(InvalidInput, match="kept by the store"):
            st.set_meta({"a": {"added": 3}})
        with pytest.raises(InvalidInput, match="string, number or boolean"):
            st.set_meta({"a": {"nested": {"no": 1}}})


def correlated_bank(root: Path, n: int = 24_000, dim: int = 16, clusters: int = 40) -> tuple[
    np.ndarray, np.ndarray, World
]:
    world = World.make(dim, centres=clusters, seed=3)
    x, cl = world.sample(n, 4)
    with store_mod.create(root, spec(dim)) as st:
        st.put_batch([f"i{i}" for i in range(n)], x, [f"c{c}" for c in cl],
                     meta=[{"cluster": int(c), "coin": i % 2} for i, c in enumerate(cl)])
    build_index(root, factory="HNSW16", metric="l2", transform="none", allow_below_target=True)
    return x, cl, world


@pytest.mark.parametrize("exact_max", [filters.EXACT_MAX, 100])
def test_a_filter_excluding_the_query_region_keeps_full_recall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exact_max: int
) -> None:
    """Half the clusters pass; queries from the other half must still find their nearest
    passing items (the graph walk alone strands them). exact_max=100 forces the probe path."""
    monkeypatch.setattr(filters, "EXACT_MAX", exact_max)
    x, cl, world = correlated_bank(tmp_path / "b")
    q, qc = world.sample(300, 5)
    with Searcher.load(tmp_path / "b") as s:
        for text, passing in (
            ("meta.cluster < 20", cl < 20),
            ("meta.coin == 0", np.arange(len(cl)) % 2 == 0),
            ("meta.cluster < 20 and meta.coin == 1", (cl < 20) & (np.arange(len(cl)) % 2 == 1)),
        ):
            res = s.search(q, 10, where=filters.parse(text))
            base = np.flatnonzero(passing)
            truth = base[exact_ids(x[passing], q, 10)]
            assert np.isin(res.ids, base).all(), text  # never an item failing the filter
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(res.ids.tolist(), truth.tolist(), strict=True)])
            outside = qc >= 20
            rec_out = np.mean([len(set(a) & set(b)) / 10 for a, b, o in
                               zip(res.ids.tolist(), truth.tolist(), outside, strict=True) if o])
            assert recall >= 0.9 and rec_out >= 0.9, (text, recall, rec_out)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_a_subset_index_reaches_its_target_from_inside_and_outside(metric: str) -> None:
    """The IVF over a filter's items, tuned on items inside and outside it, keeps the target
    for queries from both sides, for a metric where smaller is closer and one where larger is."""
    import faiss

    from featurebank.index.subset import SubsetIndex

    world = World.make(16, centres=40, seed=4)
    x, cl = world.sample(16_000, 6)
    q, qc = world.sample(200, 7)
    if metric == "ip":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    mt = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    inside = np.flatnonzero(cl < 20)
    outside = np.flatnonzero(cl >= 20)[::20]
    sub = SubsetIndex(inside + 1000, x[inside], mt, x[outside], target=0.95, k=10)
    assert sub.measured >= 0.95 and sub.nprobe_in <= sub.nprobe_out < sub.index.nlist
    flat = faiss.IndexFlat(16, mt)
    flat.add(x[inside])
    _, truth = flat.search(q, 10)
    _, found = sub.search(q, 10)
    assert np.isin(found, inside + 1000).all()  # store ids, never an item outside
    for side in (qc < 20, qc >= 20):
        pairs = zip(found[side] - 1000, inside[truth[side]], strict=True)
        got = [len(set(f) & set(t)) / 10 for f, t in pairs]
        assert np.mean(got) >= 0.93, (metric, side.sum(), np.mean(got))
