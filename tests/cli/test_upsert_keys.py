"""`featurebank upsert` keys items as `featurebank embed` does: relative to the folder given."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from featurebank.cli import main
from featurebank.embedder.sources import open_source
from featurebank.server.app import ServeConfig
from tests.support.server import RunningServer, color_images, free_port, make_image_bank


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    bank, _ = make_image_bank(tmp_path_factory.mktemp("upsert") / "bank")
    with RunningServer(ServeConfig(bank=bank, port=free_port())) as rs:
        yield rs


def write_folder(root: Path, seed: int) -> Path:
    for i, (color, image) in enumerate(color_images(1, seed=seed)):
        (root / color).mkdir(parents=True, exist_ok=True)
        (root / color / f"{i}.png").write_bytes(image)
    return root


def stored(
    served: RunningServer, keys: list[str], capsys: pytest.CaptureFixture[str]
) -> list[str]:
    """Those of `keys` the bank holds, as `featurebank items` lists them."""
    capsys.readouterr()
    assert main(["items", "--bank", str(served.server.config.bank), "--keys-only"]) == 0
    found = set(capsys.readouterr().out.splitlines())
    return [k for k in keys if k in found]


def test_upsert_keys_match_embed_keys(
    served: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_folder(tmp_path / "newtex", seed=40)
    embed_keys = sorted(r.key for r in open_source(str(folder)).records)
    assert embed_keys == ["blue/2.png", "green/1.png", "red/0.png"]
    assert main(["upsert", str(folder), "--folder-labels", "--server", served.target]) == 0
    assert "3 added" in capsys.readouterr().out
    assert stored(served, embed_keys, capsys) == embed_keys

    assert main(["upsert", str(folder), "--key-prefix", "batch2/", "--server", served.target]) == 0
    prefixed = [f"batch2/{k}" for k in embed_keys]
    assert stored(served, prefixed, capsys) == prefixed
    assert main(["upsert", str(folder / "red" / "0.png"), "--key-prefix", "one/",
                 "--server", served.target]) == 0  # fmt: skip
    assert stored(served, ["one/0.png"], capsys) == ["one/0.png"]


def test_two_folders_giving_one_key_are_refused(
    served: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = write_folder(tmp_path / "a", seed=41), write_folder(tmp_path / "b", seed=42)
    assert main(["upsert", str(a), str(b), "--server", served.target]) == 2
    err = capsys.readouterr().err
    assert "key 'blue/2.png' would be given to" in err and "--key-prefix" in err


def test_upsert_from_a_manifest_with_explicit_keys(
    served: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_folder(tmp_path / "imgs", seed=43)
    (tmp_path / "list.csv").write_text(
        "\ufeffpath,label,split,key\nimgs/red/0.png,red,val,photo-17\nimgs/blue/2.png,,,photo-18\n"
    )
    assert main(["upsert", "--manifest", str(tmp_path / "list.csv"), "--server", served.target]) == 0
    assert "upserted 2 images: 2 added" in capsys.readouterr().out
    assert stored(served, ["photo-17", "photo-18"], capsys) == ["photo-17", "photo-18"]
    assert main(["items", "--bank", str(served.server.config.bank), "--format", "csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert "photo-17,red,val" in rows and "photo-18,,none" in rows
    assert main(["upsert", str(folder), "--manifest", str(tmp_path / "list.csv"),
                 "--server", served.target]) == 2  # fmt: skip
    assert "not both" in capsys.readouterr().err


def test_upsert_with_thumbnails_shows_on_the_page(
    served: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`upsert --thumbnails` keeps a JPEG per image, as `embed --thumbnails` does."""
    from featurebank.server.client import FeatureBankClient

    folder = write_folder(tmp_path / "thumbs", seed=43)
    assert main(["upsert", str(folder), "--key-prefix", "t/", "--server", served.target,
                 "--thumbnails"]) == 0  # fmt: skip
    assert main(["upsert", str(folder), "--key-prefix", "plain/", "--server", served.target]) == 0
    with FeatureBankClient(served.target) as client:
        thumbs = client.thumbnails(["t/red/0.png", "t/blue/2.png", "plain/red/0.png"])
    assert sorted(thumbs) == ["t/blue/2.png", "t/red/0.png"]  # only those asked for
    assert all(t[:3] == b"\xff\xd8\xff" for t in thumbs.values())  # JPEG
