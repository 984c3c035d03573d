"""Writes, results and connections of the Python API on banks of vectors (no model needed):
real LMDB stores, real FAISS indexes, a real server on a loopback port."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import featurebank as fb
from featurebank.core.errors import FailedPrecondition, InvalidInput, NotFound
from featurebank.server.client import RemoteError
from tests.support.server import clustered

ROOT = Path(__file__).resolve().parents[2]
DIM = 16


def vector_bank(root: Path, n_per_class: int = 12) -> tuple[fb.LocalBank, list[str], np.ndarray]:
    bank = fb.create(root, dim=DIM)
    keys, vectors, labels = clustered(n_per_class, DIM)
    unlabelled = [None if i % 4 == 0 else label for i, label in enumerate(labels)]
    written = bank.upsert(vectors, keys=keys, labels=unlabelled, splits="train")
    assert (written.added, written.replaced, written.store_generation) == (len(keys), 0, 1)
    return bank, keys, vectors


def test_import_featurebank_loads_neither_tensorflow_nor_grpc() -> None:
    code = (
        "import sys, featurebank as fb\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras', 'grpc', 'faiss') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert callable(fb.create) and callable(fb.connect) and callable(fb.open)\n"
        "assert 'tensorflow' not in sys.modules\n"
        "assert 'create' in dir(fb)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_public_name_has_a_docstring() -> None:
    for name in fb.__all__:
        obj = getattr(fb, name)
        assert (obj.__doc__ or "").strip(), name
        for attr, member in vars(obj).items() if isinstance(obj, type) else ():
            if not attr.startswith("_") and callable(member):
                assert (member.__doc__ or "").strip(), f"{name}.{attr}"


def test_writes_in_process(tmp_path: Path) -> None:
    bank, keys, vectors = vector_bank(tmp_path / "b")
    with pytest.raises(FailedPrecondition, match="no index yet"):
        bank.classify(vectors[0])
    assert bank.build_index().index_generation == 1
    assert bank.classify(vectors[1]).label == "cat"
    # searchable at once after a write, from the live index's in-memory segment
    new = vectors[:2] + 0.001
    written = bank.upsert(new, keys=["new-a", keys[1]], labels=["fox", "fox"])
    assert (written.added, written.replaced, written.index_generation) == (1, 1, 1)
    assert bank.search(new[0], k=1).keys == ["new-a"]
    assert bank.search(new[0], k=2, labels=["fox"]).labels == ["fox", "fox"]
    assert bank.set_labels({"new-a": "dog", keys[2]: None}).updated == 2
    assert bank.search(new[0], k=1).labels == ["dog"]
    with pytest.raises(NotFound, match="unknown key 'nope'"):
        bank.set_labels({"nope": "cat"})
    with pytest.raises(NotFound, match="unknown key 'nope'"):
        bank.delete(["new-a", "nope"])
    assert bank.delete(["new-a", "nope"], ignore_missing=True).deleted == 1
    assert "new-a" not in bank.search(new[0], k=5).keys
    info = bank.info()
    assert (info.count, info.index_generation, info.head_generation) == (len(keys), 1, None)
    assert bank.build_index(transform="l2").index_generation == 2
    with pytest.raises(InvalidInput, match="unknown index parameter"):
        bank.build_index(colour="red")
    bank.close()
    reopened = fb.open(tmp_path / "b")
    assert reopened.info().index_generation == 2
    assert reopened.search(fb.keys(keys[0]), k=1).keys != [keys[0]]
    reopened.close()
    with pytest.raises(FailedPrecondition, match="featurebank.open"):
        fb.create(tmp_path / "b", dim=DIM)
    with pytest.raises(NotFound, match="no store"):
        fb.open(tmp_path / "elsewhere")
    with pytest.raises(InvalidInput, match="backbone=... .* or dim="):
        fb.create(tmp_path / "c")
    with pytest.raises(FailedPrecondition, match="no model to embed images"):
        fb.open(tmp_path / "b").embed(np.zeros((8, 8, 3), np.uint8))


def test_writes_over_grpc_while_served(tmp_path: Path) -> None:
    bank, keys, vectors = vector_bank(tmp_path / "b")
    with bank.serve() as served, fb.connect(served.address) as remote:
        # a bank without an index is served once its first write builds one
        written = remote.upsert(vectors[:1] + 0.001, keys=["first"], labels="cat")
        assert (written.added, written.index_generation) == (1, 1)
        with pytest.raises(FailedPrecondition, match="write through featurebank.connect"):
            bank.upsert(vectors[:1], keys=["x"])
        assert remote.set_labels({"first": "dog"}).updated == 1
        assert remote.search(vectors[0] + 0.001, k=1).labels == ["dog"]
        assert remote.delete("first").deleted == 1
        with pytest.raises(RemoteError, match="NOT_FOUND"):
            remote.delete(["first"])
        published = remote.build_index(transform="l2")
        assert published.index_generation is not None and published.index_generation >= 2
        assert remote.info().index_generation == published.index_generation
        with pytest.raises(InvalidInput, match="unknown index parameter"):
            remote.build_index(colour="red")
        with pytest.raises(InvalidInput, match="hidden and epochs only"):
            remote.train_head(dropout=0.5)
    # the server is gone: the bank in process writes again, and sees what the server wrote
    assert bank.info().count == len(keys)
    assert bank.upsert(vectors[:1] + 0.002, keys=["after"]).added == 1
    assert bank.search(vectors[0] + 0.002, k=1).keys == ["after"]
    bank.close()


def test_a_token_is_asked_for_and_given(tmp_path: Path) -> None:
    bank, _, vectors = vector_bank(tmp_path / "b")
    bank.build_index()
    with bank.serve(token="s3cret") as served:
        with fb.connect(served.address) as anonymous, pytest.raises(RemoteError, match="UNAUTHENTICATED"):
            anonymous.classify(vectors[0])
        with fb.connect(served.address, token="s3cret") as remote:
            assert remote.classify(vectors[0]).label == "cat"
            assert remote.upsert(vectors[:1], keys=["t"]).added == 1
    with pytest.raises(InvalidInput, match="host:port"):
        fb.connect("nowhere")
    with pytest.raises(InvalidInput, match="unknown connect option.*: colour"):
        fb.connect("127.0.0.1:1", colour="red")
    with pytest.raises(InvalidInput, match="unknown serve option.*: colour"):
        bank.serve(colour="red")
    bank.close()


def test_results_convert_to_dicts_numpy_and_pandas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bank, keys, vectors = vector_bank(tmp_path / "b")
    bank.build_index()
    preds = bank.classify(vectors[:3], top_n=2, include_neighbors=True, k=3)
    assert isinstance(preds, fb.Batch) and len(preds) == 3
    first = preds[0].to_dict()
    assert first["label"] == "cat" and len(first["neighbors"]) == 3
    assert set(first["neighbors"][0]) == {"key", "label", "score"}
    assert preds.to_numpy().tolist() == ["cat", "cat", "cat"]
    assert preds.to_numpy("probability").dtype == np.float64
    hits = bank.search(vectors[:2], k=3)
    assert hits.to_numpy().shape == (2, 3) and hits.to_numpy("scores").shape == (2, 3)
    assert bank.search(vectors[0], k=3).to_dict()["neighbors"][0]["key"] == keys[0]
    with pytest.raises(InvalidInput, match="has no field 'colour'"):
        hits.to_numpy("colour")
    pd = pytest.importorskip("pandas")
    table = hits.to_pandas()
    assert isinstance(table, pd.DataFrame) and len(table) == 6  # one row per neighbour
    assert list(table.columns) == ["query", "rank", "key", "label", "score", "index_generation"]
    assert table["query"].tolist() == [0, 0, 0, 1, 1, 1]
    assert len(preds.to_pandas()) == 3 and "neighbors" not in preds.to_pandas().columns
    suggestions = bank.suggest(4)
    assert len(suggestions) == 4 and all(s.key in keys for s in suggestions)
    assert suggestions.to_pandas()["key"].tolist() == suggestions.to_numpy().tolist()
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    with pytest.raises(FailedPrecondition, match="pip install pandas"):
        hits.to_pandas()
    bank.close()


def test_labelling_and_head_on_both_sides(tmp_path: Path) -> None:
    bank, keys, vectors = vector_bank(tmp_path / "b", n_per_class=10)
    bank.set_labels({keys[1]: "dog"})  # a cat labelled dog: audit must doubt it
    bank.build_index()
    found = bank.audit(3)
    assert found[0].key == keys[1] and found[0].suggested == "cat"
    trained = bank.train_head(epochs=3)
    assert (trained.index_generation, trained.head_generation) == (1, 1)
    assert bank.classify(vectors[5]).head_generation == 1
    assert bank.classify(vectors[5], mode="knn").head_generation is None
    with bank.serve() as served, served.connect() as remote:
        assert [f.key for f in remote.audit(3)] == [f.key for f in bank.audit(3)]
        assert remote.audit(3)[0].key == keys[1]
        assert [s.key for s in remote.suggest(3)] == [s.key for s in bank.suggest(3)]
        assert remote.classify(vectors[5]).head_generation == 1
        retrained = remote.train_head(epochs=3)
        assert retrained.head_generation == 2 and retrained.index_generation == 2
        assert remote.classify(vectors[5], mode="head").head_generation == 2
    bank.close()
