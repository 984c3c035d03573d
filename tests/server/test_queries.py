"""Metadata, filters, thresholds, groups, batches, scrolling, counting and recommending
through a real server on a loopback port."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2

from featurebank import store as store_mod
from featurebank.core.spec import Spec
from featurebank.index.build import build_index
from featurebank.server.app import ServeConfig
from featurebank.v1 import featurebank_pb2 as pb
from featurebank.v1 import featurebank_pb2_grpc as pb_grpc
from tests.support.server import CLASSES, RunningServer, clustered, free_port

DIM = 16


def struct(d: dict[str, object]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


def meta_of(i: int) -> dict[str, object]:
    return {"camera": i % 4, "night": i % 2 == 0, "site": "north" if i % 3 else "south"}


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], np.ndarray, list[str]]:
    root = tmp_path_factory.mktemp("q") / "bank"
    keys, vectors, labels = clustered(30, DIM)
    spec = Spec(backbone="external", weights="external", input_size=None, resize="none",
                dim=DIM, dtype="float32")
    with store_mod.create(root, spec) as st:
        st.put_batch(keys, vectors, labels=labels, meta=[meta_of(i) for i in range(len(keys))])
    build_index(root)
    return root, keys, vectors, labels


@pytest.fixture(scope="module")
def stub(bank: tuple[Path, list[str], np.ndarray, list[str]]) -> Iterator[pb_grpc.FeatureBankStub]:
    with (RunningServer(ServeConfig(bank=bank[0], port=free_port())) as rs,
          grpc.insecure_channel(rs.target) as channel):
        yield pb_grpc.FeatureBankStub(channel)


def vec(v: np.ndarray) -> pb.Input:
    return pb.Input(vector=pb.Vector(values=v.tolist()))


def test_search_filters_by_metadata_label_and_key(stub: pb_grpc.FeatureBankStub, bank) -> None:  # type: ignore[no-untyped-def]
    _, keys, vectors, labels = bank
    assert len(keys) <= 1024
    for text, ok in (
        ("meta.camera == 2", lambda i: meta_of(i)["camera"] == 2),
        ('meta.site == "south" and meta.night == true', lambda i: meta_of(i)["site"] == "south" and meta_of(i)["night"]),
        (f'label != "{CLASSES[0]}" and not meta.camera in (0, 1)', lambda i: labels[i] != CLASSES[0] and meta_of(i)["camera"] >= 2),
        (f'key prefix "{CLASSES[1]}/"', lambda i: keys[i].startswith(f"{CLASSES[1]}/")),
        ("meta.camera >= 3 or meta.camera < 1", lambda i: meta_of(i)["camera"] in (0, 3)),
    ):
        passing = {keys[i] for i in range(len(keys)) if ok(i)}
        r = stub.Search(pb.SearchRequest(input=vec(vectors[0]), k=10, filter=text, include_metadata=True))
        got = [n.key for n in r.neighbors]
        assert len(got) == 10 and set(got) <= passing, text
        ranked = stub.Search(pb.SearchRequest(input=vec(vectors[0]), k=len(keys))).neighbors
        truth = [n.key for n in ranked if n.key in passing][:10]  # every item ranked, then filtered
        assert set(got) == set(truth), text
        assert {n.metadata["site"] for n in r.neighbors} <= {"north", "south"}


def test_a_filter_nothing_passes_returns_no_hits(stub: pb_grpc.FeatureBankStub, bank) -> None:  # type: ignore[no-untyped-def]
    r = stub.Search(pb.SearchRequest(input=vec(bank[2][0]), k=5, filter="meta.camera == 99"))
    assert list(r.neighbors) == []
    assert stub.Count(pb.CountRequest(filter="meta.camera == 99")).count == 0


@pytest.mark.parametrize("call", ["Search", "Classify", "Count", "Scroll"])
def test_a_malformed_filter_is_invalid_argument_naming_the_position(
    stub: pb_grpc.FeatureBankStub, bank, call: str  # type: ignore[no-untyped-def]
) -> None:
    request = {
        "Search": pb.SearchRequest(input=vec(bank[2][0]), filter='meta.camera == 2 and'),
        "Classify": pb.ClassifyRequest(input=vec(bank[2][0]), filter='meta.camera == 2 and'),
        "Count": pb.CountRequest(filter='meta.camera == 2 and'),
        "Scroll": pb.ScrollRequest(filter='meta.camera == 2 and'),
    }[call]
    with pytest.raises(grpc.RpcError) as e:
        getattr(stub, call)(request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "filter: expected a field" in e.value.details() and "position 21" in e.value.details()


def test_classify_with_a_filter_votes_only_among_matching_items(stub: pb_grpc.FeatureBankStub, bank) -> None:  # type: ignore[no-untyped-def]
    vectors = bank[2]
    plain = stub.Classify(pb.ClassifyRequest(input=vec(vectors[0]), mode=pb.MODE_KNN, include_neighbors=True))
    assert plain.labels[0].label == CLASSES[0]
    other = CLASSES[2]
    r = stub.Classify(pb.ClassifyRequest(input=vec(vectors[0]), mode=pb.MODE_KNN,
                                         include_neighbors=True, filter=f'label == "{other}"'))
    assert [lp.label for lp in r.labels] == [other]
    assert {n.label for n in r.neighbors} == {other}
    batch = stub.ClassifyBatch(pb.ClassifyBatchRequest(
        inputs=[vec(vectors[0]), vec(vectors[40])], mode=pb.MODE_KNN, filter=f'label == "{other}"'))
    assert [res.labels[0].label for res in batch.results] == [other, other]


def test_score_threshold_and_groups(stub: pb_grpc.FeatureBankStub, bank) -> None:  # type: ignore[no-untyped-def]
    vectors = bank[2]
    full = stub.Search(pb.SearchRequest(input=vec(vectors[0]), k=50))
    cut = full.neighbors[20].score
    r = stub.Search(pb.SearchRequest(input=vec(vectors[0]), k=50, score_threshold=cut))
    assert 0 < len(r.neighbors) <= 50 and all(n.score >= cut for n in r.neighbors)
    assert [n.key for n in r.neighbors] == [n.key for n in full.neighbors if n.score >= cut]
    high = stub.Search(pb.SearchRequest(input=vec(vectors[0]), k=10, score_threshold=1e9))
    assert list(high.neighbors) == []
    g = stub.Search(pb.SearchRequest(input=vec(vectors[0]), k=9, group_by="label", group_size=2))
    by = [n.label for n in g.neighbors]
    assert len(by) == 2 * len(CLASSES) if 2 * len(CLASSES) < 9 else len(by) == 9
    assert max(by.count(lab) for lab in set(by)) <= 2 and len(set(by)) >= 3
    m = stub.Search(pb.SearchRequest(input=vec(vectors[0]), k=4, group_by="meta.camera", include_metadata=True))
    assert sorted(int(n.metadata["camera"]) for n in m.neighbors) == [0, 1, 2, 3]
    for bad, msg in ((pb.SearchRequest(input=vec(vectors[0]), group_by="colour"), "group_by"),
                     (pb.SearchRequest(input=vec(vectors[0]), group_size=3), "group_size needs")):
        with pytest.raises(grpc.RpcError) as e:
            stub.Search(bad)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and msg in e.value.details()


def test_search_batch_answers_in_order_and_a_bad_request_fails_alone(stub: pb_grpc.FeatureBankStub, bank) -> None:  # type: ignore[no-untyped-def]
    vectors = bank[2]
    requests = [
        pb.SearchRequest(input=vec(vectors[0]), k=3),
        pb.SearchRequest(input=vec(vectors[0]), k=3, filter="label =="),
        pb.SearchRequest(input=pb.Input(key="no/such/key"), k=3),
        pb.SearchRequest(input=vec(vectors[40]), k=3, filter="meta.camera == 1"),
    ]
    r = stub.SearchBatch(pb.SearchBatchRequest(requests=requests))
    assert [x.WhichOneof("outcome") for x in r.results] == ["response", "error", "error", "response"]
    assert r.results[1].error.code == "INVALID_ARGUMENT" and "requests[1].filter" in r.results[1].error.message
    assert r.results[2].error.code == "NOT_FOUND"
    single = stub.Search(requests[3])
    assert [n.key for n in r.results[3].response.neighbors] == [n.key for n in single.neighbors]


def test_recommend_avoids_negatives_the_average_query_would_return(
    tmp_path: Path,
) -> None:
    """Positives on both sides of a negative cluster: their average lands on it."""
    rng = np.random.default_rng(7)
    a, b = np.zeros(DIM, np.float32), np.zeros(DIM, np.float32)
    a[0], b[0] = 1.0, -1.0
    mid = np.zeros(DIM, np.float32)
    mid[1] = 0.05
    groups = {"a": a, "b": b, "mid": mid}
    keys, vectors = [], []
    for name, c in groups.items():
        for j in range(30):
            keys.append(f"{name}/{j}")
            vectors.append(c + 0.02 * rng.standard_normal(DIM).astype(np.float32))
    spec = Spec(backbone="external", weights="external", input_size=None, resize="none",
                dim=DIM, dtype="float32")
    root = tmp_path / "bank"
    with store_mod.create(root, spec) as st:
        st.put_batch(keys, np.stack(vectors), labels=[k.split("/")[0] for k in keys])
    build_index(root, metric="l2", factory="Flat", transform="none")
    pos = [pb.Input(key=k) for k in ("a/0", "a/1", "b/0")]
    neg = [pb.Input(key=k) for k in ("mid/0", "mid/1")]
    with RunningServer(ServeConfig(bank=root, port=free_port())) as rs, grpc.insecure_channel(rs.target) as ch:
        s = pb_grpc.FeatureBankStub(ch)
        plain = s.Search(pb.SearchRequest(input=vec(np.mean([vectors[0], vectors[1], vectors[30]], 0)), k=10))
        assert any(n.key.startswith("mid/") for n in plain.neighbors)  # the test is built so
        for strategy in ("average", "best_score"):
            r = s.Recommend(pb.RecommendRequest(positives=pos, negatives=neg, k=10, strategy=strategy))
            got = [n.key for n in r.neighbors]
            assert len(got) == 10 and not any(k.startswith("mid/") for k in got), (strategy, got)
            assert not {"a/0", "a/1", "b/0"} & set(got)
            assert got == [n.key for n in sorted(r.neighbors, key=lambda n: -n.score)]
        f = s.Recommend(pb.RecommendRequest(positives=pos, negatives=neg, k=5, filter='label == "b"'))
        assert {n.key.split("/")[0] for n in f.neighbors} == {"b"}
        with pytest.raises(grpc.RpcError) as e:
            s.Recommend(pb.RecommendRequest(negatives=neg))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:
            s.Recommend(pb.RecommendRequest(positives=pos, strategy="median"))
        assert "strategy" in e.value.details()


def test_metadata_through_upsert_set_metadata_scroll_and_count(tmp_path: Path) -> None:
    root = tmp_path / "bank"
    keys, vectors, labels = clustered(10, DIM)
    spec = Spec(backbone="external", weights="external", input_size=None, resize="none",
                dim=DIM, dtype="float32")
    with store_mod.create(root, spec) as st:
        st.put_batch(keys, vectors, labels=labels)
    build_index(root)
    with RunningServer(ServeConfig(bank=root, port=free_port())) as rs, grpc.insecure_channel(rs.target) as ch:
        s = pb_grpc.FeatureBankStub(ch)
        items = [pb.UpsertItem(key=f"new/{i}", vector=pb.Vector(values=vectors[i].tolist()),
                               metadata=struct({"camera": 4, "n": i, "tag": "x"})) for i in range(5)]
        s.Upsert(iter(items))
        assert s.Count(pb.CountRequest(filter="meta.camera == 4")).count == 5
        r = s.Search(pb.SearchRequest(input=vec(vectors[0]), k=3, filter="meta.camera == 4", include_metadata=True))
        assert r.neighbors[0].key == "new/0" and r.neighbors[0].metadata["tag"] == "x"
        done = s.SetMetadata(pb.SetMetadataRequest(items=[
            pb.MetadataAssignment(key="new/0", metadata=struct({"camera": 5, "tag": None}))]))
        assert done.updated == 1
        assert s.Count(pb.CountRequest(filter="meta.camera == 4")).count == 4
        hit = s.Search(pb.SearchRequest(input=vec(vectors[0]), k=1, filter="meta.camera == 5", include_metadata=True)).neighbors[0]
        assert hit.key == "new/0" and "tag" not in hit.metadata and hit.metadata["n"] == 0
        with pytest.raises(grpc.RpcError) as e:
            s.SetMetadata(pb.SetMetadataRequest(items=[pb.MetadataAssignment(key="nope", metadata=struct({"a": 1}))]))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:
            s.SetMetadata(pb.SetMetadataRequest(items=[pb.MetadataAssignment(key="new/1", metadata=struct({"a": {"b": 1}}))]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "new/1" in e.value.details()
        page = s.Scroll(pb.ScrollRequest(filter='meta.tag == "x"', limit=3, include_vectors=True))
        assert [i.key for i in page.items] == ["new/1", "new/2", "new/3"] and page.next_page_token
        assert len(page.items[0].vector.values) == DIM and page.items[0].metadata["camera"] == 4
        last = s.Scroll(pb.ScrollRequest(filter='meta.tag == "x"', limit=3, page_token=page.next_page_token))
        assert [i.key for i in last.items] == ["new/4"] and last.next_page_token == ""
        with pytest.raises(grpc.RpcError) as e:
            s.Scroll(pb.ScrollRequest(page_token="garbage!"))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_scroll_returns_every_item_once_while_upserts_land(tmp_path: Path) -> None:
    scroll_while_upserting(tmp_path, 20_000)


@pytest.mark.slow
def test_scroll_over_100k_returns_every_item_once_while_upserts_land(tmp_path: Path) -> None:
    scroll_while_upserting(tmp_path, 100_000)


def scroll_while_upserting(tmp_path: Path, n: int) -> None:
    """Pages of 1,000 in key order while a writer adds new keys and replaces old ones: every
    key present at the start comes back exactly once, in order."""
    root = tmp_path / "bank"
    rng = np.random.default_rng(3)
    spec = Spec(backbone="external", weights="external", input_size=None, resize="none",
                dim=8, dtype="float32")
    start_keys = [f"k{i:06d}" for i in rng.permutation(n)]
    with store_mod.create(root, spec) as st:
        st.put_batch(start_keys, rng.standard_normal((n, 8)).astype(np.float32))
    build_index(root)
    with RunningServer(ServeConfig(bank=root, port=free_port())) as rs, grpc.insecure_channel(rs.target) as ch:
        s = pb_grpc.FeatureBankStub(ch)
        stop = threading.Event()
        errors: list[BaseException] = []
        landed = [0]  # upsert calls answered while the scroll ran

        def writer() -> None:
            i = 0
            try:
                while not stop.is_set():
                    batch = [pb.UpsertItem(key=f"k{int(j):06d}x", vector=pb.Vector(values=[0.1] * 8))
                             for j in rng.integers(0, n, 20)]
                    batch += [pb.UpsertItem(key=start_keys[i % n], vector=pb.Vector(values=[0.2] * 8))]
                    s.Upsert(iter({b.key: b for b in batch}.values()))
                    i += 1
                    landed[0] = i
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        t = threading.Thread(target=writer)
        t.start()
        seen: list[str] = []
        token = ""
        try:
            while True:
                page = s.Scroll(pb.ScrollRequest(limit=1000, page_token=token))
                seen += [i.key for i in page.items]
                token = page.next_page_token
                if not token:
                    break
        finally:
            stop.set()
            t.join(60)
        assert not errors, errors
        assert landed[0] > 0  # writes really landed between pages
        assert len(seen) == len(set(seen))  # none twice
        assert set(start_keys) <= set(seen)  # none of those present at the start skipped
        assert seen == sorted(seen)
        assert s.Count(pb.CountRequest()).count >= n


def test_filters_hold_during_a_rebuild_and_on_a_replica(tmp_path: Path) -> None:
    import time

    from featurebank.server.client import FeatureBankClient, RemoteError
    from tests.support.server import make_vector_bank

    bank = make_vector_bank(tmp_path / "bank", dim=DIM, n_per_class=40)
    with store_mod.open(bank) as st:
        keys = st.item_table().keys
        st.set_meta({k: {"odd": i % 2 == 1} for i, k in enumerate(keys)})
    odd = {k for i, k in enumerate(keys) if i % 2 == 1}
    with RunningServer(ServeConfig(bank=bank, port=free_port())) as rs, FeatureBankClient(rs.target) as c:
        query = np.asarray(c.scroll(limit=1, include_vectors=True).items[0].vector.values)
        op = c.rebuild_index(factory="HNSW16", allow_below_target=True)
        seen = 0
        while not c.get_operation(op.id).done or seen == 0:
            hits = c.search(vector=query, k=10, filter="meta.odd == true").neighbors
            assert len(hits) == 10 and {h.key for h in hits} <= odd
            seen += 1
        assert c.get_operation(op.id).error.code == ""
        probe = [h.key for h in c.search(vector=query, k=10, filter="meta.odd == true").neighbors]
    replica = ServeConfig(bank=bank, port=free_port(), replica=True, follow_interval_s=0.05)
    with RunningServer(replica) as rs, FeatureBankClient(rs.target) as c:
        c.wait_until_serving(10)
        assert [h.key for h in c.search(vector=query, k=10, filter="meta.odd == true").neighbors] == probe
        assert c.count("meta.odd == true") == len(odd)
        with pytest.raises(RemoteError) as e:
            c.set_metadata({keys[0]: {"odd": True}})
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with store_mod.open(bank) as st:  # what the primary writes, the replica follows
            st.set_meta({keys[0]: {"odd": True}})
        deadline = time.monotonic() + 10
        while c.count("meta.odd == true") != len(odd) + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.count("meta.odd == true") == len(odd) + 1
