"""The embedding job on a real local Ray cluster: same vectors as the local job, failures
survived, reruns and commits that never duplicate, and an actor pool that scales."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.core.errors import InvalidInput, NotFound
from featurebank.embedder import shards, sources
from featurebank.embedder.commit import commit_shards
from tests.support.ray_models import SleepingModel, stand_in_spec, write_images

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
DIGITS_MODEL = ROOT / "embedder" / "models" / "digits_cnn.keras"


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A local 2-CPU Ray cluster for the module; its workers import the stand-in models."""
    tests = str(ROOT)  # for tests.support.ray_models
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests, old) if p)
    from featurebank.embedder.ray_cluster import session

    with session(num_cpus=2):
        yield
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def stored(bank: Path) -> store_mod.Items:
    with store_mod.open(bank, readonly=True) as st:
        return st.to_numpy()


def test_ray_path_equals_local_path_on_digits(
    cluster: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from featurebank.cli import main as cli_main
    from featurebank.demo import write_digits
    from featurebank.embedder.embedding import make_spec
    from featurebank.embedder.pipeline import embed
    from featurebank.embedder.ray_job import run

    images_dir = write_digits(tmp_path / "data", labels_per_class=5).images_dir
    local = embed(str(images_dir), str(tmp_path / "local"), str(DIGITS_MODEL), progress=False)
    rc = cli_main(["embed", str(images_dir), "--bank", str(tmp_path / "ray"), "--backbone",
                   str(DIGITS_MODEL), "--engine", "ray", "--shard-size", "400", "--workers", "1",
                   "--cpus-per-worker", "1", "--no-progress", "--json"])  # fmt: skip
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["embedded"] == local["embedded"] == summary["total"] > 1700
    assert summary["shards"]["run"] == summary["shards"]["total"] == 5
    a, b = stored(tmp_path / "local"), stored(tmp_path / "ray")
    order_a, order_b = np.argsort(a.keys), np.argsort(b.keys)
    assert [a.keys[i] for i in order_a] == [b.keys[i] for i in order_b]
    assert [a.labels[i] for i in order_a] == [b.labels[i] for i in order_b]
    # bit for bit, in the store's float16
    va = a.vectors[order_a].astype(np.float16)
    vb = b.vectors[order_b].astype(np.float16)
    assert np.array_equal(va.view(np.uint16), vb.view(np.uint16))
    meta = b.meta[0]
    assert {"uri", "sha256", "size"} <= set(meta)

    again = run(str(images_dir), str(tmp_path / "ray"), make_spec(str(DIGITS_MODEL)),
                progress=False)  # fmt: skip
    assert again["embedded"] == 0 and again["skipped"] == again["total"]
    assert again["shards"]["run"] == 0 and "not started" in again["device"]


def test_worker_that_kills_itself_is_redone(cluster: None, tmp_path: Path) -> None:
    from featurebank.embedder.ray_job import run

    src = write_images(tmp_path / "imgs.npy", 96)
    flag = tmp_path / "died"
    model = SleepingModel(delay=0.02, die_after=3, flag=str(flag))
    summary = run(str(src), str(tmp_path / "bank"), stand_in_spec(), batch_size=8,
                  shard_size=16, workers=(2, 2), cpus_per_worker=0.5, progress=False,
                  model=model)  # fmt: skip
    assert flag.exists()  # a worker really died
    items = stored(tmp_path / "bank")
    assert len(items) == 96 == summary["embedded"]
    assert sorted(items.keys) == sorted(f"imgs.npy#{i}" for i in range(96))
    assert not list((tmp_path / "bank" / "staging").glob(".*.tmp"))
    expected = SleepingModel()(stand_in_spec()).forward(np.load(src))
    order = np.argsort([int(k.split("#")[1]) for k in items.keys])
    assert np.allclose(items.vectors[order], expected)


def test_rerun_skips_finished_shards_and_new_manifest_gives_new_ids(
    cluster: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from featurebank.embedder.ray_job import run

    src = write_images(tmp_path / "imgs.npy", 40)
    bank, spec = tmp_path / "bank", stand_in_spec()
    first = run(str(src), str(bank), spec, batch_size=8, shard_size=10, cpus_per_worker=0.5,
                progress=True, model=SleepingModel(), commit=False)  # fmt: skip
    assert first["shards"]["run"] == 4 and "commit" not in first
    progress = capsys.readouterr().err  # images, rate and ETA, shards done / total, failures
    assert "40/40" in progress and "img/s" in progress
    assert "shards=4/4" in progress and "failed=0" in progress
    with pytest.raises(NotFound):
        store_mod.open(bank, readonly=True)
    second = run(str(src), str(bank), spec, batch_size=8, shard_size=10, cpus_per_worker=0.5,
                 progress=False, model=SleepingModel())  # fmt: skip
    assert second["shards"]["done_before"] == 4 and second["shards"]["run"] == 0
    assert second["embedded"] == 40 and len(stored(bank)) == 40

    recs = sources.open_source(src).records
    ids = [s.id for s in shards.plan_shards(recs, spec, 10)]
    assert ids == [s.id for s in shards.plan_shards(list(reversed(recs)), spec, 10)]
    edited = [sources.Record(r.key, "x" if r.row == 0 else r.label, r.split, r.path, r.row)
              for r in recs]  # fmt: skip
    new_ids = [s.id for s in shards.plan_shards(edited, spec, 10)]
    assert new_ids[0] != ids[0] and new_ids[1:] == ids[1:]


def test_pool_of_two_actors_works_on_two_shards_at_once(cluster: None, tmp_path: Path) -> None:
    from featurebank.embedder.ray_job import run

    src = write_images(tmp_path / "imgs.npy", 64)
    for n in (1, 2):
        s = run(str(src), str(tmp_path / f"bank{n}"), stand_in_spec(), batch_size=8,
                shard_size=8, workers=(n, n), cpus_per_worker=0.5, progress=False,
                model=SleepingModel(delay=0.5))  # fmt: skip
        assert s["embedded"] == 64 and s["pool_images_per_s"] > 0
        assert s["shards_at_once"] == n, s  # each actor had a shard in hand at the same time


def test_pool_that_cannot_fit_is_refused(cluster: None, tmp_path: Path) -> None:
    from featurebank.embedder.ray_job import run

    src = write_images(tmp_path / "imgs.npy", 4)
    with pytest.raises(InvalidInput, match="do not fit"):
        run(str(src), str(tmp_path / "bank"), stand_in_spec(), workers=(2, 2),
            cpus_per_worker=1.0, progress=False, model=SleepingModel())  # fmt: skip
    with pytest.raises(InvalidInput, match="MIN <= MAX"):
        run(str(src), str(tmp_path / "bank"), stand_in_spec(), workers=(3, 2),
            progress=False, model=SleepingModel())  # fmt: skip


# ---- committing, no Ray needed --------------------------------------------------------------


def stage_shards(staging: Path, n: int, shard_size: int) -> int:
    """Write finished shards of n stand-in images straight through the shard stages."""
    src = sources.open_source(write_images(staging.parent / "imgs.npy", n))
    model = SleepingModel()(stand_in_spec())
    plan = shards.plan_shards(src.records, model.spec, shard_size)
    for shard in plan:
        rows = shards.embed_shard(src, shard.records, model, batch_size=shard_size)
        shards.write_shard(staging, shard, rows, model.spec)
    return len(plan)


def test_driver_killed_mid_commit_then_rerun(tmp_path: Path) -> None:
    staging, bank = tmp_path / "staging", tmp_path / "bank"
    count = stage_shards(staging, 2400, 6)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "featurebank", "store", "commit", "--bank", str(bank),
           "--from", str(staging), "--json"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(staging.glob("*.committed")) and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(list(staging.glob("*.committed")))
    assert proc.returncode == -signal.SIGKILL
    assert 0 < committed < count, "the commit was not interrupted part-way"
    partial = len(stored(bank))
    assert 0 < partial < 2400

    summary = commit_shards(bank, staging)
    items = stored(bank)
    assert len(items) == 2400 == len(set(items.keys))
    assert summary["already_committed"] >= committed
    assert summary["added"] == 2400 - partial
    assert commit_shards(bank, staging)["added"] == 0  # idempotent


def test_commit_refuses_a_corrupt_shard_and_an_empty_folder(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    stage_shards(staging, 20, 10)
    first = shards.done_markers(staging)[0]
    path = shards.shard_path(staging, first["shard"], shards.PARQUET)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    from featurebank.core.errors import FailedPrecondition

    with pytest.raises(FailedPrecondition, match="checksum"):
        commit_shards(tmp_path / "bank", staging)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFound, match="no finished shards"):
        commit_shards(tmp_path / "bank", tmp_path / "empty")


def test_shard_file_holds_failures_typed_vectors_and_thumbnails(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    folder = tmp_path / "imgs" / "cls"
    folder.mkdir(parents=True)
    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not an image")
    src = sources.open_source(tmp_path / "imgs")
    model = SleepingModel()(stand_in_spec("float16"))
    (shard,) = shards.plan_shards(src.records, model.spec, 10, thumbnails=True)
    assert shard.id != shards.plan_shards(src.records, model.spec, 10)[0].id
    rows = shards.embed_shard(src, shard.records, model, thumbnails=True)
    marker = shards.write_shard(tmp_path / "st", shard, rows, model.spec)
    assert marker["rows"] == 2 and marker["failed"] == 1
    table = pq.read_table(shards.shard_path(tmp_path / "st", shard.id, shards.PARQUET))
    vtype = table.schema.field("vector").type
    assert (vtype.list_size, str(vtype.value_type)) == (4, "halffloat")
    assert table.column("vector").null_count == 1
    assert table.column("error").to_pylist()[0] is None and table.column("error")[1].as_py()
    summary = commit_shards(tmp_path / "bank", tmp_path / "st")
    assert summary["added"] == 1 and summary["failed"] == 1
    with store_mod.open(tmp_path / "bank", readonly=True) as st:
        assert [e["key"] for e in st.errors()] == ["cls/b.png"]
        assert st.to_numpy().labels == ["cls"]
        (thumb,) = st.thumbnails(["cls/a.png"])
        assert thumb is not None and thumb[:2] == b"\xff\xd8"  # a JPEG
