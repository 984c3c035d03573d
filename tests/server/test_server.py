"""Every RPC and status code against one real server over a vector bank (external spec)."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from featurebank.server.app import ServeConfig
from featurebank.server.client import FeatureBankClient, RemoteError, make_input
from featurebank.v1 import featurebank_pb2 as pb
from tests.support import ROOT
from tests.support.server import CLASSES, RunningServer, class_centers, free_port, make_vector_bank

DIM = 16


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    bank = make_vector_bank(tmp_path_factory.mktemp("bank") / "bank", dim=DIM)
    config = ServeConfig(bank=bank, port=free_port(), metrics_port=0, max_batch_size=16)
    with RunningServer(config) as rs:
        yield rs


@pytest.fixture(scope="module")
def client(served: RunningServer) -> Iterator[FeatureBankClient]:
    with FeatureBankClient(served.target, timeout=60, max_message_bytes=64 << 20) as c:
        yield c


def center(name: str) -> np.ndarray:
    return class_centers(DIM)[CLASSES.index(name)]


def expect(code: grpc.StatusCode, fn: object, *args: object, match: str = "", **kw: object) -> str:
    assert callable(fn)
    with pytest.raises(RemoteError) as info:
        fn(*args, **kw)
    assert info.value.code == code, info.value
    assert match in info.value.details, info.value.details
    return info.value.details


def test_health_is_serving(client: FeatureBankClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("featurebank.v1.FeatureBank") == "SERVING"


def test_classify_by_vector(client: FeatureBankClient) -> None:
    r = client.classify(vector=center("dog"), top_n=2)
    assert r.labels[0].label == "dog"
    assert r.labels[0].probability > 0.5
    assert 1 <= len(r.labels) <= 2  # zero-probability labels are left out
    assert r.index_generation >= 1
    assert r.mode != pb.MODE_UNSPECIFIED
    assert not r.neighbors


def test_classify_by_key_with_neighbors(client: FeatureBankClient) -> None:
    r = client.classify(key="fox/1-3", mode="knn", k=5, include_neighbors=True)
    assert r.labels[0].label == "fox"
    assert r.mode == pb.MODE_KNN and r.head_generation == 0
    assert len(r.neighbors) == 5
    assert all(n.label == "fox" and n.key.startswith("fox/") for n in r.neighbors)
    scores = [n.score for n in r.neighbors]
    assert scores == sorted(scores, reverse=True)


def test_classify_batch_keeps_order(client: FeatureBankClient) -> None:
    inputs = [make_input(vector=center("cat")), make_input(key="dog/1-0"),
              make_input(vector=center("fox"))]
    results = client.classify_batch(inputs, top_n=1)
    assert [r.labels[0].label for r in results] == ["cat", "dog", "fox"]


def test_concurrent_classifies_are_batched_and_correct(
    client: FeatureBankClient, served: RunningServer
) -> None:
    errors: list[BaseException] = []
    wrong: list[str] = []

    def worker(name: str) -> None:
        try:
            for _ in range(10):
                got = client.classify(vector=center(name), top_n=1).labels[0].label
                if got != name:
                    wrong.append(got)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(CLASSES[i % 3],)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong
    batches = served.server.metrics.batch_size.labels("classify")
    assert batches._sum.get() >= 120  # type: ignore[attr-defined]


def test_search_by_vector_with_label_filter_and_metadata(client: FeatureBankClient) -> None:
    r = client.search(vector=center("cat"), k=4, labels=["dog"], include_metadata=True)
    assert len(r.neighbors) == 4
    assert all(n.label == "dog" for n in r.neighbors)
    assert "added" in dict(r.neighbors[0].metadata)
    assert r.index_generation >= 1


def test_search_by_key_leaves_out_the_item_itself(client: FeatureBankClient) -> None:
    r = client.search(key="cat/1-7", k=3)
    keys = [n.key for n in r.neighbors]
    assert len(keys) == 3 and "cat/1-7" not in keys
    assert all(k.startswith("cat/") for k in keys)


def test_get_info(client: FeatureBankClient) -> None:
    info = client.info()
    assert info.spec.backbone == "external" and info.spec.dim == DIM
    assert info.count >= 120 and info.labelled >= 120
    assert set(CLASSES) <= set(info.labels)
    assert info.index.generation >= 1 and info.index.ntotal >= 120
    assert info.index.factory and info.index.metric == "cosine"
    assert 0 < info.index.recall <= 1 and info.index.store_generation >= 1
    assert info.store_generation >= 1
    assert info.head.generation == 0


def test_invalid_arguments(client: FeatureBankClient) -> None:
    bad = grpc.StatusCode.INVALID_ARGUMENT
    expect(bad, client.classify, vector=np.ones(DIM + 1), match=f"has {DIM + 1} values")
    nan = np.ones(DIM)
    nan[3] = np.nan
    expect(bad, client.classify, vector=nan, match="NaN or infinity at position 3")
    expect(bad, client._call, client.stub.Classify, pb.ClassifyRequest(), match="input is empty")
    expect(bad, client.classify, vector=center("cat"), k=100000, match="k=100000 is out of range")
    expect(bad, client.search, vector=center("cat"), k=5000, match="out of range")
    expect(bad, client.search, vector=center("cat"), labels=["zebra"], match="unknown labels")
    expect(bad, client.classify_batch, [], match="no inputs")
    no_model = grpc.StatusCode.FAILED_PRECONDITION  # a bank of vectors made elsewhere
    expect(no_model, client.classify, image=b"not an image", match="no model to embed images")
    expect(no_model, client.embed, b"\x89PNG", match="no model to embed images")
    expect(bad, client.upsert, [], match="no items")
    expect(bad, client.upsert, [{"key": "x/1", "vector": np.ones(3)}], match="has 3 values")
    expect(bad, client.upsert, [{"key": "x/1", "vector": np.ones(DIM), "split": "holdout"}],
           match="split 'holdout'")
    expect(bad, client.upsert, [{"key": "x/1", "vector": np.ones(DIM)},
                                {"key": "x/1", "vector": np.ones(DIM)}], match="repeats item 0")
    expect(bad, client.set_labels, {}, match="no labels")
    expect(bad, client.delete, [], match="no keys")


def test_not_found(client: FeatureBankClient) -> None:
    nf = grpc.StatusCode.NOT_FOUND
    expect(nf, client.classify, key="no/such-key", match="no/such-key")
    expect(nf, client.search, key="no/such-key", match="no/such-key")
    expect(nf, client.set_labels, {"no/such-key": "cat"}, match="no/such-key")
    expect(nf, client.delete, ["no/such-key"], match="no/such-key")
    expect(nf, client.get_operation, "0123", match="no operation '0123'")
    assert client.delete(["no/such-key"], ignore_missing=True).deleted == 0


def test_head_mode_without_head_is_failed_precondition(client: FeatureBankClient) -> None:
    expect(grpc.StatusCode.FAILED_PRECONDITION, client.classify, vector=center("cat"), mode="head")


def test_message_over_limit_is_resource_exhausted(client: FeatureBankClient) -> None:
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, client.classify, image=b"\0" * (17 << 20))


def test_deadline_is_honoured(client: FeatureBankClient, served: RunningServer) -> None:
    release = threading.Event()

    def slow_stream() -> Iterator[pb.UpsertItem]:
        yield pb.UpsertItem(key="late/0", vector=pb.Vector(values=[1.0] * DIM))
        release.wait(10)
        yield pb.UpsertItem(key="late/1", vector=pb.Vector(values=[1.0] * DIM))

    try:
        expect(grpc.StatusCode.DEADLINE_EXCEEDED, client._call, client.stub.Upsert,
               slow_stream(), 0.3)
    finally:
        release.set()
    assert client.health() == "SERVING"
    # The server notices the end asynchronously: as its own deadline passing or, when the
    # client's cancel at its deadline arrives first (the server's clock starts on receipt,
    # later on a loaded machine), as a cancel. Either way the call ended without OK.
    bank = served.server.engine.metrics.bank  # type: ignore[union-attr]
    ended = [served.server.metrics.requests.labels(bank, "Upsert", code)
             for code in ("DEADLINE_EXCEEDED", "CANCELLED")]
    for _ in range(200):
        if sum(c._value.get() for c in ended) >= 1:  # type: ignore[attr-defined]
            break
        time.sleep(0.05)
    assert sum(c._value.get() for c in ended) >= 1  # type: ignore[attr-defined]
    expect(grpc.StatusCode.NOT_FOUND, client.classify, key="late/0")  # partial stream not committed


def test_upsert_is_visible_to_the_next_classify(client: FeatureBankClient) -> None:
    rng = np.random.default_rng(7)
    owl = rng.normal(size=DIM).astype(np.float32)
    owl /= np.linalg.norm(owl)
    items = [{"key": f"owl/{i}", "vector": owl + 0.01 * rng.normal(size=DIM), "label": "owl",
              "split": "train", "uri": f"mem://owl/{i}"} for i in range(8)]
    r = client.upsert(items)
    assert (r.added, r.replaced) == (8, 0)
    assert r.store_generation >= 1 and r.index_generation >= 1
    c = client.classify(vector=owl, mode="knn", k=5, include_neighbors=True)
    assert c.labels[0].label == "owl"
    assert all(n.key.startswith("owl/") for n in c.neighbors)
    again = client.upsert(items[:2])
    assert (again.added, again.replaced) == (0, 2)
    assert client.search(key="owl/0", k=3, include_metadata=True).neighbors[0].key.startswith("owl/")


def test_set_labels_changes_answers(client: FeatureBankClient) -> None:
    rng = np.random.default_rng(11)
    v = rng.normal(size=DIM).astype(np.float32)
    client.upsert([{"key": f"relabel/{i}", "vector": v + 0.01 * rng.normal(size=DIM),
                    "label": "before"} for i in range(5)])
    assert client.classify(vector=v, mode="knn", k=5).labels[0].label == "before"
    r = client.set_labels({f"relabel/{i}": "after" for i in range(5)})
    assert r.updated == 5
    assert client.classify(vector=v, mode="knn", k=5).labels[0].label == "after"
    client.set_labels({f"relabel/{i}": None for i in range(5)})
    hits = client.search(vector=v, k=5).neighbors
    assert all(n.label == "" for n in hits if n.key.startswith("relabel/"))


def test_delete_removes_from_search(client: FeatureBankClient) -> None:
    rng = np.random.default_rng(13)
    v = rng.normal(size=DIM).astype(np.float32)
    client.upsert([{"key": f"gone/{i}", "vector": v + 0.01 * rng.normal(size=DIM),
                    "label": "gone"} for i in range(4)])
    assert client.search(vector=v, k=1).neighbors[0].key.startswith("gone/")
    r = client.delete([f"gone/{i}" for i in range(4)])
    assert r.deleted == 4
    assert not any(n.key.startswith("gone/") for n in client.search(vector=v, k=10).neighbors)
    expect(grpc.StatusCode.NOT_FOUND, client.classify, key="gone/0")


def test_rebuild_index_operation(client: FeatureBankClient) -> None:
    before = client.info().index.generation
    op = client.rebuild_index(factory="Flat")
    assert op.id and op.kind == "rebuild"
    done = client.wait_operation(op.id, poll_s=0.05, timeout=120)
    assert done.done and not done.error.code, done.error.message
    assert done.progress == 1.0 and done.index_generation > before
    assert "index" in dict(done.result)
    assert client.info().index.generation == done.index_generation
    assert client.classify(vector=center("cat")).index_generation == done.index_generation


def test_metrics_endpoint(client: FeatureBankClient, served: RunningServer) -> None:
    client.classify(vector=center("cat"))
    with pytest.raises(RemoteError):
        client.classify(key="no/such-key")
    port = served.server.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    bank = served.server.engine.metrics.bank  # type: ignore[union-attr]
    assert bank  # a single-bank server's series carry its bank's name too
    assert f'featurebank_requests_total{{bank="{bank}",code="OK",method="Classify"}}' in text
    assert f'featurebank_requests_total{{bank="{bank}",code="NOT_FOUND",method="Classify"}}' in text
    assert f'featurebank_bank_items{{bank="{bank}"}}' in text
    assert "featurebank_request_seconds_bucket" in text
    assert 'featurebank_batch_size_count{kind="classify"}' in text
    assert "featurebank_bank_items" in text and "featurebank_index_generation" in text
    assert "featurebank_requests_in_flight" in text


def test_reflection_lists_the_service(served: RunningServer) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(served.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
    names = {s.name for s in response.list_services_response.service}
    assert "featurebank.v1.FeatureBank" in names and "grpc.health.v1.Health" in names


def test_reflection_serves_the_proto_under_its_path_in_protos(served: RunningServer) -> None:
    """A client compiling protos/ with -Iprotos gets the same file name the server serves."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    name = "featurebank/v1/featurebank.proto"
    assert (ROOT / "protos" / name).is_file()
    with grpc.insecure_channel(served.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(file_containing_symbol="featurebank.v1.FeatureBank"),
                    reflection_pb2.ServerReflectionRequest(file_by_filename=name)]
        answers = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    for answer in answers:
        files = answer.file_descriptor_response.file_descriptor_proto
        described = [descriptor_pb2.FileDescriptorProto.FromString(f).name for f in files]
        assert described and described[0] == name, answer


def test_never_unknown(client: FeatureBankClient) -> None:
    calls = [
        lambda: client.classify(vector=[np.inf] * DIM),
        lambda: client.stub.Search(pb.SearchRequest(), timeout=10),
        lambda: client.stub.GetOperation(pb.GetOperationRequest(), timeout=10),
        lambda: client.stub.RebuildIndex(pb.RebuildIndexRequest(target_recall=2.0), timeout=10),
        lambda: client.stub.Classify(pb.ClassifyRequest(input=make_input(key="a"), mode=7),  # type: ignore[arg-type]
                                     timeout=10),
    ]
    for call in calls:
        with pytest.raises((RemoteError, grpc.RpcError)) as info:
            call()
        e = info.value
        code = e.code if isinstance(e, RemoteError) else e.code()  # type: ignore[union-attr]
        assert code == grpc.StatusCode.INVALID_ARGUMENT, e
