"""Suggest and audit rankings over a real bank (real LMDB store, real FAISS index)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.classify.audit import audit
from featurebank.classify.classifier import Classifier
from featurebank.classify.suggest import (
    diverse_pick,
    entropy_uncertainty,
    margin_uncertainty,
    suggest,
)
from featurebank.core.errors import FailedPrecondition, InvalidInput
from featurebank.index.build import build_index
from tests.support.specs import make_spec

DIM = 16
CLASSES = ("a", "b", "c")


def centers(seed: int = 0) -> np.ndarray:
    c = np.random.default_rng(seed).normal(size=(len(CLASSES), DIM)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def make_bank(root: Path, flip: dict[int, str] | None = None) -> tuple[Path, dict[str, str]]:
    """30 labelled items per class, 20 unlabelled ones near the centres, and 6 unlabelled
    items half-way between a and b (the ones a label helps most). `flip`: wrong labels.

    Returns the bank and the true class of every key.
    """
    rng = np.random.default_rng(1)
    c = centers()
    keys, vecs, labels, truth = [], [], [], {}
    for ci, name in enumerate(CLASSES):
        for j in range(50):
            key = f"{name}{j:02d}"
            keys.append(key)
            vecs.append(c[ci] + 0.08 * rng.normal(size=DIM))
            labels.append(name if j < 30 else None)
            truth[key] = name
    for j in range(6):
        key = f"between{j}"
        keys.append(key)
        vecs.append(0.5 * (c[0] + c[1]) + 0.02 * rng.normal(size=DIM))
        labels.append(None)
        truth[key] = "a|b"
    for pos, wrong in (flip or {}).items():
        labels[pos] = wrong
    with store_mod.create(root, make_spec(DIM)) as st:
        st.put_batch(keys, np.asarray(vecs, np.float32), labels=labels)
    build_index(root, k=10)
    return root, truth


def test_margin_and_entropy_order_rows_by_doubt() -> None:
    p = np.array([[1.0, 0, 0], [0.6, 0.4, 0], [0.5, 0.5, 0], [0.34, 0.33, 0.33], [0, 0, 0]])
    m = margin_uncertainty(p)
    np.testing.assert_allclose(m, [0.0, 0.8, 1.0, 0.99, 1.0])
    h = entropy_uncertainty(p)
    assert h[0] == 0.0 and h[4] == 1.0
    assert h[1] < h[2] < h[3] <= 1.0
    np.testing.assert_allclose(h[2], np.log(2) / np.log(3))


def test_diverse_pick_spreads_over_clusters_where_margin_repeats_one() -> None:
    rng = np.random.default_rng(0)
    blobs = np.repeat(np.eye(4, dtype=np.float32) * 10, 25, axis=0)
    x = blobs + 0.1 * rng.normal(size=blobs.shape).astype(np.float32)
    u = np.full(100, 0.1)
    u[:25] = 0.9 + 0.001 * np.arange(25)  # the whole first blob is the most uncertain
    u[25:50] = 0.5
    u[50:75] = 0.4
    u[75:] = 0.3
    by_margin = np.argsort(-u)[:4]
    assert set(by_margin // 25) == {0}
    picked = diverse_pick(x, u, 4, pool=25)
    assert sorted((picked // 25).tolist()) == [0, 1, 2, 3]
    assert picked[0] == 24  # most uncertain first, the best of the first blob
    assert list(u[picked]) == sorted(u[picked], reverse=True)


@pytest.mark.parametrize("strategy", ["margin", "entropy", "diverse"])
def test_suggest_ranks_items_between_classes_first(tmp_path: Path, strategy: str) -> None:
    root, truth = make_bank(tmp_path / "bank")
    with Classifier(root) as clf:
        out = suggest(clf, n=6, strategy=strategy)
    between = [truth[s.key] == "a|b" for s in out]
    if strategy == "diverse":  # one question about the a|b region, then other regions
        assert between == [True] + [False] * 5, [s.key for s in out]
    else:
        assert all(between), [s.key for s in out]
    assert [s.score for s in out] == sorted((s.score for s in out), reverse=True)
    assert set(out[0].labels[:2]) == {"a", "b"}
    assert out[0].score > 0.5


def test_suggest_never_offers_labelled_items_and_filters_by_class(tmp_path: Path) -> None:
    root, truth = make_bank(tmp_path / "bank")
    with Classifier(root) as clf:
        out = suggest(clf, n=1000)
        labelled = {k for k, v in zip(*_labels(clf), strict=True) if v is not None}
        assert len(out) == 66 and not labelled & {s.key for s in out}
        only_c = suggest(clf, n=1000, label="c")
        assert only_c and all("c" in s.labels[:2] for s in only_c)
        assert not any(truth[s.key] == "a|b" for s in only_c)
        with pytest.raises(InvalidInput, match="unknown label 'z'.*a, b, c"):
            suggest(clf, label="z")
        with pytest.raises(InvalidInput, match="strategy must be one of margin, entropy, diverse"):
            suggest(clf, strategy="random")
        with pytest.raises(InvalidInput, match="n must be"):
            suggest(clf, n=0)


def _labels(clf: Classifier) -> tuple[list[str], list[str | None]]:
    items = clf.store.to_numpy()
    return items.keys, items.labels


def test_cold_start_covers_every_cluster_where_storage_order_would_not(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    c = centers()
    sizes = (60, 30, 10)  # stored class by class: the first 20 keys are all "a"
    vecs = np.concatenate([c[i] + 0.05 * rng.normal(size=(n, DIM)) for i, n in enumerate(sizes)])
    keys = [f"{CLASSES[i]}{j:02d}" for i, n in enumerate(sizes) for j in range(n)]
    root = tmp_path / "bank"
    with store_mod.create(root, make_spec(DIM)) as st:
        st.put_batch(keys, vecs.astype(np.float32))
    build_index(root, k=5)
    with Classifier(root) as clf:
        picks = suggest(clf, n=3)
    assert sorted(s.key[0] for s in picks) == ["a", "b", "c"]  # one of each cluster
    assert [s.key[0] for s in picks] == ["a", "b", "c"]  # largest cluster first
    assert [round(s.score, 2) for s in picks] == [0.6, 0.3, 0.1] and not picks[0].labels


def test_suggest_needs_labels(tmp_path: Path) -> None:
    root = tmp_path / "bank"
    with store_mod.create(root, make_spec(DIM)) as st:
        st.put_batch([f"k{i}" for i in range(20)], np.eye(20, DIM, dtype=np.float32) + 0.1)
    build_index(root, k=5)
    with Classifier(root) as clf:  # no labels yet: cold start, not an error
        assert len(suggest(clf, n=4)) == 4
    with store_mod.open(root) as st:
        st.set_labels({f"k{i}": "x" for i in range(20)})
    with Classifier(root) as clf, pytest.raises(FailedPrecondition, match="every item"):
        suggest(clf)


def test_audit_finds_flipped_labels_because_items_never_vote_for_themselves(
    tmp_path: Path,
) -> None:
    # positions 3, 55 and 110 are a03 (a), b05 (b) and c10 (c)
    flips = {3: "b", 55: "c", 110: "a"}
    root, truth = make_bank(tmp_path / "bank", flip=flips)
    with Classifier(root) as clf:
        found = audit(clf, n=10)
    assert {f.key for f in found[:3]} == {"a03", "b05", "c10"}
    for f in found[:3]:
        assert f.suggested == truth[f.key] and f.label != truth[f.key]
        assert f.confidence > 0.9 and f.p_label < 0.05
        assert f.key not in {nb.key for nb in f.neighbors}  # never its own evidence
        assert f.neighbors and all(nb.label == f.suggested for nb in f.neighbors)
    assert [f.confidence for f in found] == sorted((f.confidence for f in found), reverse=True)


def test_audit_precision_cuts_where_the_out_of_fold_evidence_says(tmp_path: Path) -> None:
    from featurebank.classify.audit import wrong_label_estimates
    from featurebank.classify.head_training import train_head

    flips = {3: "b", 55: "c", 110: "a", 7: "c"}
    root, truth = make_bank(tmp_path / "bank", flip=flips)
    train_head(root, stacked=False)
    with Classifier(root) as clf:
        everything = audit(clf, n=50)
        est = wrong_label_estimates(clf, everything, clf.default_mode)
        assert len(est) == len(everything) and ((est >= 0) & (est <= 1)).all()
        wrong = {f.key for f in everything if truth[f.key] != f.label}
        assert wrong == {"a03", "a07", "b05", "c10"}
        for p in (0.5, 0.9):
            kept = audit(clf, n=50, precision=p)
            assert kept == everything[: len(kept)]  # a prefix of the ranked list
            assert np.mean(est[: len(kept)]) >= p
            assert len(kept) == len(everything) or np.mean(est[: len(kept) + 1]) < p
        assert len(audit(clf, n=50, precision=0.5)) >= len(audit(clf, n=50, precision=0.9))
        assert {f.key for f in audit(clf, n=50, precision=0.9)} <= wrong
        with pytest.raises(InvalidInput, match="precision"):
            audit(clf, precision=1.5)


def test_audit_of_a_clean_bank_finds_nothing_and_checks_input(tmp_path: Path) -> None:
    root, _ = make_bank(tmp_path / "bank")
    with Classifier(root) as clf:
        assert audit(clf) == []
        with pytest.raises(InvalidInput, match="n must be"):
            audit(clf, n=0)
        with pytest.raises(FailedPrecondition, match="no labelled items in split 'test'"):
            audit(clf, split="test")
