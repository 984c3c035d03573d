"""The sharded index build on a real local Ray cluster equals a single-process build."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest

from featurebank.core.errors import InvalidInput
from featurebank.index import build, selection
from featurebank.index.families import HNSW, ID_BYTES, set_params
from featurebank.index.ray_build import build_index_ray, merge_topk
from featurebank.index.tuning import exact_search
from featurebank.index.views import INDEX_FILE
from tests.support.index_data import World, make_bank

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    from featurebank.embedder.ray_cluster import session

    with session(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def world_bank(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    x, _ = World.make(32, seed=4).sample(12_000, seed=5)  # clustered, overlapping
    return make_bank(tmp_path_factory.mktemp("bank") / "b", x), x


@pytest.mark.parametrize("factory", ["IVF64,Flat", "IVF64,SQ8"])
def test_sharded_build_equals_single_build(
    cluster: None, world_bank: tuple[Path, np.ndarray], factory: str
) -> None:
    bank, x = world_bank
    m = build_index_ray(bank, factory=factory, metric="l2", transform="none", train_sample=4000,
                        shards=3)  # fmt: skip
    assert m["engine"] == "ray" and m["shards"] == 3 and m["train_sample"] == 4000
    assert m["ntotal"] == len(x) and m["factory"] == factory
    sharded = faiss.read_index(str(bank / "indexes" / str(m["generation"]) / INDEX_FILE))

    ids = np.arange(len(x), dtype=np.int64)  # store ids of make_bank's items
    single, tuned = build.build_arrays(x, ids, factory, "l2", 10, 0.95, train_sample=4000)
    assert tuned.params == m["params"]  # same ground truth, same tuning decision
    assert faiss.serialize_index(sharded).tobytes() == faiss.serialize_index(single).tobytes()
    queries = World.make(32, seed=4).sample(200, seed=9)[0]
    for index in (sharded, single):
        set_params(index, {"nprobe": 8})
    d1, i1 = sharded.search(queries, 10)
    d2, i2 = single.search(queries, 10)
    assert np.array_equal(i1, i2) and np.array_equal(d1, d2)
    assert m["recall_at_k"] >= 0.95


def test_sharded_build_on_disk_holds_the_same_lists(
    cluster: None, world_bank: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    import shutil

    from featurebank.index.stored_ids import ONDISK_FILE, on_disk, read

    bank, x = tmp_path / "b", world_bank[1]
    shutil.copytree(world_bank[0], bank)  # the others' bank keeps its in-memory params
    in_memory = build_index_ray(bank, factory="IVF64,Flat", metric="l2", transform="none",
                                train_sample=4000, shards=2)  # fmt: skip
    m = build_index_ray(bank, ondisk=True, train_sample=4000, shards=2)  # the rest: as live
    directory = bank / "indexes" / str(m["generation"])
    assert m["ondisk"] and m["factory"] == "IVF64,Flat" and (directory / ONDISK_FILE).exists()
    disk = read(directory / INDEX_FILE)
    memory = faiss.read_index(str(bank / "indexes" / str(in_memory["generation"]) / INDEX_FILE))
    assert on_disk(disk) and not on_disk(memory) and disk.ntotal == len(x)
    for index in (disk, memory):
        set_params(index, {"nprobe": 8})
    d1, i1 = disk.search(x[:100], 10)
    d2, i2 = memory.search(x[:100], 10)
    assert np.array_equal(i1, i2) and np.array_equal(d1, d2)


def test_cli_builds_on_ray(
    cluster: None, world_bank: tuple[Path, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    from featurebank.cli import main as cli_main

    bank, x = world_bank
    rc = cli_main(["index", "build", "--bank", str(bank), "--engine", "ray", "--metric", "l2",
                   "--factory", "IVF32,Flat", "--shards", "2"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "IVF32,Flat {'nprobe'" in out and f"over {len(x)} vectors" in out
    assert "on Ray (2 shards, trained on" in out


def test_graph_factories_are_refused_and_auto_picks_a_mergeable_one(
    cluster: None, world_bank: tuple[Path, np.ndarray]
) -> None:
    bank, _ = world_bank
    with pytest.raises(InvalidInput, match="cannot be built in shards"):
        build_index_ray(bank, factory="HNSW32", metric="l2")
    choice = selection.choose_factory(200_000, 256, 4 << 30, sharded=True)
    assert choice.factory.startswith("IVF") and "shards" in choice.reason


def test_ground_truth_merged_over_shards_is_exact() -> None:
    x, _ = World.make(16, seed=1).sample(3000, seed=2)
    q, _ = World.make(16, seed=1).sample(50, seed=3)
    ids = np.arange(3000, dtype=np.int64) * 5
    for metric, larger in ((faiss.METRIC_L2, False), (faiss.METRIC_INNER_PRODUCT, True)):
        whole, _ = exact_search(x, ids, q, 10, metric)
        parts = [exact_search(x[p], ids[p], q, 10, metric)
                 for p in np.array_split(np.arange(3000), 4)]  # fmt: skip
        assert np.array_equal(merge_topk(parts, 10, larger), whole)


def test_selection_reaches_billion_scale_with_ids_in_the_lists() -> None:
    assert selection.nlist_for(50_000_000) == 1 << 18
    assert selection.nlist_for(10**9) == 1 << 20
    assert selection.train_size_for(1 << 20, 10**9) == 64 << 20
    big = selection.choose_factory(10**9, 768, 200 << 30, sharded=True)
    assert big.factory == "IVF1048576_HNSW32,PQ256x4fs,RStore"
    # each vector costs its code and its 8-byte store id in the lists, no id map
    per_vector = (big.memory_bytes - HNSW.memory(1 << 20, 768)) / 10**9
    assert per_vector == 128 + ID_BYTES


def test_store_index_server_and_cli_import_without_ray() -> None:
    import subprocess
    import sys

    code = (
        "import sys, featurebank.store, featurebank.index.build, featurebank.index.searcher, "
        "featurebank.index.ray_build, featurebank.embedder.ray_job, featurebank.embedder.commit, "
        "featurebank.server.app, featurebank.cli; "
        "featurebank.cli.build_parser(); assert 'ray' not in sys.modules, 'ray imported'"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
