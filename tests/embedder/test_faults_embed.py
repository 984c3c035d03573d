"""Folders an embed job should survive: odd file names, FIFOs, symlink loops, hostile PNGs.

The listing and reading tests need no model; the job tests embed a real folder tree with
a real (untrained) backbone, and one runs the `featurebank embed` command itself.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurebank import store as store_mod
from featurebank.core.errors import InvalidInput
from featurebank.embedder import folders, images, sources

ROOT = Path(__file__).resolve().parents[2]
ODD = os.fsdecode(b"caf\xe9-\xff.png")  # Latin-1 and a byte that is never UTF-8
ODD_KEY = "cats/caf\\xe9-\\xff.png"


def png(seed: int, size: int = 24) -> bytes:
    px = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="PNG")
    return buf.getvalue()


def hostile_tree(root: Path) -> Path:
    """cats/ and dogs/ with two images each, plus everything that used to break a job."""
    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True)
        for i in range(2):
            (root / label / f"{i}.png").write_bytes(png(hash((label, i)) % 1000))
    (root / "cats" / ODD).write_bytes(png(7))  # not valid UTF-8
    os.mkfifo(root / "dogs" / "pipe.png")  # would block a reader forever
    os.symlink(".", root / "loop")  # `ln -s . loop`: every image again, endlessly
    os.symlink("..", root / "cats" / "up")  # back to the top
    outside = root.parent / f"{root.name}-outside"
    outside.mkdir()
    (outside / "x.png").write_bytes(png(9))
    os.symlink(outside, root / "elsewhere")  # a folder outside the tree
    return root


def test_listing_keys_every_image_once_and_says_what_it_left_out(tmp_path: Path) -> None:
    tree = hostile_tree(tmp_path / "src")
    listing = folders.list_images(tree, sources.IMAGE_EXTS)
    keys = [k for k, _ in listing.files]
    assert keys == sorted(["cats/0.png", "cats/1.png", ODD_KEY, "dogs/0.png", "dogs/1.png",
                           "dogs/pipe.png"])  # fmt: skip
    assert all(k.encode("utf-8") for k in keys)
    skipped = " | ".join(listing.skipped)
    assert "loop/ (directory symlink to . not followed" in skipped
    assert "cats/up/" in skipped and "elsewhere/" in skipped
    followed = folders.list_images(tree, sources.IMAGE_EXTS, follow_links=True)
    assert [k for k, _ in followed.files] == sorted([*keys, "elsewhere/x.png"])
    assert len(followed.skipped) == 2  # loop and up lead to the top, already walked
    assert all("already walked (a loop)" in s for s in followed.skipped)


def test_odd_key_is_stable_and_reads_the_real_file(tmp_path: Path) -> None:
    tree = hostile_tree(tmp_path / "src")
    src = sources.open_source(tree)
    rec = next(r for r in src.records if r.key == ODD_KEY)
    assert rec.label == "cats" and os.path.exists(rec.path or "")
    pixels, meta = src.load(rec, (16, 16), "crop")
    assert pixels.shape == (16, 16, 3) and "\\xe9" in meta["uri"]
    json.dumps(meta).encode("utf-8")  # storable
    assert sources.open_source(tree).records == src.records


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_reading_a_non_regular_file_fails_at_once(tmp_path: Path, kind: str) -> None:
    if kind == "fifo":
        path = tmp_path / "pipe.png"
        os.mkfifo(path)
    elif kind == "device":
        path = Path("/dev/zero")  # endless: reading it would never finish
    else:
        path = tmp_path / "folder.png"
        path.mkdir()
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,label\n{path},x\n")
    src = sources.open_source(manifest)
    result: list[BaseException] = []

    def load() -> None:
        try:
            src.load(src.records[0], (16, 16), "crop")
        except BaseException as e:  # noqa: BLE001 - checked below
            result.append(e)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "reading blocked"
    assert isinstance(result[0], images.ImageError)
    want = {"fifo": "a FIFO", "device": "a device", "folder": "a folder"}[kind]
    assert result[0].reason == f"not a regular file ({want})"


def test_a_file_over_the_read_bound_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(png(1) + b"\0" * 5000)
    with pytest.raises(folders.FileTooLarge, match="the limit is 4096"):
        folders.read_regular_file(str(big), 4096)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_hostile_pngs_get_their_real_reason() -> None:
    good = png(3)
    bomb = good[:33] + _chunk(b"zTXt", b"k\0\0" + zlib.compress(b"\0" * (64 << 20), 9)) + good[33:]
    assert len(bomb) < 100_000  # small on disk, 64 MiB inflated
    bad_crc = bytearray(good)
    bad_crc[29] ^= 0xFF  # the IHDR checksum
    cases = {
        bomb: "corrupt PNG: a compressed text chunk inflates past 1048576 bytes (decompression bomb)",
        bytes(bad_crc): "corrupt PNG: broken PNG file (bad header checksum in b'IHDR')",
        good[:20]: "corrupt PNG: ",
        b"GIF89a" + b"\0" * 4: "corrupt GIF: ",
        b"\xff\xd8\xff" + b"\0" * 10: "corrupt JPEG: ",
        b"plain text": "not an image (unrecognised format)",
    }
    for data, reason in cases.items():
        with pytest.raises(images.ImageError) as e:
            images.decode(data, (16, 16))
        assert e.value.reason.startswith(reason), (reason, e.value.reason)


def _embed(src: Path, bank: Path, **kw: object) -> dict:
    from featurebank.embedder.pipeline import embed

    return embed(str(src), str(bank), "MobileNetV2", weights="none", image_size=32,
                 batch_size=4, progress=False, **kw)  # type: ignore[arg-type]  # fmt: skip


def test_embed_job_survives_the_hostile_tree(tmp_path: Path) -> None:
    tree = hostile_tree(tmp_path / "src")
    bank = tmp_path / "bank"
    s = _embed(tree, bank)
    assert (s["embedded"], s["failed"], s["total"]) == (5, 1, 6)
    assert s["errors"] == [{"key": "dogs/pipe.png", "reason": "not a regular file (a FIFO)"}]
    assert len(s["skipped_folders"]) == 3
    with store_mod.open(bank, readonly=True) as st:
        assert st.count == 5 and st.has(ODD_KEY)
    # An existing bank: a new odd file and a rerun; what is stored is skipped.
    (tree / "dogs" / os.fsdecode(b"\x80.png")).write_bytes(png(11))
    again = _embed(tree, bank, follow_links=True)
    assert (again["embedded"], again["skipped"]) == (2, 5)  # the new file and elsewhere/x.png
    with store_mod.open(bank, readonly=True) as st:
        assert st.count == 7 and st.has("dogs/\\x80.png") and st.has("elsewhere/x.png")


@pytest.mark.slow
def test_embed_command_over_the_hostile_tree(tmp_path: Path) -> None:
    tree = hostile_tree(tmp_path / "src")
    bank = tmp_path / "bank"
    cmd = [sys.executable, "-m", "featurebank", "embed", str(tree), "--bank", str(bank),
           "--backbone", "MobileNetV2", "--weights", "none", "--image-size", "32",
           "--no-progress"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "embedded 5, skipped 0 (already in the bank), failed 1 of 6 inputs" in r.stdout
    assert "left out: loop/ (directory symlink to . not followed" in r.stdout
    assert "failed: dogs/pipe.png: not a regular file (a FIFO)" in r.stdout


def test_upsert_command_over_the_hostile_tree(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from featurebank.cli import main
    from featurebank.server.app import ServeConfig
    from tests.support.server import RunningServer, free_port, make_image_bank

    bank, _ = make_image_bank(tmp_path / "bank", n_per_color=2)
    tree = hostile_tree(tmp_path / "src")
    with RunningServer(ServeConfig(bank=bank, port=free_port())) as rs:
        argv = ["upsert", str(tree), "--folder-labels", "--server", rs.target]
        assert main(argv) == 2  # refused before anything is sent
        assert "dogs/pipe.png is not a regular file" in capsys.readouterr().err
        with store_mod.open(bank, readonly=True) as st:
            before = st.count
        (tree / "dogs" / "pipe.png").unlink()
        assert main(argv) == 0
        out, err = capsys.readouterr()
        assert "upserted 5 images: 5 added" in out
        assert "left out" in err and "loop/" in err
        with store_mod.open(bank, readonly=True) as st:
            assert st.count == before + 5
            assert st.has(ODD_KEY)  # relative to the folder given, as embed keys it


def test_a_manifest_that_is_not_utf8_names_its_line(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"path,label\na.png,cat\ncaf\xe9.png,dog\n")
    with pytest.raises(InvalidInput, match=r"m.csv line 3: not valid UTF-8"):
        sources.open_source(manifest)
