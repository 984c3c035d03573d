"""User metadata from `featurebank embed` (manifest columns and --meta), on real digit images,
kept through export/import and backup, and tested by filters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from featurebank import store as store_mod
from featurebank.cli import main
from featurebank.index import filters
from featurebank.store.metadata import user_fields
from tests.cli.test_embed_traps import DIGITS_MODEL

N = 8


def user_meta(bank: Path) -> dict[str, dict[str, object]]:
    with store_mod.open(bank, readonly=True) as st:
        items = st.item_table()
        return {k: user_fields(m) for k, m in zip(items.keys, items.meta, strict=True)}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real 8x8 digits as 28x28 PNGs, listed with a label, two meta.NAME columns and a JSON
    metadata column (one row leaves every metadata cell empty)."""
    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    rows = ["path,label,meta.camera,meta.night,metadata"]
    for i in range(N):
        pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels).resize((28, 28)).save(root / f"{i}.png")
        if i == N - 1:
            rows.append(f"{i}.png,d{digits.target[i]},,,")
        else:
            extra = json.dumps({"site": "lab", "score": i / 2}).replace('"', '""')
            rows.append(f'{i}.png,d{digits.target[i]},{i % 3},{"true" if i % 2 else "false"},"{extra}"')
    path = root / "manifest.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def embedded(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bank = tmp_path_factory.mktemp("bank") / "bank"
    code = main(["embed", str(manifest), "--bank", str(bank), "--backbone", str(DIGITS_MODEL),
                 "--no-progress", "--meta", "batch=3", "--meta", "site=field",
                 "--meta", 'tag="42"'])  # fmt: skip
    assert code == 0
    return bank


def test_manifest_columns_and_meta_options_are_typed_and_stored(embedded: Path) -> None:
    meta = user_meta(embedded)
    assert meta["1.png"] == {"batch": 3, "site": "lab", "tag": "42", "camera": 1, "night": True,
                             "score": 0.5}  # fmt: skip
    assert meta["0.png"]["night"] is False and meta["0.png"]["score"] == 0
    assert meta[f"{N - 1}.png"] == {"batch": 3, "site": "field", "tag": "42"}  # --meta alone
    with store_mod.open(embedded, readonly=True) as st:
        table = filters.Table.of_store(st)
        assert st.item_table().meta[0]["sha256"]  # the store's own source fields are kept
    keys = dict(zip(table.ids.tolist(), table.column("key"), strict=True))
    chosen = table.matching(filters.parse('meta.camera == 1 and meta.night == true and meta.tag == "42"'))
    assert [keys[i] for i in chosen.tolist()] == ["1.png"]


def test_metadata_survives_export_import_and_backup(embedded: Path, tmp_path: Path) -> None:
    before = user_meta(embedded)
    out = tmp_path / "out"
    assert main(["store", "export", "--bank", str(embedded), "--out", str(out)]) == 0
    assert len((out / "metadata.jsonl").read_text().splitlines()) == N
    copy = tmp_path / "copy"
    assert main(["store", "import", "--bank", str(copy), "--vectors", str(out / "vectors.npy"),
                 "--keys", str(out / "keys.txt"), "--labels", str(out / "labels.csv"),
                 "--metadata", str(out / "metadata.jsonl")]) == 0  # fmt: skip
    assert user_meta(copy) == before
    assert main(["store", "backup", "--bank", str(embedded), "--out", str(tmp_path / "bk")]) == 0
    assert user_meta(tmp_path / "bk") == before


@pytest.mark.parametrize(
    ("cells", "meta", "message"),
    [
        ("camera", ["--meta", "nokey"], "--meta 'nokey': expected KEY=VALUE"),
        ("camera", ["--meta", "added=1"], "--meta: metadata field 'added'"),
        ("metadata", [], "line 2: the metadata column is not JSON"),
    ],
)
def test_bad_metadata_is_one_line_naming_where(
    tmp_path: Path, cells: str, meta: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "a.png")
    value = "{not json" if cells == "metadata" else "4"
    (tmp_path / "m.csv").write_text(f"path,{'metadata' if cells == 'metadata' else 'meta.camera'}\n"
                                    f"a.png,{value}\n")
    code = main(["embed", str(tmp_path / "m.csv"), "--bank", str(tmp_path / "b"), "--backbone",
                 str(DIGITS_MODEL), "--no-progress", *meta])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "b").exists()
