"""Head modes over gRPC: RebuildIndex retrains the head, every mode answers, staleness shows."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from featurebank.server.app import ServeConfig
from featurebank.server.client import FeatureBankClient, RemoteError
from featurebank.v1 import featurebank_pb2 as pb
from tests.support.server import CLASSES, RunningServer, class_centers, free_port, make_vector_bank

DIM = 8


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FeatureBankClient]:
    bank = make_vector_bank(tmp_path_factory.mktemp("head") / "bank", dim=DIM, n_per_class=30)
    with RunningServer(ServeConfig(bank=bank, port=free_port())) as rs, \
            FeatureBankClient(rs.target, timeout=300) as c:
        yield c


def test_rebuild_with_head_enables_every_mode(client: FeatureBankClient) -> None:
    with pytest.raises(RemoteError) as info:
        client.classify(vector=class_centers(DIM)[0], mode="hybrid")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "head" in info.value.details
    op = client.rebuild_index(retrain_head=True, head_epochs=20, wait=True, poll_s=0.1,
                              timeout=300)
    assert op.done and not op.error.code, op.error.message
    assert op.head_generation >= 1 and "head" in dict(op.result)
    for mode, value in (("knn", pb.MODE_KNN), ("head", pb.MODE_HEAD),
                        ("hybrid", pb.MODE_HYBRID), ("stacked", pb.MODE_STACKED)):
        for ci, name in enumerate(CLASSES):
            r = client.classify(vector=class_centers(DIM)[ci], mode=mode, top_n=1)
            assert r.labels[0].label == name, (mode, name)
            assert r.mode == value
            assert r.head_generation == (0 if mode == "knn" else op.head_generation)
    default = client.classify(vector=class_centers(DIM)[0])
    assert default.mode == pb.MODE_HYBRID and default.head_generation == op.head_generation


def test_info_shows_head_and_staleness(client: FeatureBankClient) -> None:
    info = client.info()
    assert info.head.generation >= 1 and not info.head.stale
    assert info.default_mode == pb.MODE_HYBRID
    assert len(info.head.manifest) > 0
    client.set_labels({"cat/1-0": "dog"})
    assert client.info().head.stale


def test_retrain_keeps_the_live_head_params_and_abstention_answers(
    client: FeatureBankClient,
) -> None:
    before = client.info().head.manifest
    assert before["head_params"]["epochs"] == 20  # named by the first rebuild
    op = client.rebuild_index(retrain_head=True, head_hidden=4, wait=True, poll_s=0.1,
                              timeout=300)
    assert op.done and not op.error.code, op.error.message
    info = client.info()
    params = info.head.manifest["head_params"]
    assert params["hidden"] == 4 and params["epochs"] == 20  # only what was named changed
    assert info.head.hybrid_acts_as in (pb.MODE_HYBRID, pb.MODE_KNN, pb.MODE_HEAD)
    assert set(info.head.metrics) == {"knn", "head", "hybrid"}
    plain = client.classify(vector=class_centers(DIM)[0], top_n=2)
    assert not plain.abstained
    sure = client.classify(vector=class_centers(DIM)[0], top_n=2, abstain_below=0.9)
    assert not sure.abstained and sure.labels[0].label == CLASSES[0]  # a class centre is clear
    between = (class_centers(DIM)[0] + class_centers(DIM)[1]) / 2
    doubt = client.classify_batch(
        [pb.Input(vector=pb.Vector(values=between.tolist()))], abstain_below=1.0
    )[0]
    assert doubt.abstained and doubt.labels  # "unknown", with the ranked labels kept
    with pytest.raises(RemoteError) as bad:
        client.classify(vector=class_centers(DIM)[0], abstain_below=1.5)
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "abstain_below" in bad.value.details
