"""The default transform follows what the user asked for, through the real CLI.

`--metric l2` (or ip) asks for the nearest by that metric of the vectors as stored, so
the default transform is `none` and a search answers exact L2 neighbours; the default
metric, cosine, is for classification and keeps cl2n. `index build` says which and why,
the manifest records it, and a transform the user names is kept across rebuilds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.cli import main
from featurebank.index.searcher import Searcher
from featurebank.index.views import read_manifest
from tests.support.index_data import World, make_bank

ROOT = Path(__file__).resolve().parents[2]


def live_manifest(bank: Path) -> dict[str, object]:
    gen = (bank / "indexes" / "CURRENT").read_text().strip()
    return read_manifest(bank / "indexes" / gen)


def test_metric_l2_gets_transform_none_and_searches_answer_l2_neighbours(tmp_path: Path) -> None:
    x, _ = World.make(16, latent=6, seed=3).sample(500, seed=4)
    x += 5.0  # far from the origin: centring and normalising would change the neighbours
    bank = make_bank(tmp_path / "bank", x.astype(np.float32))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "featurebank", "index", "build", "--bank",
                          str(bank), "--metric", "l2"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "metric l2, transform none (the default for metric l2)" in run.stdout
    m = live_manifest(bank)
    assert m["transform"]["spec"] == "none" and m["transform_source"] == "the default for metric l2"
    assert m["index_params"]["transform"] == "auto"  # a later metric change re-chooses
    queries = x[:50] + 0.01
    with Searcher.load(bank) as searcher:
        found = searcher.search(queries, 10).ids
    d = ((queries[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    with store_mod.open(bank, readonly=True) as st:
        ids = np.asarray(st.to_numpy().ids, dtype=np.int64)
    exact = ids[np.argsort(d, axis=1)[:, :10]]
    assert all(set(f) == set(e) for f, e in zip(found, exact, strict=True))


def test_cosine_keeps_cl2n_and_a_named_transform_is_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x, _ = World.make(16, latent=6, seed=5).sample(400, seed=6)
    bank = make_bank(tmp_path / "bank", x)
    assert main(["index", "build", "--bank", str(bank)]) == 0
    assert "metric cosine, transform cl2n (the default for metric cosine)" in \
        capsys.readouterr().out
    assert main(["index", "build", "--bank", str(bank), "--metric", "l2"]) == 0
    assert "transform none (the default for metric l2)" in capsys.readouterr().out
    assert main(["index", "build", "--bank", str(bank), "--metric", "l2", "--transform",
                 "cl2n"]) == 0
    assert "metric l2, transform cl2n (as given)" in capsys.readouterr().out
    assert main(["index", "build", "--bank", str(bank), "--metric", "cosine"]) == 0
    assert "metric cosine, transform cl2n (as given)" in capsys.readouterr().out
    assert live_manifest(bank)["index_params"]["transform"] == "cl2n"
    assert main(["index", "build", "--bank", str(bank), "--metric", "ip", "--transform",
                 "auto"]) == 0
    assert "metric ip, transform none (the default for metric ip)" in capsys.readouterr().out
    assert main(["store", "info", "--bank", str(bank), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["index"]
    assert info["transform"]["spec"] == "none" and info["metric"] == "ip"
    assert main(["store", "info", "--bank", str(bank)]) == 0
    assert "metric ip, transform none" in capsys.readouterr().out
    assert main(["index", "build", "--bank", str(bank), "--transform", "cl3n"]) == 2
    assert "unknown transform 'cl3n'" in capsys.readouterr().err
