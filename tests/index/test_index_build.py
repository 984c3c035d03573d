"""Building, tuning, updating and publishing index generations (real store, real FAISS)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.classify.abstain import calibrate_threshold
from featurebank.cli import main
from featurebank.core.errors import FailedPrecondition, InvalidInput
from featurebank.core.params import parse_memory
from featurebank.index import selection
from featurebank.index.build import build_index
from featurebank.index.fold import update_index
from featurebank.index.searcher import Searcher
from featurebank.index.tuning import recall_at_k
from tests.support.index_data import World, exact_ids, make_bank

ROOT = Path(__file__).resolve().parents[2]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return recall_at_k(found, truth)


@pytest.fixture(scope="module")
def clustered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, World, np.ndarray]:
    """30,000 vectors of intrinsic dimension 8 in 32-d, overlapping clusters."""
    world = World.make(32, latent=8, centres=100, noise=0.05, seed=11)
    x, _ = world.sample(30_000, seed=12)
    labels = ["rare" if i % 10 == 0 else "common" for i in range(len(x))]
    bank = make_bank(tmp_path_factory.mktemp("clustered") / "bank", x, labels)
    return bank, world, x


@pytest.mark.parametrize(
    ("budget", "family"), [("4G", "HNSW"), ("8M", "IVF"), ("1M", "x4fs,RStore")],
    ids=["hnsw", "ivf", "pq-reranked"],
)
def test_auto_choice_reaches_target_recall(
    clustered: tuple[Path, World, np.ndarray], budget: str, family: str
) -> None:
    bank, world, x = clustered
    manifest = build_index(bank, factory="auto", metric="l2", transform="none", memory_budget=budget,
                           target_recall=0.95, k=10)
    assert family in manifest["factory"]
    assert manifest["target_reached"] and manifest["recall_at_k"] >= 0.95
    assert manifest["params"] and manifest["tuning"]
    on_disk = json.loads((bank / "indexes" / str(manifest["generation"]) / "manifest.json")
                         .read_text())
    assert on_disk["factory"] == manifest["factory"] and on_disk["store_generation"] == 1
    fresh, _ = world.sample(500, seed=99)  # queries the tuner never saw
    with Searcher.load(bank) as searcher:
        assert recall(searcher.search(fresh, 10).ids, exact_ids(x, fresh, 10)) >= 0.93
        common = np.flatnonzero(np.arange(len(x)) % 10 != 0)  # a filter letting 90% through
        result = searcher.search(fresh[:100], 10, labels=["common"])
        assert {lab for row in result.labels for lab in row} == {"common"}
        assert recall(result.ids, common[exact_ids(x[common], fresh[:100], 10)]) >= 0.9


def test_update_equals_full_rebuild_for_exact_index(tmp_path: Path) -> None:
    world = World.make(16, latent=6, seed=21)
    x, _ = world.sample(1200, seed=22)
    bank = make_bank(tmp_path / "bank", x, ["a"] * 1200)
    build_index(bank, factory="Flat", metric="l2", transform="none")
    extra, _ = world.sample(300, seed=23)
    with store_mod.open(bank) as st:
        st.put_batch([f"new-{i}" for i in range(300)], extra, ["b"] * 300)
        st.delete([f"item-{i}" for i in range(0, 1200, 7)])
        st.set_labels({"item-1": "c"})
    updated = update_index(bank)
    assert updated["added"] == 300 and updated["removed"] == len(range(0, 1200, 7))
    queries, _ = world.sample(200, seed=24)
    with Searcher.load(bank) as searcher:
        assert searcher.generation == updated["generation"] == 2
        after_update = searcher.search(queries, 10)
    rebuilt = build_index(bank, factory="Flat", metric="l2", transform="none")
    assert rebuilt["ntotal"] == updated["ntotal"] == 1200 - len(range(0, 1200, 7)) + 300
    with Searcher.load(bank) as searcher:
        after_rebuild = searcher.search(queries, 10)
    np.testing.assert_array_equal(after_update.ids, after_rebuild.ids)
    np.testing.assert_allclose(after_update.scores, after_rebuild.scores, rtol=1e-5, atol=1e-5)
    assert after_update.labels == after_rebuild.labels
    assert update_index(bank)["unchanged"]  # nothing new: no new generation


def test_update_of_graph_index_adds_and_filters_deleted(tmp_path: Path) -> None:
    world = World.make(16, latent=6, seed=31)
    x, _ = world.sample(3000, seed=32)
    bank = make_bank(tmp_path / "bank", x)
    build_index(bank, factory="HNSW16", metric="l2")
    extra, _ = world.sample(50, seed=33)
    with store_mod.open(bank) as st:
        new_ids = st.put_batch([f"new-{i}" for i in range(50)], extra)
        st.delete(["item-0", "item-1"])
    updated = update_index(bank)
    assert updated["added"] == 50 and updated["last_update"]["filtered"] == 2
    with Searcher.load(bank) as searcher:
        assert (searcher.search(extra, 1).ids[:, 0] == new_ids.astype(np.int64)).all()
        assert not np.isin(searcher.search(x[:2], 10).ids, [0, 1]).any()
        assert searcher.ntotal == 3048


def test_update_of_inverted_lists_removes_deleted(tmp_path: Path) -> None:
    world = World.make(16, latent=6, seed=35)
    x, _ = world.sample(4000, seed=36)
    bank = make_bank(tmp_path / "bank", x)
    built = build_index(bank, factory="IVF32,Flat", metric="l2")
    assert built["params"]["nprobe"] >= 1
    with store_mod.open(bank) as st:
        st.delete([f"item-{i}" for i in range(100)])
    updated = update_index(bank)
    # the lists hold store ids, so deleted items leave them in place
    assert updated["last_update"]["removed"] == 100 and updated["last_update"]["filtered"] == 0
    assert updated["ntotal"] == 3900 and updated["unremoved_deleted"] == 0
    assert updated["params"] == built["params"]  # tuned settings carry over
    with Searcher.load(bank) as searcher:
        assert searcher.search(x[:100], 5).ids.min() >= 100
    with pytest.raises(FailedPrecondition, match="no index yet"):
        update_index(make_bank(tmp_path / "other", x[:10]))


BUILD_SCRIPT = """
import sys
from featurebank.index.build import build_index
print("building", flush=True)
build_index(sys.argv[1], factory="HNSW32", metric="l2", k=10)
print("built", flush=True)
"""


@pytest.mark.parametrize("when", ["computing", "writing"])
def test_build_killed_leaves_previous_generation_live(tmp_path: Path, when: str) -> None:
    x, _ = World.make(64, latent=12, seed=41).sample(12_000, seed=42)
    bank = make_bank(tmp_path / "bank", x, ["a"] * len(x))
    build_index(bank, factory="Flat", metric="l2")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(bank)], env=env,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "building"
    if when == "computing":  # reading, fitting and graph building take well over 0.1 s
        time.sleep(0.1)
    else:  # as soon as the staging folder of the new generation appears
        deadline = time.time() + 120
        while not list((bank / "indexes").glob(".staging-*")) and time.time() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    live = int((bank / "indexes" / "CURRENT").read_text())
    if when == "computing":
        assert proc.returncode == -signal.SIGKILL
    assert live == 1 or (when == "writing" and proc.returncode == 0)
    with Searcher.load(bank) as searcher:
        assert searcher.generation == live
        assert searcher.search(x[:5], 3).ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    again = build_index(bank, factory="Flat", metric="l2")  # leftovers do not get in the way
    assert again["generation"] > live
    with Searcher.load(bank) as searcher:
        assert searcher.generation == again["generation"]


def test_concurrent_searches_during_updates_see_whole_generations(tmp_path: Path) -> None:
    world = World.make(16, latent=6, seed=51)
    x, _ = world.sample(2000, seed=52)
    bank = make_bank(tmp_path / "bank", x, ["a"] * 2000)
    build_index(bank, factory="Flat", metric="l2")
    queries = x[:20] + 0.01
    searcher = Searcher.load(bank)
    valid = {searcher.search(queries, 5).ids.tobytes()}
    seen: list[bytes] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker() -> None:
        try:
            while not stop.is_set():
                result = searcher.search(queries, 5)
                assert all(len(row) == 5 for row in result.labels)
                seen.append(result.ids.tobytes())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        with store_mod.open(bank) as st:
            for round_ in range(5):  # each round adds items right next to some queries
                near = queries[round_ * 4 : round_ * 4 + 4] + 0.001
                st.put_batch([f"r{round_}-{i}" for i in range(4)], near, ["b"] * 4)
                update_index(bank)
                searcher.refresh()
                valid.add(searcher.search(queries, 5).ids.tobytes())
                time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
        searcher.close()
    assert not errors, errors
    assert seen and set(seen) <= valid  # every answer is one whole generation's answer
    assert len(valid) == 6


def test_cli_build_update_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, cluster = World.make(16, latent=6, seed=61).sample(800, seed=62)
    labels = [f"c{c % 4}" for c in cluster]
    splits = ["val" if i % 4 == 0 else "train" for i in range(800)]
    bank = make_bank(tmp_path / "bank", x, labels, splits)
    assert main(["index", "build", "--bank", str(bank), "--transform", "cl2n"]) == 0
    assert "index generation 1: Flat" in capsys.readouterr().out
    assert main(["index", "update", "--bank", str(bank)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["index", "eval", "--bank", str(bank), "--queries", "100"]) == 0
    out = capsys.readouterr().out
    assert "recall@10 vs exact: 1.0000" in out and "kNN accuracy on 200 val items" in out
    assert main(["index", "build", "--bank", str(bank), "--factory", "Nope"]) == 2
    assert "unknown or invalid faiss factory string 'Nope'" in capsys.readouterr().err


def test_selection_rules() -> None:
    low_rank = np.r_[np.ones(30), np.full(226, 1e-4)]  # 32 latent dimensions + noise
    assert selection.pca_dim_for(low_rank, 256) == 32
    assert selection.pca_dim_for(np.ones(256), 256) is None  # isotropic: no projection
    assert selection.choose_factory(200_000, 256, 4 << 30, pca_dim=32).factory == (
        "PCA32,HNSW32,RFlat"
    )
    assert selection.choose_factory(200_000, 256, 4 << 30, pca_dim=32, metric="ip").factory == (
        "HNSW32"
    )
    assert selection.choose_factory(5_000, 128, 4 << 30).factory == "Flat"
    hnsw = selection.choose_factory(200_000, 256, 4 << 30)
    assert hnsw.factory == "HNSW32" and "efSearch" in hnsw.tunable
    ivf = selection.choose_factory(200_000, 256, 230 << 20)
    assert ivf.factory == "IVF2048,Flat" and "nprobe" in ivf.tunable
    big = selection.choose_factory(50_000_000, 768, 4 << 30)  # 4-bit codes, exact re-ranking
    assert big.factory == "IVF262144_HNSW32,PQ96x4fs,RStore" and "k_factor_store" in big.tunable
    assert big.memory_bytes <= 4 << 30
    odd = selection.choose_factory(50_000_000, 100, 4 << 30)  # no even split: OPQ, 8-bit codes
    assert odd.factory == "OPQ48_96,IVF262144_HNSW32,PQ48,RStore"
    with pytest.raises(InvalidInput, match="too small"):
        selection.choose_factory(10**9, 768, 1 << 30)
    with pytest.raises(InvalidInput, match="empty bank"):
        selection.choose_factory(0, 8, 1 << 30)
    assert parse_memory("4G") == 4 << 30 and parse_memory("512MiB") == 512 << 20
    assert selection.nlist_for(1000) == 16  # limited by points per list


def test_calibrate_threshold_picks_lowest_threshold_meeting_precision() -> None:
    conf = np.array([0.95, 0.9, 0.8, 0.8, 0.6, 0.5])
    correct = np.array([True, True, True, False, True, False])
    assert calibrate_threshold(conf, correct, 0.75) == 0.6  # keeps 4 of 5 right
    assert calibrate_threshold(conf, correct, 1.0) == 0.9
    assert calibrate_threshold(conf, np.zeros(6, bool), 0.5) > 1.0  # never right: abstain


def test_rebuild_keeps_the_live_params_and_changes_only_what_is_named(tmp_path: Path) -> None:
    world = World.make(32, latent=8, seed=31)
    x, _ = world.sample(600, seed=32)
    bank = make_bank(tmp_path / "bank", x, ["a"] * 600)
    first = build_index(bank)  # a bank without an index starts from the defaults
    assert first["index_params"] == {"factory": "auto", "metric": "cosine", "transform": "auto",
                                     "memory_budget": 4 << 30, "target_recall": 0.95, "k": 10,
                                     "allow_below_target": False, "ondisk": False}
    assert first["transform"]["spec"] == "cl2n"  # auto: the default for metric cosine
    build_index(bank, factory="Flat", transform="pca:8", memory_budget="1G", k=5)
    again = build_index(bank, target_recall=0.9)  # only the recall target changes
    assert again["index_params"] == {"factory": "Flat", "metric": "cosine", "transform": "pca:8",
                                     "memory_budget": 1 << 30, "target_recall": 0.9, "k": 5,
                                     "allow_below_target": False, "ondisk": False}
    assert again["transform"]["spec"] == "pca:8" and again["index_dim"] == 8
    with store_mod.open(bank) as st:  # an update's fallback rebuild starts from them too
        st.put_batch(["x"], x[:1], ["b"])
    assert update_index(bank)["index_params"]["transform"] == "pca:8"
    with pytest.raises(InvalidInput, match="unknown metric 'dot'"):
        build_index(bank, metric="dot")
    assert main(["index", "build", "--bank", str(bank), "--k", "3"]) == 0
    with Searcher.load(bank) as searcher:
        assert searcher.manifest["index_params"]["transform"] == "pca:8"
        assert searcher.manifest["index_params"]["k"] == 3
