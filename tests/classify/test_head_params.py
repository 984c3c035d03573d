"""HeadParams: one type for how a head is trained, persisted, and the base of every retrain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from featurebank import store as store_mod
from featurebank.classify.published_heads import live_manifest
from featurebank.cli import main
from featurebank.core.errors import InvalidInput
from featurebank.core.params import HeadParams
from featurebank.index.build import build_index
from tests.support.specs import make_spec


def test_defaults_validation_and_override() -> None:
    p = HeadParams()
    assert (p.hidden, p.epochs, p.folds, p.stacked, p.denoise) == (0, 100, 5, True, True)
    assert p.override(hidden=None, epochs=7, class_weight="") == HeadParams(epochs=7)
    assert HeadParams.from_manifest({"head_params": p.override(hidden=3).to_dict()}).hidden == 3
    # a manifest from before HeadParams: its separate keys
    old = {"hidden": 16, "dropout": 0.1, "epochs": 40, "learning_rate": 0.03, "seed": 2}
    assert HeadParams.from_manifest(old) == HeadParams(
        hidden=16, dropout=0.1, epochs=40, learning_rate=0.03, seed=2
    )
    assert HeadParams.from_manifest(None) == HeadParams()
    for bad, match in (
        ({"hidden": -1}, "hidden"),
        ({"epochs": 0}, "epochs"),
        ({"folds": 1}, "folds"),
        ({"dropout": 1.0}, "dropout"),
        ({"label_smoothing": -0.1}, "label smoothing"),
        ({"learning_rate": 0}, "learning rate"),
        ({"class_weight": "inverse"}, "class weight"),
    ):
        with pytest.raises(InvalidInput, match=match):
            HeadParams(**bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="unknown head parameter"):
        p.override(layers=3)


def test_head_train_starts_from_the_live_heads_params(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 3
    y = np.repeat(np.arange(3), 12)
    x = (centres[y] + rng.normal(size=(len(y), 8))).astype(np.float32)
    bank = tmp_path / "bank"
    with store_mod.create(bank, make_spec(8)) as st:
        st.put_batch([f"k{i}" for i in range(len(y))], x, [f"c{c}" for c in y], ["train"] * len(y))
    build_index(bank)
    args = ["head", "train", "--bank", str(bank)]
    assert main([*args, "--hidden", "8", "--epochs", "5", "--no-stacked", "--folds", "3"]) == 0
    out = capsys.readouterr().out
    assert "hybrid: a=" in out and "3-fold cv" in out and "knn" in out
    assert main([*args, "--learning-rate", "0.02"]) == 0
    capsys.readouterr()
    m = live_manifest(bank)
    assert m is not None and m["generation"] == 2
    assert m["head_params"] == HeadParams(
        hidden=8, epochs=5, stacked=False, folds=3, learning_rate=0.02
    ).to_dict()
    assert "stacked" not in m["files"]
    assert main([*args, "--stacked", "--json"]) == 0
    m3 = json.loads(capsys.readouterr().out)
    assert m3["head_params"]["stacked"] is True and m3["head_params"]["hidden"] == 8
