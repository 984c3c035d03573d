"""The quality pass's neighbour lists: an update after writes gives the lists (and the
votes) that a pass over the changed bank computes, exactly and in list mode."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.classify.classifier import Classifier
from featurebank.classify.quality import Cache, graphs, labels, neighbourhood, report_of, space
from featurebank.index.build import build_index
from tests.support.specs import make_spec

DIM = 16


def clusters(n: int, seed: int) -> tuple[np.ndarray, list[str | None]]:
    rng = np.random.default_rng(seed)
    centres = 2 * rng.normal(size=(4, DIM))
    y = rng.integers(0, 4, n)
    x = (centres[y] + 0.5 * rng.normal(size=(n, DIM))).astype(np.float32)
    return x, [str(c) for c in y]


def write_changes(bank: Path) -> None:
    """New labelled and unlabelled items, a copy, relabels (one to a held-out split) and
    deletes: every kind of change the log records."""
    x, labels = clusters(60, seed=2)
    with store_mod.open(bank) as st:
        old = st.to_numpy()
        keys = [f"new{i}" for i in range(60)] + ["copy"]
        st.put_batch(keys, np.concatenate([x, old.vectors[5:6]]),
                     labels=labels[:40] + [None] * 21, splits=["train"] * 40 + ["none"] * 21)
        st.set_labels({old.keys[7]: "3", old.keys[8]: "0"})
        st.set_splits({old.keys[9]: "test"})
        st.delete([old.keys[1], old.keys[20], old.keys[33]])


@pytest.fixture
def bank(tmp_path: Path) -> Path:
    x, labels = clusters(400, seed=1)
    root = tmp_path / "bank"
    with store_mod.create(root, make_spec(DIM)) as st:
        st.put_batch([f"v{i}" for i in range(400)], x, labels=labels, splits=["train"] * 400)
    build_index(root, factory="Flat")
    return root


def same_lists(a: neighbourhood.Neighbourhood, b: neighbourhood.Neighbourhood) -> None:
    assert a.keys == b.keys and a.labels == b.labels and a.splits == b.splits
    assert a.lists.keys() == b.lists.keys()
    for name in a.lists:  # neighbours at equal distances (the copy) may swap places
        la, lb = a.lists[name], b.lists[name]
        np.testing.assert_array_equal(np.sort(la.pos, axis=1), np.sort(lb.pos, axis=1), name)
        np.testing.assert_allclose(la.fd, lb.fd, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("exact_max", [space.EXACT_MAX, 100])
def test_an_update_gives_the_lists_and_votes_of_a_pass_over_the_changed_bank(
    bank: Path, exact_max: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(space, "EXACT_MAX", exact_max)
    cache = Cache()
    with Classifier(bank, mode="knn") as clf:
        cache.run(clf)
    assert cache.hood is not None and cache.hood.space.exact == (exact_max > 400)
    write_changes(bank)
    with Classifier(bank, mode="knn") as clf:
        report = cache.run(clf)
        updated = cache.hood
        assert updated is not None and report.changed is not None and report.changed >= 64
        if updated.space.exact:  # below EXACT_MAX: a fresh read is the reference
            fresh = neighbourhood.read(clf, updated.k_all, updated.k_votes)
        else:  # list mode: a pass over the same lists (k-means centroids)
            fresh = copy.deepcopy(updated)
            fresh.compute_lists()
        same_lists(updated, fresh)
        assert neighbourhood.VOTERS in updated.lists  # unlabelled items arrived
        everything, ref = graphs(fresh)
        assert ref is not None
        voter = clf.voter()
        probs = labels.trusted_vote(voter, ref)
        np.testing.assert_allclose(cache.probs(updated, voter, graphs(updated)[1]), probs,
                                   atol=1e-6)
        full = report_of(fresh, clf, everything, ref, probs, None, 100, 0, 0.0)
    assert report.counts == full.counts
    assert [f.key for f in report.labels.findings] == [f.key for f in full.labels.findings]
    assert [o.key for o in report.outliers] == [o.key for o in full.outliers]


@pytest.mark.parametrize("exact_max", [space.EXACT_MAX, 100])
def test_updates_that_only_add_items_give_a_pass_over_the_grown_bank(
    bank: Path, exact_max: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends only (the lists grow in place into spare room): after each of three
    updates the lists are those of a pass over the grown bank."""
    monkeypatch.setattr(space, "EXACT_MAX", exact_max)
    cache = Cache()
    with Classifier(bank, mode="knn") as clf:
        cache.run(clf)
    for step in range(3):
        x, labels = clusters(30, seed=10 + step)
        with store_mod.open(bank) as st:
            st.put_batch([f"add{step}-{i}" for i in range(30)], x,
                         labels=labels[:20] + [None] * 10, splits=["train"] * 30)
        with Classifier(bank, mode="knn") as clf:
            report = cache.run(clf)
            updated = cache.hood
            assert updated is not None and report.changed == 30
            fresh = copy.deepcopy(updated)
            fresh.compute_lists()
            same_lists(updated, fresh)


def test_nothing_changed_answers_the_last_report(bank: Path) -> None:
    cache = Cache()
    with Classifier(bank, mode="knn") as clf:
        first = cache.run(clf)
        again = cache.run(clf)
        other = cache.run(clf, limit=3)
    assert first.changed is None and again.changed == 0
    assert again.counts == first.counts and again.labels == first.labels
    assert len(other.outliers) <= 3 and other.counts == first.counts


@pytest.mark.parametrize("exact_max", [space.EXACT_MAX, 100])
def test_voters_lists_read_off_every_items_list_are_the_nearest_voters(
    bank: Path, exact_max: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a row's nearest items all vote its voters' list is read off its list of every
    item; checked against a search among the voters alone, with some rows whose nearest
    items do not all vote (searched) and most that do (read off)."""
    monkeypatch.setattr(space, "EXACT_MAX", exact_max)
    write_changes(bank)  # unlabelled items and a held-out one: not every item votes
    with Classifier(bank, mode="knn") as clf:
        hood = neighbourhood.read(clf, 20, 20)
    lists = hood.lists[neighbourhood.VOTERS]
    rows = np.arange(len(hood.ids))
    pos, fd = space.knn(hood.space, rows, hood.voters, lists.k)
    first = hood.lists[neighbourhood.EVERYTHING].pos[:, : lists.k]
    read_off = (hood.voters[first] & (first >= 0)).all(axis=1)
    assert 0 < read_off.sum() < len(rows)  # both ways are taken
    np.testing.assert_array_equal(np.sort(lists.pos, axis=1), np.sort(pos, axis=1))
    np.testing.assert_allclose(lists.fd, fd, rtol=1e-5, atol=1e-5)
    assert hood.voters[lists.pos[lists.pos >= 0]].all()


@pytest.mark.parametrize("exact_max", [space.EXACT_MAX, 100])
def test_a_new_voter_behind_many_new_unlabelled_items_reaches_the_voters_lists(
    bank: Path, exact_max: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """30 unlabelled near copies of an item and, a little farther, a labelled one: the
    rows around it list the copies among every item and the labelled one among the
    voters, as a pass over the grown bank does."""
    monkeypatch.setattr(space, "EXACT_MAX", exact_max)
    cache = Cache()
    with Classifier(bank, mode="knn") as clf:
        cache.run(clf)
    rng = np.random.default_rng(5)
    with store_mod.open(bank) as st:
        v = st.to_numpy().vectors[3]
        copies = v + 0.01 * rng.normal(size=(30, DIM)).astype(np.float32)
        voter = v + 0.05 * rng.normal(size=(1, DIM)).astype(np.float32)
        st.put_batch([f"copy{i}" for i in range(30)] + ["voter"], np.concatenate([copies, voter]),
                     labels=[None] * 30 + ["0"], splits=["train"] * 31)
    with Classifier(bank, mode="knn") as clf:
        cache.run(clf)
        updated = cache.hood
        assert updated is not None
        fresh = copy.deepcopy(updated)
        fresh.compute_lists()
    same_lists(updated, fresh)
    voters = updated.lists[neighbourhood.VOTERS]
    listed = (voters.pos == updated.keys.index("voter")).any(axis=1)
    assert listed[3]  # the item it copies lists it among its voters
