"""A digits image bank for the quality pass: real PNG/JPEG files embedded by the real CLI
with the shipped digits CNN, thumbnails kept, with planted copies, leaks, face crops and
flipped labels."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from featurebank.cli import main

ROOT = Path(__file__).resolve().parents[2]
DIGITS_MODEL = ROOT / "featurebank" / "embedder" / "models" / "digits_cnn.keras"
PER_CLASS = 25
FLIPS = {3: "8", 41: "7", 77: "1", 130: "5", 171: "2", 205: "0"}  # row -> wrong label
EXACT, REENCODED, RESIZED, CROPPED = (0, 11, 22), (33, 44, 55), (66, 88, 99), (110, 121, 132)
FACES = 6


def render(img8: np.ndarray) -> Image.Image:
    """An 8x8 digit (0-16) as a 28x28 RGB image in MNIST's layout (digit in the middle 20)."""
    big = Image.fromarray((img8 * (255.0 / 16.0)).astype(np.uint8)).resize(
        (20, 20), Image.Resampling.BILINEAR
    )
    frame = np.zeros((28, 28), np.uint8)
    frame[4:24, 4:24] = np.asarray(big)
    return Image.fromarray(frame).convert("RGB")


def cropped(im: Image.Image) -> Image.Image:
    """The copy a user makes by trimming a pixel off each side and saving it at the size."""
    return im.crop((1, 1, 27, 27)).resize((28, 28), Image.Resampling.BILINEAR)


def digits_bank(tmp: Path) -> tuple[Path, dict[str, str], Path]:
    """(bank, copy path -> original path, image folder): 25 digits a class as PNG files,
    FLIPS relabelled; byte-identical, re-encoded, resized and cropped copies, every other
    one in test (a leak); FACES unlabelled face crops. Embedded with `--thumbnails`."""
    from skimage.data import lfw_subset
    from sklearn.datasets import load_digits

    d = load_digits()
    rows = np.concatenate([np.flatnonzero(d.target == c)[:PER_CLASS] for c in range(10)])
    img_dir = tmp / "images"
    img_dir.mkdir()
    manifest = ["path,label,split"]
    for r, i in enumerate(rows.tolist()):
        name = f"d{r:03d}.png"
        render(d.images[i]).save(img_dir / name)
        manifest.append(f"images/{name},{FLIPS.get(r, str(d.target[i]))},train")
    copies: dict[str, str] = {}
    for r in EXACT:
        shutil.copyfile(img_dir / f"d{r:03d}.png", img_dir / f"exact{r:03d}.png")
        copies[f"images/exact{r:03d}.png"] = f"images/d{r:03d}.png"
    for r in REENCODED:
        render(d.images[rows[r]]).save(img_dir / f"jpeg{r:03d}.jpg", quality=95)
        copies[f"images/jpeg{r:03d}.jpg"] = f"images/d{r:03d}.png"
    for r in RESIZED:
        render(d.images[rows[r]]).resize((56, 56), Image.Resampling.BICUBIC).save(
            img_dir / f"big{r:03d}.png"
        )
        copies[f"images/big{r:03d}.png"] = f"images/d{r:03d}.png"
    for r in CROPPED:
        cropped(render(d.images[rows[r]])).save(img_dir / f"crop{r:03d}.png")
        copies[f"images/crop{r:03d}.png"] = f"images/d{r:03d}.png"
    for j, copy in enumerate(copies):  # every other copy lands in test: a leak
        manifest.append(f"{copy},,{'test' if j % 2 == 0 else 'none'}")
    faces = lfw_subset()[:FACES]
    for j, face in enumerate(faces):
        Image.fromarray((face * 255).astype(np.uint8)).resize((28, 28)).convert("RGB").save(
            img_dir / f"face{j}.png"
        )
        manifest.append(f"images/face{j}.png,,none")
    (tmp / "manifest.csv").write_text("\n".join(manifest) + "\n")
    bank = tmp / "bank"
    code = main([
        "embed", str(tmp / "manifest.csv"), "--bank", str(bank), "--backbone",
        str(DIGITS_MODEL), "--layer", "features", "--resize", "stretch", "--thumbnails",
        "--no-progress",
    ])  # fmt: skip
    assert code == 0
    assert main(["index", "build", "--bank", str(bank), "--factory", "Flat"]) == 0
    return bank, copies, img_dir
