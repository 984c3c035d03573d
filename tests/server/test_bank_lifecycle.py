"""CreateBank, DropBank and SetAlias through a real server, and `featurebank banks ...`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from featurebank.cli import main
from featurebank.server.app import ServeConfig
from featurebank.server.client import FeatureBankClient, RemoteError
from tests.support.server import (
    RunningServer,
    class_centers,
    clustered,
    free_port,
    make_vector_bank,
)

ROOT = Path(__file__).resolve().parents[2]


def _upsert_clusters(c: FeatureBankClient, dim: int, seed: int) -> list[str]:
    keys, vectors, labels = clustered(6, dim, seed=seed)
    c.upsert([{"key": k, "vector": v, "label": lab, "split": "train"}
              for k, v, lab in zip(keys, vectors, labels, strict=True)])
    return keys


def test_create_an_empty_bank_fill_it_and_serve_it(tmp_path: Path) -> None:
    root = tmp_path / "banks"
    root.mkdir()
    with RunningServer(ServeConfig(banks_dir=root, port=free_port())) as rs:
        with FeatureBankClient(rs.target, timeout=60) as c:
            assert c.banks() == []
            state = c.create_bank("fresh", dim=12)
            assert (state.name, state.state) == ("fresh", "idle")
            assert [b.name for b in c.banks()] == ["fresh"]
            for name, code in (("fresh", grpc.StatusCode.FAILED_PRECONDITION),
                               ("../up", grpc.StatusCode.INVALID_ARGUMENT)):
                with pytest.raises(RemoteError) as err:
                    c.create_bank(name, dim=12)
                assert err.value.code == code and name in err.value.details
            with pytest.raises(RemoteError) as err:
                c.create_bank("nodim")
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "dim" in err.value.details
        with FeatureBankClient(rs.target, timeout=60, bank="fresh") as c:
            keys = _upsert_clusters(c, 12, seed=4)
            assert c.rebuild_index(wait=True, timeout=60).error.code == ""
            assert c.search(vector=class_centers(12)[1], k=1).neighbors[0].key in keys
            assert c.classify(vector=class_centers(12)[1]).labels[0].label == "dog"
    assert (root / "fresh" / "store").is_dir() and not list(root.glob(".creating-*"))
    with (
        RunningServer(ServeConfig(banks_dir=root, port=free_port())) as rs,  # found again on restart
        FeatureBankClient(rs.target, timeout=30, bank="fresh") as c,
    ):
        assert c.info().count == 18
        sizes = rs.server.metrics.bank_items
        assert sizes.labels("fresh")._value.get() == 18  # type: ignore[attr-defined]
        with FeatureBankClient(rs.target, timeout=30) as admin:
            admin.drop_bank("fresh")
        gauges = {s.labels.get("bank") for m in rs.server.metrics.registry.collect()
                  if m.name == "featurebank_bank_items" for s in m.samples}
        assert "fresh" not in gauges  # a dropped bank leaves no stale sizes behind


def test_lifecycle_needs_a_banks_folder(tmp_path: Path) -> None:
    bank = make_vector_bank(tmp_path / "one", dim=8, n_per_class=4)
    with (
        RunningServer(ServeConfig(bank=bank, port=free_port())) as rs,
        FeatureBankClient(rs.target, timeout=30) as c,
    ):
        for call in (lambda: c.create_bank("x", dim=8), lambda: c.set_alias("prod", "one")):
            with pytest.raises(RemoteError) as err:
                call()
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "--banks DIR" in err.value.details


def test_alias_switched_during_traffic_every_answer_from_one_bank(tmp_path: Path) -> None:
    root = tmp_path / "banks"
    make_vector_bank(root / "bank-a", dim=8, n_per_class=10)
    with (
        RunningServer(ServeConfig(banks_dir=root, port=free_port())) as rs,
        FeatureBankClient(rs.target, timeout=60) as admin,
    ):
        admin.create_bank("bank-b", dim=8)
        with FeatureBankClient(rs.target, timeout=60, bank="bank-b") as c:
            b_keys = set(_upsert_clusters(c, 8, seed=9))
            c.rebuild_index(wait=True, timeout=60)
        assert admin.set_alias("prod", "bank-a") == ""
        a_keys = set(clustered(10, 8)[0])
        assert not a_keys & b_keys
        failures: list[BaseException] = []
        answers: list[str] = []
        stop = threading.Event()

        def traffic() -> None:
            with FeatureBankClient(rs.target, timeout=30, bank="prod") as own:
                while not stop.is_set():
                    try:
                        keys = {n.key for n in own.search(vector=class_centers(8)[0], k=5).neighbors}
                        assert keys <= a_keys or keys <= b_keys, keys
                        answers.append("a" if keys <= a_keys else "b")
                    except BaseException as e:  # noqa: BLE001 - collected for the assertion
                        failures.append(e)

        threads = [threading.Thread(target=traffic) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        assert admin.set_alias("prod", "bank-b") == "bank-a"
        switched = len(answers)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(30)
        assert not failures, failures[:3]
        assert "a" in answers[:switched] and answers[-1] == "b"
        assert "a" not in answers[switched + 4:]  # at most the calls in flight at the switch
        assert {b.name: list(b.aliases) for b in admin.banks()} == {"bank-a": [], "bank-b": ["prod"]}
        with pytest.raises(RemoteError) as err:
            admin.set_alias("bank-a", "bank-b")  # an alias cannot shadow a bank
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with (
        RunningServer(ServeConfig(banks_dir=root, port=free_port())) as rs,  # aliases persist
        FeatureBankClient(rs.target, timeout=30, bank="prod") as c,
    ):
        assert c.info().name == "bank-b"


def test_drop_is_refused_while_a_replica_follows_unless_forced(tmp_path: Path) -> None:
    root = tmp_path / "banks"
    followed = make_vector_bank(root / "followed", dim=8, n_per_class=4)
    make_vector_bank(root / "lonely", dim=8, n_per_class=4)
    port = free_port()
    replica = subprocess.Popen(
        [sys.executable, "-m", "featurebank", "serve", "--replica", "--bank", str(followed),
         "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        with FeatureBankClient(f"127.0.0.1:{port}", timeout=30) as follower:
            follower.wait_until_serving(timeout=120)
            assert follower.search(vector=class_centers(8)[0], k=1).neighbors
        with (
            RunningServer(ServeConfig(banks_dir=root, port=free_port())) as rs,
            FeatureBankClient(rs.target, timeout=30) as c,
        ):
            with pytest.raises(RemoteError) as err:
                c.drop_bank("followed")
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "read replicas" in err.value.details and str(root) not in err.value.details
            assert followed.is_dir()
            c.drop_bank("lonely")  # nobody follows this one
            assert not (root / "lonely").exists()
            c.drop_bank("followed", force=True)
            assert not followed.exists() and not list(root.glob(".dropped-*"))
            assert c.banks() == []
            with pytest.raises(RemoteError) as err:
                c.drop_bank("followed")
            assert err.value.code == grpc.StatusCode.NOT_FOUND and "followed" in err.value.details
    finally:
        replica.send_signal(signal.SIGTERM)
        replica.communicate(timeout=60)


def test_banks_cli_against_a_served_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "banks"
    make_vector_bank(root / "alpha", dim=8, n_per_class=4)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "featurebank", "serve", "--banks", str(root), "--port", str(port),
         "--idle-close-s", "60"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    server = ["--server", f"127.0.0.1:{port}"]
    try:
        with FeatureBankClient(f"127.0.0.1:{port}", timeout=30) as c:
            c.wait_until_serving(timeout=120)
        capsys.readouterr()
        assert main(["banks", "create", "beta", "--dim", "8", *server]) == 0
        assert main(["banks", "alias", "prod", "beta", *server]) == 0
        assert capsys.readouterr().out.splitlines() == ["created bank beta", "alias prod -> beta"]
        assert main(["banks", "list", *server]) == 0
        assert capsys.readouterr().out.splitlines() == ["alpha\tidle", "beta\tidle\taliases prod"]
        assert main(["search", "--key", "cat/1-0", "--k", "1", "--bank", "alpha", *server]) == 0
        assert "cat/1-" in capsys.readouterr().out  # its nearest other item
        assert main(["banks", "list", *server]) == 0
        assert capsys.readouterr().out.splitlines()[0] == "alpha\topen"
        assert main(["banks", "drop", "nope", *server]) == 2
        assert "no bank 'nope'" in capsys.readouterr().err
        assert main(["banks", "alias", "prod", *server]) == 0
        assert main(["banks", "drop", "beta", *server]) == 0
        assert capsys.readouterr().out.splitlines() == ["alias prod removed (was beta)", "dropped bank beta"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"1 banks from {root}" in out and "no default bank" in out
