"""Searcher and kNN classification over real banks and real FAISS indexes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from featurebank import store as store_mod
from featurebank.classify.classifier import Classifier
from featurebank.classify.knn import Voter, knn_accuracy, vote
from featurebank.core.errors import FailedPrecondition, InvalidInput
from featurebank.index.build import build_index
from featurebank.index.searcher import Searcher
from featurebank.index.transforms import Transform, fit
from tests.support.index_data import World, exact_ids, make_bank


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, list[str]]:
    """A 1,500-item labelled bank of 16-d clustered vectors (overlapping classes)."""
    world = World.make(16, latent=6, centres=12, noise=0.1, seed=1)
    x, cluster = world.sample(1500, seed=2)
    labels = [f"class-{c % 6}" for c in cluster]
    splits = ["val" if i % 5 == 0 else "train" for i in range(len(x))]
    bank = make_bank(tmp_path_factory.mktemp("labelled") / "bank", x, labels, splits)
    return bank, x, labels


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_knn_matches_sklearn(tmp_path: Path, metric: str, weights: str) -> None:
    world = World.make(16, latent=6, centres=12, noise=0.1, seed=3)
    x, cluster = world.sample(1200, seed=4)
    labels = [f"class-{c % 5}" for c in cluster]
    queries, _ = world.sample(300, seed=5)
    bank = make_bank(tmp_path / "bank", x, labels)
    build_index(bank, factory="Flat", metric=metric, k=7, transform="none")
    reference = KNeighborsClassifier(
        n_neighbors=7, weights=weights, algorithm="brute", metric="euclidean" if metric == "l2"
        else "cosine"
    ).fit(x, labels)
    with Searcher.load(bank) as searcher:
        result = searcher.search(queries, 7, voters_only=True)
        probs, vocab = Voter(7, weights=weights, metric=metric).of(result)
        assert np.asarray(vocab)[probs.argmax(1)].tolist() == reference.predict(queries).tolist()
        assert vocab == reference.classes_.tolist()
        np.testing.assert_allclose(probs, reference.predict_proba(queries), atol=1e-5)
        _, neighbours = reference.kneighbors(queries)
        assert (result.ids == neighbours).all()  # ids are store ids 0..n-1 here


def test_search_returns_keys_labels_and_scores(labelled: tuple[Path, np.ndarray, list[str]]) -> None:
    bank, x, labels = labelled
    build_index(bank, factory="Flat", metric="cosine", transform="none")
    with Searcher.load(bank) as searcher:
        assert searcher.dim == 16 and searcher.ntotal == len(x)
        result = searcher.search(x[:4], 5)
        assert result.ids.shape == (4, 5) and result.ids.dtype == np.int64
        assert result.ids[:, 0].tolist() == [0, 1, 2, 3]  # each finds itself first
        assert result.keys[1][0] == "item-1"
        assert result.labels[2][0] == labels[2]
        assert (np.diff(result.scores, axis=1) <= 1e-6).all()  # best first
        np.testing.assert_allclose(result.scores[:, 0], 1.0, atol=1e-5)  # cosine with itself
        truth = exact_ids(x, x[:50], 10, "cosine")
        assert (searcher.search(x[:50], 10).ids == truth).all()


def test_hit_keys_stay_right_after_replace_and_delete(
    labelled: tuple[Path, np.ndarray, list[str]], tmp_path: Path,
) -> None:
    _, x, labels = labelled
    bank = make_bank(tmp_path / "bank", x[:200], labels[:200])
    build_index(bank, factory="Flat", metric="cosine", transform="none")
    with store_mod.open(bank) as st, Searcher.load(st) as searcher:
        assert searcher.search(x[:2], 1).keys == [["item-0"], ["item-1"]]  # keys now cached
        st.put_batch(["item-0"], x[1:2], replace=True)  # a new id, and a new vector
        st.delete(["item-1"])
        searcher.catch_up()
        found = searcher.search(x[1:2], 2)
        assert found.keys[0][0] == "item-0" and "item-1" not in found.keys[0]
        assert int(found.ids[0][0]) == 200  # the replaced item's new id


def test_label_restriction_returns_only_those_labels(
    labelled: tuple[Path, np.ndarray, list[str]],
) -> None:
    bank, x, labels = labelled
    build_index(bank, factory="HNSW16", metric="l2", transform="none")
    wanted = ["class-1", "class-4"]
    subset = np.array([i for i, lab in enumerate(labels) if lab in wanted])
    with Searcher.load(bank) as searcher:
        result = searcher.search(x[:20], 10, labels=wanted)
        assert {lab for row in result.labels for lab in row} <= set(wanted)
        truth = subset[exact_ids(x[subset], x[:20], 10)]
        assert (result.ids == truth).all()  # small filtered sets are searched exactly
        with pytest.raises(InvalidInput, match="unknown labels"):
            searcher.search(x[:1], 3, labels=["no-such-label"])


def test_relabel_is_visible_to_the_next_query(tmp_path: Path) -> None:
    x, _ = World.make(8, seed=5).sample(300, seed=6)
    bank = make_bank(tmp_path / "bank", x, ["a"] * 300)
    build_index(bank, factory="Flat", metric="l2", transform="none")
    with Searcher.load(bank) as searcher:
        generation = searcher.generation
        assert searcher.search(x[:1], 1).labels == [["a"]]
        with store_mod.open(bank) as st:
            st.set_labels({"item-0": "b"})
        assert searcher.search(x[:1], 1).labels == [["b"]]
        assert searcher.vocabulary == ["a", "b"]
        assert searcher.generation == generation  # no index work for a relabel


def test_deleted_items_are_never_returned(tmp_path: Path) -> None:
    x, _ = World.make(8, seed=7).sample(2000, seed=8)
    bank = make_bank(tmp_path / "bank", x, ["a"] * 2000)
    build_index(bank, factory="HNSW16", metric="l2", transform="none")
    with Searcher.load(bank) as searcher:
        with store_mod.open(bank) as st:
            st.delete([f"item-{i}" for i in range(0, 2000, 2)])
        ids = searcher.search(x[:100], 10).ids
        assert (ids % 2 == 1).all() and searcher.ntotal == 1000


@pytest.mark.parametrize("transform", ["cl2n", "pca:6", "pca-whiten:6", "l2"])
def test_transform_round_trips_through_save_and_load(
    labelled: tuple[Path, np.ndarray, list[str]], transform: str, tmp_path: Path
) -> None:
    bank, x, _ = labelled
    manifest = build_index(bank, factory="Flat", metric="l2", transform=transform)
    fitted = fit(transform, x)
    loaded = Transform.load(bank / "indexes" / str(manifest["generation"]))
    assert loaded.spec == transform and loaded.out_dim == fitted.out_dim
    np.testing.assert_allclose(loaded.apply(x[:50]), fitted.apply(x[:50]), rtol=1e-4, atol=1e-5)
    fitted.save(tmp_path)
    again = Transform.load(tmp_path)
    np.testing.assert_array_equal(again.apply(x[:50]), fitted.apply(x[:50]))
    with Searcher.load(bank) as searcher:
        xt = searcher.transform(x)
        assert xt.shape[1] == fitted.out_dim
        truth = exact_ids(xt, xt[:30], 5)
        assert (searcher.search(x[:30], 5).ids == truth).all()
    if transform == "cl2n":
        np.testing.assert_allclose(np.linalg.norm(xt, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(fitted.mean, x.mean(axis=0), rtol=1e-4, atol=1e-5)
    if transform == "pca-whiten:6":
        np.testing.assert_allclose(np.var(xt, axis=0, ddof=1), 1.0, rtol=1e-3)


def test_calibrated_abstention_reaches_target_precision(
    labelled: tuple[Path, np.ndarray, list[str]],
) -> None:
    bank, x, labels = labelled
    build_index(bank, factory="Flat", metric="cosine", transform="none")
    with Classifier(bank, mode="knn", abstain_below=0.9) as clf:
        threshold = clf.abstain_threshold(0.9)
        val = np.arange(0, len(x), 5)
        predicted = clf.predict(x[val], exclude_ids=val)
        kept = [(p, labels[i]) for p, i in zip(predicted, val, strict=True) if p != "unknown"]
        assert 0 < threshold <= 1 and kept
        assert np.mean([p == t for p, t in kept]) >= 0.9
        assert len(kept) < len(val)  # the classes overlap: some answers are withheld
        assert clf.predict(x[val], exclude_ids=val, abstain_below=1.0).count("unknown") > (
            len(val) - len(kept)
        )  # a stricter precision withholds more


def test_vote_softmax_and_missing_labels() -> None:
    codes = np.array([[0, 1, -1], [-1, -1, -1]])
    scores = np.array([[0.9, 0.8, 0.99], [0.5, 0.4, 0.3]], dtype=np.float32)
    probs = vote(codes, scores, 2, "softmax", temperature=0.1)
    e = np.exp(np.array([0.9, 0.8]) / 0.1)
    np.testing.assert_allclose(probs[0], e / e.sum(), rtol=1e-5)
    assert (probs[1] == 0).all()  # no labelled neighbour: no vote
    np.testing.assert_allclose(vote(codes, scores, 2, "uniform")[0], [0.5, 0.5])


def test_bad_inputs_get_clear_errors(
    labelled: tuple[Path, np.ndarray, list[str]], tmp_path: Path
) -> None:
    bank, x, _ = labelled
    build_index(bank, factory="Flat")
    with Searcher.load(bank) as searcher:
        with pytest.raises(InvalidInput, match="expected dimension 16, got 3"):
            searcher.search(np.zeros((2, 3), np.float32), 5)
        bad = x[:3].copy()
        bad[1, 2] = np.nan
        with pytest.raises(InvalidInput, match=r"NaN or infinite values in rows \[1\]"):
            searcher.search(bad, 5)
        bad[1, 2] = np.inf
        with pytest.raises(InvalidInput, match="NaN or infinite"):
            searcher.search(bad, 5)
        with pytest.raises(InvalidInput, match="k must be positive"):
            searcher.search(x[:2], 0)
        with pytest.raises(InvalidInput, match="more than the 1500 items"):
            searcher.search(x[:2], 1501)
        with pytest.raises(InvalidInput, match="vote weights"):
            Voter(5, weights="majority")
    with pytest.raises(InvalidInput, match="unknown or invalid faiss factory string 'IVFoo'"):
        build_index(bank, factory="IVFoo")
    with pytest.raises(InvalidInput, match="'pca:32' does not fit vectors of dimension 16"):
        build_index(bank, transform="pca:32")
    with pytest.raises(InvalidInput, match="unknown transform"):
        build_index(bank, transform="zca")
    with pytest.raises(InvalidInput, match="unknown metric"):
        build_index(bank, metric="hamming")
    with pytest.raises(InvalidInput, match="k=2000 is more than the 1500 items"):
        build_index(bank, k=2000)
    with pytest.raises(InvalidInput, match="memory budget"):
        build_index(bank, memory_budget="lots")
    empty = tmp_path / "empty"
    store_mod.create(empty, make_spec16()).close()
    with pytest.raises(FailedPrecondition, match="empty"):
        build_index(empty)
    with pytest.raises(FailedPrecondition, match="no index yet"):
        Searcher.load(empty)


def make_spec16():  # type: ignore[no-untyped-def]
    from tests.support.index_data import spec

    return spec(16)


def test_test_split_items_are_shown_but_never_vote(tmp_path: Path) -> None:
    x, _ = World.make(8, seed=9).sample(200, seed=10)
    labels = ["a"] * 199 + ["b"]
    bank = make_bank(tmp_path / "bank", x, labels, ["train"] * 199 + ["test"])
    build_index(bank, factory="Flat", metric="l2", transform="none")
    with Searcher.load(bank) as searcher:
        shown = searcher.search(x[199:], 1)
        assert shown.ids[0, 0] == 199 and shown.labels == [["b"]]  # found and shown
        assert shown.label_codes[0, 0] == -1  # but it cannot vote
        result = searcher.search(x[199:], 1, voters_only=True)
        probs, vocab = Voter(1, metric="l2").of(result)
        assert result.ids[0, 0] != 199 and result.labels == [["a"]]  # the vote skips it
        assert vocab == ["a", "b"] and probs[0, 0] == 1


def test_knn_accuracy_counts_an_item_without_voters_as_wrong(tmp_path: Path) -> None:
    x, _ = World.make(8, seed=1).sample(50, seed=2)
    bank = make_bank(tmp_path / "bank", x, ["a"] + [None] * 49, ["val"] + ["none"] * 49)
    build_index(bank, factory="Flat", metric="l2", transform="none")
    with Searcher.load(bank) as searcher:
        report = knn_accuracy(searcher, 5, 0.07, "val")
    assert report["items"] == 1  # its only possible voter is itself, left out
    assert report["accuracy"] == {"uniform": 0.0, "distance": 0.0, "softmax": 0.0}


def test_filtered_sets_grow_with_appends_and_are_rebuilt_after_a_delete(tmp_path: Path) -> None:
    """Each commit makes a new view; its filtered id sets (voters, a label) are carried
    from the last one and grown by the appended items that pass, and a search on them
    answers as a searcher opened afresh does."""
    x, _ = World.make(8, seed=3).sample(300, seed=4)
    labels = [("a" if i % 3 else "b") if i % 4 else None for i in range(240)]
    bank = make_bank(tmp_path / "bank", x[:240], labels)
    build_index(bank, factory="Flat", metric="l2", transform="none")
    queries = x[240:260]
    every = labels + ["a", "b", None, "a", None, "b"] * 10
    with store_mod.open(bank) as st, Searcher.load(st) as searcher:
        searcher.search(queries, 5, voters_only=True)
        searcher.search(queries, 5, labels=["b"])
        for i in range(240, 300, 6):  # commits of voters, a "b" and unlabelled items
            st.put_batch([f"new-{j}" for j in range(i, i + 6)], x[i:i + 6],
                         every[i:i + 6])
            searcher.catch_up()
            memo = searcher._view.cache
            assert ("matching", None, True, None) in memo  # carried, not made again
            voters = memo[("matching", None, True, None)]
            assert voters.tolist() == [j for j in range(i + 6) if every[j] is not None]
            got = searcher.search(queries, 5, voters_only=True)
            b_only = searcher.search(queries, 5, labels=["b"])
        st.delete(["item-1"])
        searcher.catch_up()
        assert ("matching", None, True, None) not in searcher._view.cache
        after = searcher.search(queries, 5, voters_only=True)
    with Searcher.load(bank) as fresh:
        np.testing.assert_array_equal(after.ids, fresh.search(queries, 5, voters_only=True).ids)
        assert 1 not in after.ids
    voter_rows = np.array([j for j in range(300) if every[j] is not None])
    b_rows = np.array([j for j in range(300) if every[j] == "b"])
    np.testing.assert_array_equal(got.ids, voter_rows[exact_ids(x[voter_rows], queries, 5, "l2")])
    np.testing.assert_array_equal(b_only.ids, b_rows[exact_ids(x[b_rows], queries, 5, "l2")])
