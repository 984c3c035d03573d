"""Many banks in one server: routing by name, the default bank, lazy open and idle close,
a damaged bank beside healthy ones, one model for banks of one backbone."""

from __future__ import annotations

import shutil
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from featurebank.server.app import ServeConfig
from featurebank.server.client import FeatureBankClient, RemoteError
from tests.support.server import (
    RunningServer,
    class_centers,
    color_images,
    free_port,
    make_image_bank,
    make_vector_bank,
)


def until(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def states(c: FeatureBankClient) -> dict[str, str]:
    return {b.name: b.state for b in c.info().banks}


@pytest.fixture()
def two_dims(tmp_path: Path) -> Path:
    """Banks `small` (dim 8) and `wide` (dim 24) under one folder, keys made distinct."""
    root = tmp_path / "banks"
    make_vector_bank(root / "small", dim=8, n_per_class=10)
    make_vector_bank(root / "wide", dim=24, n_per_class=12)
    return root


def test_every_bank_under_dir_answers_by_name_and_never_mixes(two_dims: Path) -> None:
    config = ServeConfig(banks_dir=two_dims, port=free_port())
    with RunningServer(config) as rs:
        with FeatureBankClient(rs.target, timeout=30) as c:
            listed = {b.name: b for b in c.info().banks}
            assert set(listed) == {"small", "wide"}
            assert {b.state for b in listed.values()} == {"idle"}  # listing opened nothing
            assert not any(b.is_default for b in listed.values())
            assert rs.server.engine is None and not any(rs.server.banks.open_engines())
        sizes = {"small": (8, 30), "wide": (24, 36)}
        for name, (dim, count) in sizes.items():
            with FeatureBankClient(rs.target, timeout=30, bank=name) as c:
                info = c.info()
                assert (info.name, info.spec.dim, info.count) == (name, dim, count)
                center = class_centers(dim)[1]
                found = c.search(vector=center, k=count)
                assert len(found.neighbors) == count  # every item of this bank, none of the other
                assert c.classify(vector=center).labels[0].label == "dog"
                with pytest.raises(RemoteError) as err:  # the other bank's dimension is refused
                    c.search(vector=class_centers(32 - dim)[1])
                assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with FeatureBankClient(rs.target, timeout=30) as c:
            assert states(c) == {"small": "open", "wide": "open"}


def test_unknown_bank_is_not_found_naming_it_and_no_default_is_named(two_dims: Path) -> None:
    with RunningServer(ServeConfig(banks_dir=two_dims, port=free_port())) as rs:
        with FeatureBankClient(rs.target, timeout=10, bank="nope") as c:
            for call in (c.info, lambda: c.search(vector=[0.0] * 8), lambda: c.set_labels({"a": "b"})):
                with pytest.raises(RemoteError) as err:
                    call()
                assert err.value.code == grpc.StatusCode.NOT_FOUND
                assert "'nope'" in err.value.details and "small" in err.value.details
        with FeatureBankClient(rs.target, timeout=10) as c:
            with pytest.raises(RemoteError) as err:
                c.search(vector=[0.0] * 8)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "bank field" in err.value.details
            with pytest.raises(RemoteError) as err:
                c.upsert([{"key": "x", "vector": [0.0] * 8}])
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_default_bank_answers_requests_naming_none(two_dims: Path, tmp_path: Path) -> None:
    main = make_vector_bank(tmp_path / "main", dim=16, n_per_class=5)
    config = ServeConfig(bank=main, named_banks={"other": two_dims / "small"}, port=free_port())
    with RunningServer(config) as rs:
        with FeatureBankClient(rs.target, timeout=30) as c:  # a client that knows no banks
            c.wait_until_serving(10)
            info = c.info()
            assert (info.name, info.spec.dim, info.count) == ("main", 16, 15)
            assert {b.name: b.is_default for b in info.banks} == {"main": True, "other": False}
            assert c.classify(vector=class_centers(16)[2]).labels[0].label == "fox"
            up = c.upsert([{"key": "new", "vector": class_centers(16)[0], "label": "cat"}])
            assert up.added == 1
        with FeatureBankClient(rs.target, timeout=30, bank="main") as c:
            assert c.info().count == 16
        with FeatureBankClient(rs.target, timeout=30, bank="other") as c:
            assert c.info().count == 30


def test_upsert_stream_writes_to_the_bank_its_first_item_names(two_dims: Path) -> None:
    with RunningServer(ServeConfig(banks_dir=two_dims, port=free_port())) as rs:
        with FeatureBankClient(rs.target, timeout=30, bank="small") as c:
            done = c.upsert([{"key": f"n{i}", "vector": class_centers(8)[0]} for i in range(3)])
            assert done.added == 3 and c.info().count == 33
        from featurebank.v1 import featurebank_pb2 as pb

        items = [pb.UpsertItem(key="a", vector=pb.Vector(values=[0.0] * 8), bank="small"),
                 pb.UpsertItem(key="b", vector=pb.Vector(values=[0.0] * 8), bank="wide")]
        with FeatureBankClient(rs.target, timeout=30) as c:
            with pytest.raises(RemoteError) as err:
                c.upsert(items)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "items[1].bank" in err.value.details
        with FeatureBankClient(rs.target, timeout=30, bank="small") as c:
            assert c.info().count == 33  # nothing of the refused stream was stored


def test_idle_banks_close_and_reopen_under_load(two_dims: Path) -> None:
    config = ServeConfig(banks_dir=two_dims, port=free_port(), idle_close_s=0.3)
    with (
        RunningServer(config) as rs,
        FeatureBankClient(rs.target, timeout=30, bank="small") as c,
        FeatureBankClient(rs.target, timeout=30) as lister,  # GetInfo naming no bank opens none
    ):
        assert c.search(vector=class_centers(8)[0], k=1).neighbors
        assert states(lister)["small"] == "open"
        until(lambda: states(lister)["small"] == "idle", 10)  # closed once idle ...
        assert not any(rs.server.banks.open_engines())  # ... holding no store or index
        failures: list[BaseException] = []
        stop = threading.Event()

        def load(name: str, dim: int) -> None:
            with FeatureBankClient(rs.target, timeout=30, bank=name) as own:
                while not stop.is_set():
                    try:
                        hits = own.search(vector=class_centers(dim)[0], k=3).neighbors
                        assert len(hits) == 3
                    except BaseException as e:  # noqa: BLE001 - collected for the assertion
                        failures.append(e)
                    time.sleep(0.35 if name == "wide" else 0.0)  # wide keeps going idle

        threads = [threading.Thread(target=load, args=a) for a in (("small", 8), ("wide", 24))]
        for t in threads:
            t.start()
        wide = rs.server.banks.entries["wide"]
        try:
            until(lambda: wide.opens >= 2 or bool(failures), 60)  # closed between calls, reopened
        finally:
            stop.set()
        for t in threads:
            t.join(30)
        assert not failures, failures[:3]
        until(lambda: set(states(lister).values()) == {"idle"}, 10)


def test_a_damaged_bank_fails_alone_and_says_why_without_paths(two_dims: Path) -> None:
    broken = two_dims / "broken"
    (broken / "store").mkdir(parents=True)
    (broken / "store" / "data.mdb").write_bytes(b"not an lmdb file" * 64)
    with RunningServer(ServeConfig(banks_dir=two_dims, port=free_port())) as rs:
        with FeatureBankClient(rs.target, timeout=30, bank="broken") as c:
            with pytest.raises(RemoteError) as err:
                c.search(vector=[0.0] * 8)
            assert err.value.code != grpc.StatusCode.UNKNOWN
            assert str(two_dims) not in err.value.details
        with FeatureBankClient(rs.target, timeout=30, bank="small") as c:
            assert c.search(vector=class_centers(8)[0], k=1).neighbors  # the others still answer
            listed = {b.name: b for b in c.info().banks}
            assert listed["broken"].state == "failed" and listed["broken"].error
            assert str(two_dims) not in listed["broken"].error
            assert listed["small"].state == "open" and not listed["small"].error


def test_banks_of_one_backbone_share_one_model(tmp_path: Path) -> None:
    root = tmp_path / "banks"
    make_image_bank(root / "photos")
    shutil.copytree(root / "photos", root / "photos-copy")  # same spec, same weights
    make_vector_bank(root / "vectors", dim=8, n_per_class=4)
    _, image = color_images(1, seed=3)[0]
    with RunningServer(ServeConfig(banks_dir=root, port=free_port())) as rs:
        vectors = []
        for name in ("photos", "photos-copy"):
            with FeatureBankClient(rs.target, timeout=120, bank=name) as c:
                vectors.append(c.embed(image))
                hits = c.search(image, k=3).neighbors
                assert all(h.key.split("/")[0] in {"red", "green", "blue"} for h in hits)
        np.testing.assert_array_equal(vectors[0], vectors[1])
        engines = list(rs.server.banks.open_engines())
        assert len(engines) == 2 and len(rs.server.models) == 1
        assert engines[0].embedder is engines[1].embedder
        with FeatureBankClient(rs.target, timeout=30, bank="vectors") as c:
            with pytest.raises(RemoteError) as err:  # no model: images are refused, not mixed
                c.search(image)
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert c.search(vector=class_centers(8)[0], k=12).neighbors[0].key.startswith("cat/")


def test_banks_of_two_backbones_and_dimensions_asked_at_once_never_mix(tmp_path: Path) -> None:
    """Each bank gets its own images and its own vectors from threads running side by side;
    every answer holds only that bank's keys, and each bank embeds with its own model."""
    root = tmp_path / "banks"
    dims = {"narrow": 16, "broad": 24}
    for name, dim in dims.items():
        make_image_bank(root / name, n_per_color=4, features=dim, prefix=f"{name}:")
    pictures = color_images(3, seed=5)
    failures: list[str] = []
    with RunningServer(ServeConfig(banks_dir=root, port=free_port())) as rs:

        def ask(name: str) -> None:
            with FeatureBankClient(rs.target, timeout=120, bank=name) as c:
                vectors = [c.embed(image) for _, image in pictures]
                if {v.shape for v in vectors} != {(dims[name],)}:
                    failures.append(f"{name} embedded with another model")
                for _ in range(3):
                    answers = [c.search(image, k=6).neighbors for _, image in pictures]
                    answers += [c.search(vector=v, k=6).neighbors for v in vectors]
                    answers += [c.classify(image, include_neighbors=True).neighbors for _, image in pictures]
                    keys = [h.key for hits in answers for h in hits]
                    if not keys or any(not k.startswith(f"{name}:") for k in keys):
                        failures.append(f"{name} answered keys {sorted(set(keys))[:4]}")

        threads = [threading.Thread(target=ask, args=(n,)) for n in dims for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert len(rs.server.models) == 2
    assert not failures, failures


def test_a_replica_follows_several_banks(two_dims: Path) -> None:
    primary = RunningServer(ServeConfig(banks_dir=two_dims, port=free_port()))
    try:
        replica_config = ServeConfig(banks_dir=two_dims, port=free_port(), replica=True,
                                     follow_interval_s=0.05, idle_close_s=0.5)
        with RunningServer(replica_config) as replica:
            for name, dim in (("small", 8), ("wide", 24)):
                with FeatureBankClient(primary.target, timeout=30, bank=name) as c:
                    c.upsert([{"key": f"{name}-new", "vector": class_centers(dim)[2] * 2, "label": "fox"}])
                with FeatureBankClient(replica.target, timeout=30, bank=name) as r:
                    until(lambda r=r, name=name, dim=dim: r.search(
                        vector=class_centers(dim)[2] * 2, k=1).neighbors[0].key == f"{name}-new", 10)
                    with pytest.raises(RemoteError) as err:
                        r.set_labels({f"{name}-new": "cat"})
                    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
            with FeatureBankClient(replica.target, timeout=30) as lister:
                until(lambda: set(states(lister).values()) == {"idle"}, 10)  # followers stop when idle
            with FeatureBankClient(primary.target, timeout=30, bank="small") as c:
                c.upsert([{"key": "later", "vector": class_centers(8)[1] * 3}])
            with FeatureBankClient(replica.target, timeout=30, bank="small") as r:  # reopened, caught up
                assert r.search(vector=class_centers(8)[1] * 3, k=1).neighbors[0].key == "later"
    finally:
        primary.stop()


def test_metrics_carry_the_bank_each_call_went_to(two_dims: Path) -> None:
    config = ServeConfig(banks_dir=two_dims, port=free_port(), metrics_port=free_port())
    with RunningServer(config) as rs:
        calls = {"small": 3, "wide": 1}
        for name, n in calls.items():
            with FeatureBankClient(rs.target, timeout=30, bank=name) as c:
                dim = c.info().spec.dim
                for _ in range(n):
                    c.search(vector=class_centers(dim)[1], k=3)
        with FeatureBankClient(rs.target, timeout=30, bank="nowhere") as c, pytest.raises(RemoteError):
            c.search(vector=class_centers(8)[1])
        url = f"http://127.0.0.1:{rs.server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for name, n in calls.items():
            assert f'featurebank_requests_total{{bank="{name}",code="OK",method="Search"}} {n}.0' in text
            assert f'featurebank_bank_items{{bank="{name}"}}' in text
        assert 'featurebank_requests_total{bank="",code="NOT_FOUND",method="Search"} 1.0' in text
        assert 'bank="nowhere"' not in text  # a client's made-up name never becomes a series
        # every searched job is in one bank's group of a shared batch, and each is observed
        assert 'featurebank_batch_size_sum{kind="search_bank"} 4.0' in text
        assert 'featurebank_batch_size_sum{kind="search"} 4.0' in text
