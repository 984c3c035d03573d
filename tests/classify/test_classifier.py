"""Classifier modes over a real bank: real LMDB store, real FAISS index, trained heads."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.classify import metrics
from featurebank.classify.classifier import Classifier
from featurebank.classify.cross_validation import A_GRID, SHRINK_ITEMS
from featurebank.classify.head_training import loo_knn_distribution, train_head
from featurebank.classify.knn import Neighbours, Voter
from featurebank.classify.linear_probe import C_PATH, INPUTS
from featurebank.classify.published_heads import head_status, load_head
from featurebank.core.bank import Bank, publish, staging_dir
from featurebank.core.errors import FailedPrecondition, InvalidInput
from featurebank.index.build import build_index
from tests.support.specs import make_spec

N, DIM = 600, 40


def different_mistakes(n: int = N, d: int = DIM, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two kinds of items: an XOR pattern (neighbours get it, a linear head cannot) and a
    linear signal buried in many noisy dimensions (the head gets it, neighbours do not)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, d), np.float32)
    y = np.zeros(n, np.int64)
    half = n // 2
    s = rng.choice([-1, 1], size=(half, 2))
    x[:half, :2] = 2.0 * s + 0.3 * rng.normal(size=(half, 2))
    x[:half, 2] = 3.0
    x[:half, 4:] = 0.3 * rng.normal(size=(half, d - 4))
    y[:half] = s[:, 0] * s[:, 1] > 0
    c = rng.integers(0, 2, n - half)
    x[half:, 2] = -3.0
    x[half:, 3] = 2 * c - 1
    x[half:, 4:] = 2.5 * rng.normal(size=(n - half, d - 4))
    y[half:] = c
    perm = rng.permutation(n)
    return x[perm], y[perm]


def make_bank(root: Path, x: np.ndarray, y: np.ndarray, splits: list[str]) -> Path:
    with store_mod.create(root, make_spec(x.shape[1])) as st:
        st.put_batch([f"k{i}" for i in range(len(y))], x, [f"c{c}" for c in y], splits)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bank with train/val/test splits, a cosine index and a trained head (once per module)."""
    x, y = different_mistakes()
    splits = ["train"] * 360 + ["val"] * 120 + ["test"] * 120
    bank = make_bank(tmp_path_factory.mktemp("clf") / "bank", x, y, splits)
    build_index(bank)
    train_head(bank, epochs=60, learning_rate=3e-2)
    return bank


@pytest.fixture
def clf(trained: Path) -> Iterator[Classifier]:
    with Classifier(trained) as c:
        yield c


def split_items(bank: Path, split: str) -> store_mod.Items:
    with store_mod.open(bank, readonly=True) as st:
        return st.to_numpy(split=split, labelled_only=True)


def codes(labels: list[str | None], vocab: list[str]) -> np.ndarray:
    return np.array([vocab.index(str(label)) for label in labels])


def test_default_mode_is_hybrid_with_a_head(clf: Classifier) -> None:
    assert clf.default_mode == "hybrid"
    assert clf.head_generation == 1 and clf.index_generation == 1
    assert not clf.head_stale


def test_a1_reproduces_knn_and_a0_reproduces_head(clf: Classifier, trained: Path) -> None:
    items = split_items(trained, "test")
    probs, vocabs, _ = clf.predict_modes(items.vectors, ("knn", "head"))
    for a, mode in ((1.0, "knn"), (0.0, "head")):
        hyb, hv, _ = clf.predict_modes(items.vectors, ("hybrid",), hybrid_a=a)
        assert hv["hybrid"] == vocabs[mode]
        np.testing.assert_allclose(hyb["hybrid"], probs[mode], atol=1e-6)
    # and the public per-mode call agrees with the batch one
    p, v = clf.predict_proba(items.vectors, mode="knn")
    np.testing.assert_allclose(p, probs["knn"], atol=1e-7)


def test_choices_are_cross_validated_and_hybrid_is_never_worst_out_of_fold(
    clf: Classifier, trained: Path
) -> None:
    head = load_head(trained)
    assert head is not None
    m = head.manifest
    # every labelled item outside test (train and val) took part, in 5 folds
    assert m["items"] == 480 and m["cv"]["folds"] == 5 and m["cv"]["scored_items"] == 480
    cv_acc = {mode: row["accuracy"] for mode, row in m["cv_metrics"].items()}
    assert cv_acc["hybrid"] >= max(cv_acc["knn"], cv_acc["head"]), cv_acc
    hy = m["hybrid"]
    assert hy["acts_as"] == "hybrid" and 0.0 < hy["a"] < 1.0  # the two really are mixed here
    # a is the log-loss optimum pulled towards 0.5, the more the fewer items scored it
    trust = 480 / (480 + SHRINK_ITEMS)
    assert hy["a"] == pytest.approx(0.5 + (hy["a_optimum"] - 0.5) * trust, abs=0.006)
    assert hy["a_optimum"] in A_GRID
    # the kNN choice of k and T is what the classifier votes with
    assert clf.voter().k == hy["k"] and clf.voter().temperature == hy["temperature"]
    # the linear probe's L2 strength and input were chosen on the same folds
    assert m["head_params"]["epochs"] == 60 and m["head_kind"] == "linear probe"
    assert m["cv"]["C"] in C_PATH and m["cv"]["input"] in INPUTS


def test_abstention_is_calibrated_and_reachable_per_call(clf: Classifier, trained: Path) -> None:
    items = split_items(trained, "test")
    y = [str(label) for label in items.labels]
    # the head alone cannot get the XOR half of this task: it has answers to withhold
    plain = clf.classify(items.vectors, mode="head", top_n=1)
    assert not any(p.abstained for p in plain)
    for precision in (0.9, 0.99):
        preds = clf.classify(items.vectors, mode="head", top_n=1, abstain_below=precision)
        kept = [p for p in preds if not p.abstained]
        assert all(p.label == "unknown" for p in preds if p.abstained)
        # ranked labels stay with an abstained answer
        assert [p.labels for p in preds] == [p.labels for p in plain]
        right = np.mean([p.label == t for p, t in zip(preds, y, strict=True) if not p.abstained])
        assert kept and right >= precision - 0.05, (precision, right)
    strict = sum(p.abstained for p in clf.classify(items.vectors, "head", abstain_below=0.99))
    loose = sum(p.abstained for p in clf.classify(items.vectors, "head", abstain_below=0.9))
    assert strict > loose > 0  # a higher precision costs more abstentions
    assert clf.abstain_threshold(0.99, "knn") > clf.abstain_threshold(0.5, "knn")
    assert clf.predict(items.vectors[:3], abstain_below=1.0).count("unknown") >= 0
    with pytest.raises(FailedPrecondition, match="cross-validated scores for 'stacked'"):
        clf.classify(items.vectors[:2], mode="stacked", abstain_below=0.9)
    with pytest.raises(InvalidInput, match="abstain_below"):
        clf.classify(items.vectors[:2], abstain_below=1.5)


def test_hybrid_beats_knn_and_head_when_they_err_differently(
    clf: Classifier, trained: Path
) -> None:
    items = split_items(trained, "test")
    probs, vocabs, _ = clf.predict_modes(
        items.vectors, ("knn", "head", "hybrid", "stacked"), exclude_ids=items.ids
    )
    acc = {m: metrics.accuracy(codes(items.labels, vocabs[m]), probs[m]) for m in probs}
    assert acc["hybrid"] > max(acc["knn"], acc["head"]) + 0.03, acc
    assert acc["stacked"] > max(acc["knn"], acc["head"]), acc


def test_stacked_never_lets_an_item_vote_for_itself(tmp_path: Path) -> None:
    # One item carries a label nobody else has; its nearest neighbour is itself.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    labels = ["lonely"] + ["a", "b"] * 14 + ["a"]
    bank = tmp_path / "bank"
    with store_mod.create(bank, make_spec(8)) as st:
        st.put_batch([f"k{i}" for i in range(30)], x, labels, ["train"] * 30)
    vocab = sorted(set(labels))
    ids = np.arange(30, dtype=np.int64)
    y = np.array([vocab.index(v) for v in labels])
    exact = Neighbours(vocab, bank_ids=ids, bank_vectors=x, bank_codes=y)
    build_index(bank)
    from featurebank.index.searcher import Searcher

    with Searcher.load(bank) as searcher:
        for nb in (exact, Neighbours(vocab, searcher)):
            loo = loo_knn_distribution(nb, x, ids, Voter(5, 0.05))
            assert loo[0, vocab.index("lonely")] == 0.0
            found, codes_, _ = nb.search(x, 5, exclude_ids=ids)
            assert not (found == ids[:, None]).any()
            own = np.array([y[i] for i in range(30)])
            # without leave-one-out the item's own label would top every row
            _, codes_self, _ = nb.search(x, 1)
            assert (codes_self[:, 0] == own).all()
            assert codes_[0].tolist().count(vocab.index("lonely")) == 0
    # and the trained stacked head saw that distribution: no label leaks into training
    m = train_head(bank, epochs=3, learning_rate=3e-2)
    assert m["cv"]["scored_items"] == 29  # the lonely label cannot be scored out of sample


def test_classify_returns_ranked_labels_and_neighbours(clf: Classifier, trained: Path) -> None:
    items = split_items(trained, "test")
    preds = clf.classify(items.vectors[:3], top_n=2, include_neighbors=True, k=7)
    assert len(preds) == 3
    for p in preds:
        assert 1 <= len(p.labels) <= 2 and p.probs == sorted(p.probs, reverse=True)
        assert len(p.neighbors) == 7
        assert all(n.label in ("c0", "c1") for n in p.neighbors)
        scores = [n.score for n in p.neighbors]
        assert scores == sorted(scores, reverse=True)
    head_only = clf.classify(items.vectors[:2], mode="head", top_n=5)
    assert all(len(p.labels) == 2 and p.neighbors == [] for p in head_only)
    assert abs(sum(head_only[0].probs) - 1.0) < 1e-5


def test_predictions_say_which_mode_and_generations_answered(
    clf: Classifier, trained: Path
) -> None:
    x = split_items(trained, "test").vectors[:3]
    answered = {
        mode: {(p.mode, p.index_generation, p.head_generation) for p in clf.classify(x, mode)}
        for mode in (None, "knn", "head", "stacked")
    }
    assert answered == {
        None: {("hybrid", 1, 1)},  # the default with a head
        "knn": {("knn", 1, None)},  # no head took part
        "head": {("head", 1, 1)},
        "stacked": {("stacked", 1, 1)},
    }
    with pytest.raises(InvalidInput, match="mode"):
        clf.classify(x, mode="")


def test_bad_inputs(clf: Classifier) -> None:
    with pytest.raises(InvalidInput, match="mode"):
        clf.classify(np.zeros((1, DIM), np.float32), mode="svm")
    with pytest.raises(InvalidInput, match="dimension"):
        clf.classify(np.zeros((1, DIM + 1), np.float32))
    bad = np.zeros((2, DIM), np.float32)
    bad[1, 0] = np.nan
    with pytest.raises(InvalidInput, match="NaN"):
        clf.predict_proba(bad)
    with pytest.raises(InvalidInput, match="top_n"):
        clf.classify(np.zeros((1, DIM), np.float32), top_n=0)


def test_without_head_knn_only_and_without_index_fails(tmp_path: Path) -> None:
    x, y = different_mistakes(n=60, seed=3)
    bank = make_bank(tmp_path / "bank", x, y, ["train"] * 60)
    with pytest.raises(FailedPrecondition, match="index"):
        Classifier(bank)
    build_index(bank)
    with Classifier(bank) as c:
        assert c.default_mode == "knn" and c.head_generation is None and not c.head_stale
        assert c.classify(x[:2])[0].labels
        with pytest.raises(FailedPrecondition, match="head train"):
            c.classify(x[:2], mode="hybrid")
    assert head_status(bank) is None


def test_stale_head_is_detected(trained: Path, tmp_path: Path) -> None:
    bank = tmp_path / "copy"
    shutil.copytree(trained, bank)
    with Classifier(bank) as c:
        assert not c.head_stale
        status = head_status(bank)
        assert status is not None and not status["stale"]
        with store_mod.open(bank) as st:
            st.set_labels({"k0": "c1" if st.get_by_keys(["k0"]).labels[0] == "c0" else "c0"})
        assert c.head_stale
        status = head_status(bank)
        assert status is not None and status["stale"]
        assert status["store_labels_generation"] > status["labels_generation"]


def test_reload_swaps_index_and_head_while_classifying(trained: Path, tmp_path: Path) -> None:
    bank = tmp_path / "copy"
    shutil.copytree(trained, bank)
    x = split_items(bank, "test").vectors[:8]
    errors: list[BaseException] = []
    seen: set[tuple[int, int | None]] = set()
    stop = threading.Event()
    with Classifier(bank) as c:

        def hammer() -> None:
            while not stop.is_set():
                try:
                    before = (c.index_generation, c.head_generation)
                    preds = c.classify(x, top_n=1)
                    assert len(preds) == 8
                    # one snapshot per call: every row names the same generations
                    assert len({(p.index_generation, p.head_generation) for p in preds}) == 1
                    seen.add(before)
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)
                    return

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        build_index(bank)
        # publish a copy of the head as a new generation (what a retrain does)
        heads = Bank(bank).heads_dir
        staging = staging_dir(heads)
        for f in (heads / "1").iterdir():
            shutil.copy(f, staging / f.name)
        publish(heads, staging)
        c.reload()
        after = (c.index_generation, c.head_generation)
        answered = {(p.index_generation, p.head_generation) for p in c.classify(x, top_n=1)}
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert after == (2, 2)
    assert answered == {(2, 2)}  # the answer says it came from the new generations
    assert (1, 1) in seen


def test_unlabelled_and_held_out_neighbours_never_crowd_out_the_vote(tmp_path: Path) -> None:
    """A few-shot bank: the labelled items are far from the query, the unlabelled and test
    items are close, yet every one of the k neighbours that vote is a labelled train item."""
    rng = np.random.default_rng(0)
    dim = 8
    labelled = np.eye(dim, dtype=np.float32)[:2] + 0.01 * rng.normal(size=(2, dim))
    crowd = np.tile(np.eye(dim, dtype=np.float32)[2], (60, 1)) + 0.01 * rng.normal(size=(60, dim))
    vectors = np.vstack([labelled, crowd]).astype(np.float32)
    labels = ["a", "b"] + [None] * 50 + ["b"] * 10
    splits = ["train", "train"] + ["none"] * 50 + ["test"] * 10
    with store_mod.create(tmp_path, make_spec(dim)) as st:
        st.put_batch([f"k{i}" for i in range(len(vectors))], vectors, labels, splits)
    build_index(tmp_path)
    query = (0.9 * np.eye(dim)[2] + 0.3 * np.eye(dim)[0]).astype(np.float32)[None]
    with Classifier(tmp_path, mode="knn") as c:
        pred = c.classify(query, k=5, include_neighbors=True)[0]
    assert pred.labels[0] == "a"
    assert {n.key for n in pred.neighbors} <= {"k0", "k1"}
