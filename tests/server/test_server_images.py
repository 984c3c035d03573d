"""Image inputs end to end: a tiny custom .keras backbone, the Embedder, batching, upserts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from featurebank.cli import main
from featurebank.server.app import ServeConfig
from featurebank.server.client import FeatureBankClient, RemoteError, make_input
from tests.support.server import RunningServer, color_images, free_port, make_image_bank


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    bank, _ = make_image_bank(tmp_path_factory.mktemp("images") / "bank")
    config = ServeConfig(bank=bank, port=free_port(), max_batch_size=32, batch_timeout_ms=5)
    with RunningServer(config) as rs:
        yield rs


@pytest.fixture(scope="module")
def client(served: RunningServer) -> Iterator[FeatureBankClient]:
    with FeatureBankClient(served.target, timeout=120) as c:
        yield c


def test_embed_matches_the_batch_embedder(client: FeatureBankClient, served: RunningServer) -> None:
    _, image = color_images(1, seed=5)[0]
    vector = client.embed(image)
    assert vector.shape == (16,)
    expected = served.server.engine.embedder.embed_images([image])[0]
    np.testing.assert_array_equal(vector, expected)


def test_classify_by_image(client: FeatureBankClient) -> None:
    for color, image in color_images(1, seed=9):
        r = client.classify(image, mode="knn", k=3, include_neighbors=True)
        assert r.labels[0].label == color
        assert all(n.key.startswith(color) for n in r.neighbors)


def test_images_of_one_call_are_embedded_as_one_batch(
    client: FeatureBankClient, served: RunningServer
) -> None:
    pictures = color_images(4, seed=11)
    results = client.classify_batch([make_input(image=b) for _, b in pictures], top_n=1)
    assert [r.labels[0].label for r in results] == [c for c, _ in pictures]
    buckets = {
        sample.labels["le"]: sample.value
        for metric in served.server.metrics.registry.collect()
        for sample in metric.samples
        if sample.name == "featurebank_batch_size_bucket" and sample.labels["kind"] == "embed"
    }
    assert buckets["8.0"] < buckets["+Inf"]  # the 12 images did not go one by one


def test_undecodable_image_is_invalid_argument(client: FeatureBankClient) -> None:
    with pytest.raises(RemoteError) as info:
        client.classify(b"definitely not an image")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details.startswith("input.image:")
    good = color_images(1, seed=3)[0][1]
    with pytest.raises(RemoteError) as info:
        client.classify_batch([make_input(image=good), make_input(image=b"\x89PNG broken")])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details.startswith("inputs[1].image:")
    assert client.classify(good).labels  # the good image still works alone


def test_upsert_images_then_classify(client: FeatureBankClient) -> None:
    import io

    from PIL import Image

    rng = np.random.default_rng(4)
    items: list[dict[str, object]] = []
    pngs: list[bytes] = []
    for i in range(4):
        px = np.clip(np.array([240, 220, 20]) + rng.normal(0, 10, (40, 40, 3)), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(px.astype(np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
        items.append({"key": f"yellow/{i}", "image": pngs[-1], "label": "yellow",
                      "uri": f"file:///yellow/{i}.png"})
    r = client.upsert(items)
    assert r.added == 4
    c = client.classify(pngs[0], mode="knn", k=3)
    assert c.labels[0].label == "yellow"
    hit = client.search(key="yellow/0", k=1, include_metadata=True).neighbors[0]
    meta = dict(hit.metadata)
    assert str(meta["uri"]).startswith("file:///yellow/") and len(str(meta["sha256"])) == 64
    with pytest.raises(RemoteError) as info:
        client.upsert([{"key": "bad/1", "image": b"GIF89a-nope"}])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "bad/1" in info.value.details
    assert client.search(key="yellow/1", k=1).neighbors  # nothing half-written


def test_cli_upsert_and_classify(
    served: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for color, image in color_images(2, seed=21):
        folder = tmp_path / "new" / color
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{len(list(folder.iterdir()))}.png").write_bytes(image)
    assert main(["upsert", str(tmp_path / "new"), "--folder-labels", "--server",
                 served.target]) == 0
    assert "upserted 6 images: 6 added" in capsys.readouterr().out
    probe = tmp_path / "probe.png"
    probe.write_bytes(color_images(1, seed=33)[1][1])
    assert main(["classify", str(probe), "--mode", "knn", "--server", served.target]) == 0
    out = capsys.readouterr().out
    assert out.startswith(str(probe)) and out.split("\t")[1].startswith("green ")
