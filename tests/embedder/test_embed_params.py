"""EmbedParams: one type for the embed options, kept in the bank's job record, overridden by
name; the job that uses them opens the bank's store once."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurebank import store as store_mod
from featurebank.cli import build_parser
from featurebank.cli.embed import embed_overrides
from featurebank.core.bank import Bank
from featurebank.core.errors import InvalidInput, SpecMismatch
from featurebank.core.params import EmbedParams
from featurebank.embedder import job_report

ROOT = Path(__file__).resolve().parents[2]
DIGITS_MODEL = ROOT / "featurebank" / "embedder" / "models" / "digits_cnn.keras"


def write_images(root: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 255, (28, 28, 3), np.uint8)
            Image.fromarray(pixels).save(root / c / f"{seed}-{i}.png")
    return root


def test_override_keeps_what_is_not_named_and_refuses_unknown_names() -> None:
    base = EmbedParams(backbone="MobileNetV2", image_size=32, thumbnails=True)
    assert base.image_size == (32, 32)
    changed = base.override(backbone=None, resize="pad", layer="", image_size=None)
    assert changed == dataclasses.replace(base, resize="pad")
    with pytest.raises(InvalidInput, match="unknown embed option.*colour"):
        base.override(colour="red")
    with pytest.raises(InvalidInput, match="resize must be one of"):
        base.override(resize="squash")
    with pytest.raises(InvalidInput, match="image size must be positive"):
        EmbedParams(image_size=0)


def test_params_round_trip_through_the_job_record(tmp_path: Path) -> None:
    bank = Bank(tmp_path / "bank")
    assert job_report.recorded(bank) == EmbedParams()  # no job ran yet: the defaults
    params = EmbedParams(backbone="ResNet50", image_size=(48, 40), dtype="float32",
                         labels="none", max_pixels=1000, follow_links=True)  # fmt: skip
    job_report.remember(bank, params)
    assert job_report.recorded(bank) == params
    record = json.loads((bank.jobs_dir / "embed.json").read_text())
    record["embed_params"]["pooling"] = "median"
    (bank.jobs_dir / "embed.json").write_text(json.dumps(record))
    with pytest.raises(InvalidInput, match=r"embed\.json: damaged embed_params: pooling"):
        job_report.recorded(bank)


def test_cli_flags_are_the_params_fields_and_left_out_ones_keep() -> None:
    args = build_parser().parse_args(["embed", "src", "--bank", "b", "--backbone", "X"])
    named = embed_overrides(args)
    assert set(named) == {f.name for f in dataclasses.fields(EmbedParams)}
    assert named == {f.name: None for f in dataclasses.fields(EmbedParams)} | {"backbone": "X"}
    args = build_parser().parse_args(
        ["embed", "src", "--bank", "b", "--backbone", "X", "--preprocess", "torch",
         "--image-size", "40", "--no-thumbnails", "--follow-links", "--max-pixels", "9"]
    )  # fmt: skip
    assert EmbedParams().override(**embed_overrides(args)) == EmbedParams(
        backbone="X", preprocessing="torch", image_size=(40, 40), thumbnails=False,
        follow_links=True, max_pixels=9,
    )  # fmt: skip


def test_a_later_job_keeps_the_recorded_options_and_opens_the_store_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from featurebank.embedder.pipeline import embed

    opened: list[Path] = []
    real_init = store_mod.Store.__init__

    def counted(self: store_mod.Store, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        opened.append(self.path)

    monkeypatch.setattr(store_mod.Store, "__init__", counted)
    src, bank = write_images(tmp_path / "src", 2, 0), tmp_path / "bank"
    first = embed(str(src), str(bank), str(DIGITS_MODEL), thumbnails=True, dtype="float32",
                  progress=False)  # fmt: skip
    assert first["embedded"] == 4 and len(opened) == 1
    recorded = job_report.recorded(Bank(bank))
    assert recorded.thumbnails and recorded.dtype == "float32"
    assert recorded.backbone == str(DIGITS_MODEL)

    write_images(src, 1, 1)
    opened.clear()
    again = embed(str(src), str(bank), progress=False)  # backbone, dtype and thumbnails kept
    assert again["embedded"] == 2 and again["skipped"] == 4 and len(opened) == 1
    with store_mod.open(bank, readonly=True) as st:
        keys = [f"{c}/1-0.png" for c in ("a", "b")]
        assert all(t is not None for t in st.thumbnails(keys))
        assert st.spec.dtype == "float32"

    opened.clear()
    nothing = embed(str(src), str(bank), progress=False)
    assert nothing["embedded"] == 0 and nothing["skipped"] == 6 and len(opened) == 1
    write_images(src, 1, 2)
    with pytest.raises(SpecMismatch):  # a named option still has to match the bank
        embed(str(src), str(bank), dtype="float16", progress=False)
