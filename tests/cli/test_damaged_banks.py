"""The corruption matrix: every published file damaged four ways, every CURRENT pointing
nowhere, the store's own files damaged, a read-only mount and a full disk.

For each case: the exit code and the one line naming the file, `store verify` detecting
it, what a server does (falls back to an intact generation, or refuses in one line),
`store repair` restoring service, and every committed item still there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.cli import main
from featurebank.index.build import build_index
from featurebank.index.searcher import Searcher
from featurebank.server.app import ServeConfig
from featurebank.server.client import FeatureBankClient, RemoteError
from tests.support.server import RunningServer, make_vector_bank

ITEMS = 120  # make_vector_bank: 3 classes x 40


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bank with two index generations (2 live), built once and copied for each case."""
    bank = make_vector_bank(tmp_path_factory.mktemp("pristine") / "bank")
    build_index(bank, transform="l2")
    assert (bank / "indexes" / "CURRENT").read_text().strip() == "2"
    return bank


@pytest.fixture
def bank(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bank"
    shutil.copytree(pristine, copy)
    return copy


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated": lambda p: os.truncate(p, p.stat().st_size // 3),
    "zeroed": lambda p: p.write_bytes(bytes(p.stat().st_size)),
    "random": lambda p: p.write_bytes(np.random.default_rng(1).bytes(p.stat().st_size)),
    "deleted": lambda p: p.unlink(),
}
INDEX_FILES = ("index.faiss", "manifest.json", "transform.npz", "checksums.json")


def items_of(bank: Path) -> int:
    with store_mod.open(bank, readonly=True) as st:
        return len(st.to_numpy().ids)


@pytest.mark.parametrize("how", sorted(DAMAGE))
@pytest.mark.parametrize("name", INDEX_FILES)
def test_damaged_index_file(
    bank: Path, name: str, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = bank / "indexes" / "2" / name
    DAMAGE[how](path)

    code, text = cli(capsys, "store", "verify", "--bank", str(bank))
    assert code == 1, text  # derived damage only
    assert str(path) in text or (name == "checksums.json" and "checksums.json" in text), text

    if name != "checksums.json" or how != "deleted":  # a generation without sums still loads
        with Searcher.load(bank) as s:  # what a server loads: the intact generation 1
            assert s.generation == 1
            assert any(str(path) in d for d in s.damaged), s.damaged
    code, text = cli(capsys, "store", "info", "--bank", str(bank))
    assert code == 0 and "Traceback" not in text, text

    code, text = cli(capsys, "store", "repair", "--bank", str(bank))
    assert code == 0, text
    code, text = cli(capsys, "store", "verify", "--bank", str(bank))
    assert code == 0 and "intact" in text, text
    with Searcher.load(bank) as s:
        assert s.damaged == [] and s.search(np.ones((1, 16), np.float32), k=3).ids.shape == (1, 3)
    assert items_of(bank) == ITEMS


def test_every_index_generation_damaged(bank: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for gen in ("1", "2"):
        DAMAGE["truncated"](bank / "indexes" / gen / "index.faiss")
    code, text = cli(capsys, "store", "info", "--bank", str(bank))
    assert code == 0 and "index       DAMAGED" in text and "store repair" in text, text
    with pytest.raises(Exception, match="no intact index generation") as info:
        Searcher.load(bank)
    assert "indexes/2/index.faiss" in str(info.value) and "indexes/1/index.faiss" in str(info.value)

    code, text = cli(capsys, "store", "repair", "--bank", str(bank))
    assert code == 0 and "rebuilt the index from the store as generation 3" in text, text
    with Searcher.load(bank) as s:
        assert s.generation == 3 and s.manifest["transform"]["spec"] == "l2"  # params kept
    assert items_of(bank) == ITEMS


@pytest.mark.parametrize("pointer", ["missing generation", "garbage", "deleted"])
def test_index_current_pointing_nowhere(
    bank: Path, pointer: str, capsys: pytest.CaptureFixture[str]
) -> None:
    current = bank / "indexes" / "CURRENT"
    if pointer == "deleted":
        current.unlink()
    else:
        current.write_text("7\n" if pointer == "missing generation" else "\x00zz\n")
    if pointer != "deleted":
        code, text = cli(capsys, "store", "verify", "--bank", str(bank))
        assert code == 1 and str(current) in text, text
    with Searcher.load(bank) as s:
        assert s.generation == 2  # the newest intact generation
    code, text = cli(capsys, "store", "repair", "--bank", str(bank))
    assert code == 0, text
    assert current.read_text().strip() == "2"
    code, _ = cli(capsys, "store", "verify", "--bank", str(bank))
    assert code == 0


def test_store_current_naming_a_missing_environment(
    bank: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (bank / "store" / "CURRENT").write_text("env-9\n")
    code, text = cli(capsys, "store", "info", "--bank", str(bank))
    assert code == 2 and "store/CURRENT names env-9, which does not exist" in text, text
    code, text = cli(capsys, "store", "verify", "--bank", str(bank))
    assert code == 2 and "env-9" in text, text
    code, text = cli(capsys, "store", "repair", "--bank", str(bank))
    assert code == 0 and "at env-1" in text, text
    assert items_of(bank) == ITEMS


@pytest.mark.parametrize("how", ["truncated", "random", "zeroed"])
def test_damaged_store_file_is_named_not_mapped(bank: Path, how: str) -> None:
    """A short data.mdb would SIGBUS the process that maps it: the header is checked first."""
    data = bank / "store" / "env-1" / "data.mdb"
    DAMAGE[how](data)
    for command in (["store", "info"], ["store", "verify"], ["index", "build"]):
        r = subprocess.run(
            [sys.executable, "-m", "featurebank", *command, "--bank", str(bank)],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )  # fmt: skip
        assert r.returncode == 2, (command, r.returncode, r.stderr)  # an exit, not a signal
        assert str(data) in r.stdout + r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "data.mdb is " in r.stderr


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_server_falls_back_to_an_older_generation_then_to_exact_search(bank: Path) -> None:
    """A damaged live generation: the newest intact one is served, and said so. None intact:
    exact search from the store, said so in GetInfo, while the server rebuilds an index in
    the background; both times every committed item stays searchable."""
    DAMAGE["truncated"](bank / "indexes" / "2" / "index.faiss")
    with RunningServer(ServeConfig(bank=str(bank))) as served:
        engine = served.server.engine
        assert engine.ready
        with FeatureBankClient(served.target) as client:
            answer = client.classify(vector=np.ones(16, np.float32).tolist())
            assert answer.labels[0].label and answer.index_generation == 1
            wait_for(lambda: "repaired" in str(engine.repair_state))
            assert "set aside damaged index generation 2" in str(engine.repair_state)
            assert client.info().index.damaged == ""  # the repair left generation 1 live and intact
    assert (bank / "indexes" / "CURRENT").read_text().strip() == "1"

    DAMAGE["truncated"](bank / "indexes" / "1" / "index.faiss")  # now none is intact
    vector = np.ones(16, np.float32).tolist()
    with RunningServer(ServeConfig(bank=str(bank), replica=True)) as served:  # repairs nothing
        assert served.server.engine.ready  # serving, not refusing
        with FeatureBankClient(served.target) as client:
            assert client.classify(vector=vector).index_generation == 0
            info = client.info().index
            assert info.generation == 0 and info.factory == "Flat"
            assert info.transform == "cl2n"  # generation 1's, the newest manifest left
            assert "indexes/1/index.faiss is damaged" in info.damaged, info.damaged
            assert "exact search from the store" in info.damaged and "on the primary" in info.damaged
            assert str(bank) not in info.damaged  # "this bank", not the server's path
            assert len(client.search(vector=vector, k=ITEMS).neighbors) == ITEMS

    with (RunningServer(ServeConfig(bank=str(bank))) as served,  # the primary rebuilds one
          FeatureBankClient(served.target) as client):  # fmt: skip
        assert client.classify(vector=vector).index_generation in (0, 3)
        wait_for(lambda: client.info().index.generation == 3)
        assert client.info().index.damaged == ""
        assert "rebuilt the index from the store" in str(served.server.engine.repair_state)
        assert len(client.search(vector=vector, k=ITEMS).neighbors) == ITEMS
    assert items_of(bank) == ITEMS


def test_exact_search_from_the_store_matches_a_flat_index(bank: Path) -> None:
    """The fallback searches the store's vectors with the bank's transform: the same
    neighbours as an exact index built by `index build`."""
    for gen in ("1", "2"):
        DAMAGE["zeroed"](bank / "indexes" / gen / "index.faiss")
    with Searcher.load(bank, exact_fallback=True) as s:
        assert s.generation == 0 and "no intact index generation" in s.manifest["exact_from_store"]
        assert s.manifest["transform"]["spec"] == "l2"  # the damaged generation's params
        queries = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
        exact = s.search(queries, k=10)
    build_index(bank, factory="Flat", transform="l2")
    with Searcher.load(bank) as s:
        built = s.search(queries, k=10)
    assert np.array_equal(exact.ids, built.ids)
    np.testing.assert_allclose(exact.scores, built.scores, rtol=1e-5, atol=1e-5)


# ---- mounts: read-only and full -----------------------------------------------------------


@contextlib.contextmanager
def mounted(*args: str, target: Path) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", *args, str(target)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount here ({e}); run as root where mount is permitted")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def read_only_view(source: Path, target: Path) -> contextlib.AbstractContextManager[Path]:
    @contextlib.contextmanager
    def view() -> Iterator[Path]:
        with mounted("--bind", str(source), target=target):
            r = subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], capture_output=True)
            if r.returncode != 0:
                pytest.skip(f"cannot remount read-only: {r.stderr.decode().strip()}")
            yield target

    return view()


def test_read_only_bank_is_read_and_served_but_not_written(
    bank: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with read_only_view(bank, tmp_path / "ro") as ro:
        code, text = cli(capsys, "store", "info", "--bank", str(ro))
        assert code == 0 and f"items       {ITEMS}" in text, text
        code, text = cli(capsys, "store", "verify", "--bank", str(ro))
        assert code == 0, text
        labels = tmp_path / "labels.csv"
        labels.write_text("cat/0-0,dog\n")
        code, text = cli(capsys, "labels", "import", "--bank", str(ro), str(labels))
        assert code == 2 and "is read-only" in text, text
        code, text = cli(capsys, "index", "build", "--bank", str(ro))
        assert code == 2 and "is read-only" in text and "Traceback" not in text, text
        with RunningServer(ServeConfig(bank=str(ro))) as served:
            assert served.server.config.replica  # served read-only
            with FeatureBankClient(served.target) as client:
                assert client.classify(vector=np.ones(16, np.float32).tolist()).labels[0].label
    assert items_of(bank) == ITEMS


def test_full_disk_during_index_build_and_writes(
    pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with mounted("-t", "tmpfs", "-o", "size=1m", "tmpfs", target=tmp_path / "small") as fs:
        bank = fs / "bank"
        shutil.copytree(pristine, bank)
        shutil.rmtree(bank / "indexes" / "1")
        filler = fs / "filler"
        free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
        filler.write_bytes(bytes(max(0, free - 4096)))

        code, text = cli(capsys, "index", "build", "--bank", str(bank), "--transform", "none")
        assert code == 2 and "disk full" in text and "live generation is unchanged" in text, text
        assert not list((bank / "indexes").glob(".staging-*"))  # nothing left behind
        assert (bank / "indexes" / "CURRENT").read_text().strip() == "2"

        from featurebank.core.errors import StorageFull

        with store_mod.open(bank) as st, pytest.raises(StorageFull, match="disk full"):
            st.put_batch([f"new/{i}" for i in range(20_000)],
                         np.ones((20_000, 16), np.float32))  # fmt: skip
        filler.unlink()
        assert items_of(bank) == ITEMS  # the failed batch was not half-written
        code, text = cli(capsys, "store", "verify", "--bank", str(bank))
        assert code == 0, text


@pytest.mark.parametrize("name", ["head.npz", "manifest.json"])
def test_damaged_head_serves_without_it_until_repaired(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from featurebank.classify.classifier import Classifier

    bank = make_vector_bank(tmp_path / "bank", head=True)
    path = bank / "heads" / "1" / name
    DAMAGE["truncated"](path)
    code, text = cli(capsys, "store", "info", "--bank", str(bank))
    assert code == 0 and "head        DAMAGED" in text and str(path) in text, text
    code, text = cli(capsys, "store", "verify", "--bank", str(bank))
    assert code == 1 and str(path) in text, text
    with Classifier(bank) as clf:  # the neighbours still answer
        assert clf.head_generation is None
        assert clf.classify(np.ones((1, 16), np.float32), mode="knn")
    code, text = cli(capsys, "store", "repair", "--bank", str(bank))
    assert code == 0 and "retrained the head" in text, text
    with Classifier(bank) as clf:
        assert clf.head_generation == 2
    assert items_of(bank) == ITEMS


def test_damaged_model_copy_is_named(bank: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The bank's copy of its backbone is named by its sha256; verify checks it still is."""
    import hashlib

    content = b"a model file the bank keeps"
    copy = bank / "models" / f"{hashlib.sha256(content).hexdigest()}.keras"
    copy.parent.mkdir()
    copy.write_bytes(content)
    code, text = cli(capsys, "store", "verify", "--bank", str(bank))
    assert code == 0, text
    DAMAGE["truncated"](copy)
    code, text = cli(capsys, "store", "verify", "--bank", str(bank))
    assert code == 2 and str(copy) in text and "store relink" in text, text


def test_full_disk_during_head_training_and_embedding(
    pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A head that cannot be written leaves none half-published; an embed job that cannot
    commit says the disk is full and loses nothing it had committed."""
    from PIL import Image

    with mounted("-t", "tmpfs", "-o", "size=4m", "tmpfs", target=tmp_path / "small") as fs:
        bank = fs / "bank"
        shutil.copytree(pristine, bank)
        filler = fs / "filler"
        filler.write_bytes(bytes(max(0, os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize - 4096)))
        code, text = cli(capsys, "head", "train", "--bank", str(bank))
        assert code == 2 and "disk full" in text and "Traceback" not in text, text
        assert not (bank / "heads").exists() or not list((bank / "heads").glob(".staging-*"))
        assert not (bank / "heads" / "CURRENT").exists()
        filler.unlink()

        images = tmp_path / "images"
        for i in range(12):
            (images / str(i % 2)).mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(i).integers(0, 255, (28, 28, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / str(i % 2) / f"{i}.png")
        model = Path(__file__).resolve().parents[2] / "featurebank/embedder/models/digits_cnn.keras"
        fresh = fs / "embedded"
        room = -(-model.stat().st_size // 4096) * 4096 + 8192  # the model's copy fits, the store not
        filler.write_bytes(bytes(max(0, os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize - room)))
        code, text = cli(capsys, "embed", str(images), "--bank", str(fresh), "--backbone", str(model),
                         "--layer", "features", "--no-progress")  # fmt: skip
        assert code == 2 and ("disk full" in text or "could not write" in text), text
        assert "Traceback" not in text


def test_several_banks_a_damaged_one_fails_alone_a_read_only_one_is_read(
    pristine: Path, tmp_path: Path
) -> None:
    """`serve --banks DIR`: a bank whose store is damaged shows `failed` with its one line
    while the others serve; one on a read-only mount is served read-only."""
    root = tmp_path / "banks"
    for name in ("good", "damaged", "ro"):
        shutil.copytree(pristine, root / name)
    data = root / "damaged" / "store" / "env-1" / "data.mdb"
    DAMAGE["truncated"](data)
    vector = np.ones(16, np.float32).tolist()
    with read_only_view(root / "ro", root / "ro"), RunningServer(ServeConfig(banks_dir=root)) as rs:
        with FeatureBankClient(rs.target, bank="good") as client:
            assert client.classify(vector=vector).labels[0].label
        with FeatureBankClient(rs.target, bank="ro") as client:
            assert client.classify(vector=vector).labels[0].label
            with pytest.raises(RemoteError, match="read-only") as refused:
                client.upsert([{"key": "new/1", "vector": vector}])
            assert refused.value.code.name == "FAILED_PRECONDITION"
        with FeatureBankClient(rs.target, bank="damaged") as client:
            with pytest.raises(RemoteError, match="data.mdb is truncated") as failed:
                client.classify(vector=vector)
            assert str(root) not in str(failed.value)
        with FeatureBankClient(rs.target, bank="good") as client:
            states = {b.name: b for b in client.info().banks}
            assert states["damaged"].state == "failed"
            assert "this bank's store/env-1/data.mdb is truncated" in states["damaged"].error
            assert states["ro"].state == "open" and states["good"].state == "open"
            assert client.classify(vector=vector).labels[0].label  # the others still serve
    assert items_of(root / "ro") == ITEMS


def test_full_disk_during_upsert_over_grpc(pristine: Path, tmp_path: Path) -> None:
    """Upsert on a full disk: RESOURCE_EXHAUSTED in one line, nothing half-written, the
    server keeps serving, and writes succeed again once there is room."""
    vector = np.ones(16, np.float32).tolist()
    with mounted("-t", "tmpfs", "-o", "size=2m", "tmpfs", target=tmp_path / "small") as fs:
        bank = fs / "bank"
        shutil.copytree(pristine, bank)
        with (RunningServer(ServeConfig(bank=str(bank))) as served,
              FeatureBankClient(served.target) as client):  # fmt: skip
            client.upsert([{"key": "before/0", "vector": vector}])
            filler = fs / "filler"
            filler.write_bytes(bytes(max(0, os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize - 4096)))
            with pytest.raises(RemoteError) as full:
                client.upsert([{"key": f"full/{i}", "vector": vector} for i in range(3000)])
            assert full.value.code.name == "RESOURCE_EXHAUSTED", full.value
            assert "disk full" in full.value.details and str(bank) not in full.value.details
            assert client.classify(vector=vector).labels[0].label  # still serving
            filler.unlink()
            client.upsert([{"key": "after/0", "vector": vector}])
            keys = {n.key for n in client.search(vector=vector, k=ITEMS + 2).neighbors}
            assert {"before/0", "after/0"} <= keys and not any(k.startswith("full/") for k in keys)
        assert items_of(bank) == ITEMS + 2  # acknowledged items, and only those
