"""The fault matrix: every file of a bank damaged four ways, from one table.

Each row names a file and what must follow when it is truncated, zeroed, overwritten
with random bytes or deleted: the exit code of `store info` (never a traceback), what
`store verify` says (its exit code and the file named), what a server serves through
(`Classifier(exact_fallback=True)`, what the server loads; the slow variant starts a
real gRPC server and reads GetInfo), what `store repair` does, and how many of the
committed items are still there afterwards, each vector as committed.

The default run damages every file one way (truncated); `-m slow` runs the rest.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.classify.classifier import Classifier
from featurebank.classify.head_training import train_head
from featurebank.cli import main
from featurebank.core.bank import publish_files
from featurebank.core.errors import FeaturebankError
from featurebank.core.integrity import CHECKSUMS
from featurebank.index.build import build_index
from featurebank.server.app import ServeConfig
from featurebank.server.client import FeatureBankClient
from tests.support.server import RunningServer, make_vector_bank

ITEMS = 120  # make_vector_bank: 3 classes x 40

DAMAGE = {
    "truncated": lambda p: os.truncate(p, p.stat().st_size // 3),
    "zeroed": lambda p: p.write_bytes(bytes(p.stat().st_size)),
    "random": lambda p: p.write_bytes(np.random.default_rng(1).bytes(p.stat().st_size)),
    "deleted": lambda p: p.unlink(),
}
# a CURRENT pointer naming a generation (or an environment) that does not exist
NOWHERE = {
    "nowhere": lambda p: p.write_text("env-9\n" if p.parent.name == "store" else "7\n"),
}


@dataclass(frozen=True)
class Expect:
    """What must follow when the file is damaged (see the module docstring)."""

    verify: int  # exit code: 1 derived files only, 2 the store
    served: str  # "index N" / "head N" / "exact" (from the store) / "refused"
    repair: int = 0  # exit code of `store repair`
    lost: int = 0  # committed items missing after the repair
    info: int = 0  # exit code of `store info`


DERIVED = Expect(verify=1, served="index 1")
HEAD = Expect(verify=1, served="head 1")
POINTER = Expect(verify=1, served="index 2")
STORE_POINTER = Expect(verify=2, served="refused", info=2)
STORE_DATA = Expect(verify=2, served="refused", repair=2, lost=ITEMS, info=2)

FILES: dict[str, Expect] = {
    "indexes/2/index.faiss": DERIVED,
    "indexes/2/manifest.json": DERIVED,
    "indexes/2/transform.npz": DERIVED,
    "indexes/2/checksums.json": DERIVED,
    "indexes/CURRENT": POINTER,
    "heads/2/head.npz": HEAD,
    "heads/2/manifest.json": HEAD,
    "heads/2/calibration.npz": HEAD,
    "heads/2/stacked.npz": HEAD,
    "heads/2/out_of_fold.npz": HEAD,
    "heads/2/checksums.json": HEAD,
    "heads/CURRENT": Expect(verify=1, served="head 2"),
    "store/CURRENT": STORE_POINTER,
    "store/env-1/data.mdb": STORE_DATA,  # 120 items fill a few pages: a third keeps none
    "store/env-1/lock.mdb": Expect(verify=0, served="index 2"),  # LMDB rebuilds it
}
EXCEPTIONS: dict[tuple[str, str], Expect] = {
    # a generation without its checksums still loads (verify says it cannot be checked)
    ("indexes/2/checksums.json", "deleted"): Expect(verify=1, served="index 2"),
    ("heads/2/checksums.json", "deleted"): Expect(verify=1, served="head 2"),
}


def expected(name: str, how: str) -> Expect:
    return EXCEPTIONS.get((name, how), FILES[name])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, store_mod.Items]:
    """Two index and two head generations (2 live), and the items committed. Head 2 is
    head 1 published again (a second training would only cost time)."""
    bank = make_vector_bank(tmp_path_factory.mktemp("matrix") / "bank")
    train_head(bank, epochs=3)
    build_index(bank, transform="l2")
    heads = bank / "heads"
    publish_files(heads, lambda staging: [shutil.copy(p, staging) for p in (heads / "1").iterdir()
                                          if p.name != CHECKSUMS], "head")  # fmt: skip
    with store_mod.open(bank, readonly=True) as st:
        return bank, st.to_numpy()


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Traceback" not in text, text
    return code, text


def served_through(bank: Path) -> str:
    """What a server loads: the index and head generations, or the one-line refusal."""
    try:
        with Classifier(bank, exact_fallback=True) as clf:
            assert clf.classify(np.ones((1, 16), np.float32), mode="knn")[0].labels
            index = "exact" if clf.index_generation == 0 else f"index {clf.index_generation}"
            return f"{index}, head {clf.head_generation}"
    except FeaturebankError as e:
        return f"refused: {e}"


def committed_items_left(bank: Path, held: store_mod.Items) -> int:
    """How many committed items the store still holds exactly as committed."""
    try:
        with store_mod.open(bank, readonly=True) as st:
            got = st.to_numpy()
    except FeaturebankError:
        return 0
    where = {int(i): j for j, i in enumerate(held.ids)}
    same = 0
    for j, i in enumerate(got.ids):
        k = where.get(int(i))
        same += k is not None and bool(np.array_equal(got.vectors[j], held.vectors[k]))
    return same


def cases() -> list[object]:
    return [
        pytest.param(name, how, marks=() if how in ("truncated", "nowhere") else pytest.mark.slow)
        for name in FILES
        for how in [*DAMAGE, *(NOWHERE if name.endswith("CURRENT") else ())]
    ]


@pytest.mark.parametrize(("name", "how"), cases())
def test_fault_matrix(
    pristine: tuple[Path, store_mod.Items], tmp_path: Path, name: str, how: str,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    want = expected(name, how)
    bank = tmp_path / "bank"
    shutil.copytree(pristine[0], bank)
    path = bank / name
    {**DAMAGE, **NOWHERE}[how](path)

    code, text = cli(capsys, "store", "info", "--bank", str(bank))
    assert code == want.info, text
    if want.info:
        assert str(path.parent) in text, text  # one line naming the file (or its folder)

    code, text = cli(capsys, "store", "verify", "--bank", str(bank))
    assert code == want.verify, text
    if want.verify:
        assert name.split("/")[-1] in text and str(path.parent) in text, text

    served = served_through(bank)
    if want.served == "refused":
        assert served.startswith("refused") and str(path.parent) in served, served
    else:
        what, gen = want.served.split()
        assert f"{what} {gen}" in served, served

    code, text = cli(capsys, "store", "repair", "--bank", str(bank))
    assert code == want.repair, text
    assert committed_items_left(bank, pristine[1]) == ITEMS - want.lost
    if want.lost:
        assert "store backup" in text, text  # nothing recoverable: restore a copy
        return
    code, text = cli(capsys, "store", "verify", "--bank", str(bank))
    assert code == 0 and "intact" in text, text
    with Classifier(bank) as clf:  # served from intact generations, nothing in its place
        assert clf.index_damaged is None and clf.head_damaged is None
        assert clf.head_generation is not None


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, e in FILES.items() if e.served != "refused"])
def test_fault_matrix_over_grpc(
    pristine: tuple[Path, store_mod.Items], tmp_path: Path, name: str
) -> None:
    """A real server on each damaged file: it serves, and GetInfo says what is served instead."""
    bank = tmp_path / "bank"
    shutil.copytree(pristine[0], bank)
    DAMAGE["truncated"](bank / name)
    with (RunningServer(ServeConfig(bank=str(bank), replica=True)) as served,
          FeatureBankClient(served.target) as client):  # fmt: skip
        answer = client.classify(vector=np.ones(16, np.float32).tolist())
        assert answer.labels[0].label
        info = client.info()
        damaged = info.index.damaged + info.head.damaged
        if FILES[name].verify:
            assert name.split("/")[-1] in damaged or "CURRENT" in damaged, damaged
        assert len(client.search(vector=np.ones(16, np.float32).tolist(), k=ITEMS).neighbors) == ITEMS


# ---- shard files of `embed --engine ray`, before they are committed ---------------------------


def stage_shards(staging: Path, n: int = 20, shard_size: int = 10) -> list[str]:
    """What the Ray job's workers write: finished shards of n stand-in images (no Ray)."""
    from featurebank.embedder import shards, sources
    from tests.support.ray_models import SleepingModel, stand_in_spec, write_images

    staging.mkdir(parents=True, exist_ok=True)
    src = sources.open_source(write_images(staging.parents[1] / "imgs.npy", n))
    model = SleepingModel(delay=0.0)(stand_in_spec())
    plan = shards.plan_shards(src.records, model.spec, shard_size)
    for shard in plan:
        if shards.read_marker(staging, shard.id) is None:  # a rerun redoes only what is missing
            shards.write_shard(staging, shard, shards.embed_shard(src, shard.records, model), model.spec)
    return [s.id for s in plan]


@pytest.mark.parametrize("how", [
    pytest.param(how, marks=() if how == "truncated" else pytest.mark.slow) for how in DAMAGE
])  # fmt: skip
@pytest.mark.parametrize("kind", [".parquet", ".done"])
def test_damaged_shard(tmp_path: Path, kind: str, how: str, capsys: pytest.CaptureFixture[str]) -> None:
    """verify names the damaged shard, commit commits the others and says which it did not,
    repair sets it aside, and the job's rerun embeds it again: every item arrives once."""
    bank, staging = tmp_path / "bank", tmp_path / "bank" / "staging"
    first = stage_shards(staging)[0]
    path = staging / f"shard-{first}{kind}"
    DAMAGE[how](path)
    unfinished = kind == ".done" and how == "deleted"  # no marker: a shard still to be done

    code, text = cli(capsys, "store", "commit", "--bank", str(bank), "--from", str(staging))
    assert code == (0 if unfinished else 2), text
    assert unfinished or (str(path) in text and "1 damaged shards not committed" in text), text
    assert committed_count(bank) == 10  # the intact shard
    code, text = cli(capsys, "store", "verify", "--bank", str(bank))
    assert code == (0 if unfinished else 1) and (unfinished or str(path) in text), text

    code, text = cli(capsys, "store", "repair", "--bank", str(bank))
    assert code == 0 and (unfinished or f"set aside damaged shard {first}" in text), text
    code, text = cli(capsys, "store", "verify", "--bank", str(bank))
    assert code == 0, text
    stage_shards(staging)  # the embed job's rerun
    code, text = cli(capsys, "store", "commit", "--bank", str(bank), "--from", str(staging))
    assert code == 0, text
    assert committed_count(bank) == 20


def committed_count(bank: Path) -> int:
    with store_mod.open(bank, readonly=True) as st:
        keys = st.to_numpy().keys
        assert len(keys) == len(set(keys))
        return len(keys)
