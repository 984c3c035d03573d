"""Decoding real image files of every supported kind, and refusing bad ones with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from featurebank.core.errors import InvalidInput
from featurebank.embedder import images
from featurebank.embedder.images import ImageError, decode


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w: int = 64, h: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, 100)], -1).astype(
        np.uint8
    )


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "GIF", "JPEG"])
def test_formats_decode_to_rgb(fmt: str) -> None:
    rgb = gradient()
    out = decode(encode(Image.fromarray(rgb), fmt))
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    tol = {"PNG": 0, "BMP": 0, "GIF": 40, "JPEG": 12}[fmt]
    assert np.abs(out.astype(int) - rgb).mean() <= max(tol, 0.5)


def test_gif_first_frame() -> None:
    red = Image.new("RGB", (20, 10), (255, 0, 0))
    blue = Image.new("RGB", (20, 10), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue])
    out = decode(data)
    assert out[0, 0].tolist() == [255, 0, 0]


def test_modes_become_rgb() -> None:
    gray = Image.fromarray(np.full((8, 8), 77, np.uint8), "L")
    assert decode(encode(gray, "PNG"))[0, 0].tolist() == [77, 77, 77]
    rgba = Image.fromarray(np.dstack([gradient(8, 8), np.full((8, 8), 0, np.uint8)]), "RGBA")
    assert decode(encode(rgba, "PNG")).shape == (8, 8, 3)
    pal = Image.fromarray(gradient(8, 8)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert decode(encode(pal, "PNG")).shape == (8, 8, 3)
    sixteen = Image.fromarray(np.full((8, 8), 65535, np.uint16)).convert("I;16")
    data16 = encode(sixteen, "PNG")
    assert Image.open(io.BytesIO(data16)).mode.startswith("I")
    assert decode(data16)[0, 0].tolist() == [255, 255, 255]  # scaled, not clipped
    half = Image.fromarray(np.full((8, 8), 32896, np.uint16)).convert("I;16")
    assert decode(encode(half, "PNG"))[0, 0].tolist() == [128, 128, 128]
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))
    assert decode(encode(cmyk, "JPEG"))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied() -> None:
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red, right half blue
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[274] = 6  # rotate 90 clockwise to display
    data = encode(Image.fromarray(arr), "JPEG", exif=exif, quality=95)
    out = decode(data)
    assert out.shape == (40, 20, 3)
    assert out[2, 10, 0] > 200 and out[-3, 10, 2] > 200  # red on top, blue at the bottom
    # resized output honours the orientation too (draft decoding must not break it)
    assert decode(data, (16, 8), "stretch").shape == (16, 8, 3)


def test_resize_modes() -> None:
    im = np.zeros((100, 200, 3), np.uint8)
    im[:, 50:150] = 255  # the central square is white
    data = encode(Image.fromarray(im), "PNG")
    crop = decode(data, (32, 32), "crop")
    assert crop.shape == (32, 32, 3) and crop.min() > 200  # only the centre survives
    pad = decode(data, (32, 32), "pad")
    assert pad.shape == (32, 32, 3)
    assert pad[:7].max() == 0 and pad[-7:].max() == 0  # black bars above and below
    stretch = decode(data, (32, 48), "stretch")
    assert stretch.shape == (32, 48, 3)
    assert stretch[:, :10].max() < 30 and stretch[:, 14:34].min() > 200


def test_crop_box_never_leaves_the_image() -> None:
    for w in range(200, 420, 7):  # sizes whose crop box used to round to -1e-14
        for h in (180, 240, 259, 333):
            im = Image.new("RGB", (w, h))
            assert images.resize_image(im, (224, 224), "crop").size == (224, 224)
            assert images.resize_image(im, (97, 131), "crop").size == (131, 97)


def test_large_jpeg_draft_decoding_keeps_the_picture() -> None:
    big = np.kron(gradient(64, 48), np.ones((20, 20, 1), np.uint8))  # 1280x960
    data = encode(Image.fromarray(big), "JPEG", quality=95)
    full = np.asarray(Image.fromarray(big).resize((80, 80), box=(160, 0, 1120, 960)), np.int16)
    out = decode(data, (80, 80), "crop").astype(np.int16)
    assert np.abs(out - full).mean() < 4


def truncated_jpeg() -> bytes:
    data = encode(Image.fromarray(gradient(256, 256)), "JPEG")
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not an image"),
        (None, "truncated"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt PNG: broken PNG file"),
        (encode(Image.fromarray(gradient()), "TIFF"), "unsupported format TIFF"),
    ],
    ids=["zero-bytes", "text", "truncated", "bad-png-header", "tiff"],
)
def test_bad_images_say_why(data: bytes | None, reason: str) -> None:
    with pytest.raises(ImageError) as e:
        decode(truncated_jpeg() if data is None else data, (16, 16))
    assert reason in e.value.reason


def test_corrupt_png_data() -> None:
    noise = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    data = bytearray(encode(Image.fromarray(noise), "PNG"))
    i = data.index(b"IDAT") + 4  # the zlib stream starts here
    data[i : i + 40] = b"\xff" * 40
    with pytest.raises(ImageError) as e:
        decode(bytes(data))
    assert e.value.reason.startswith(("corrupt", "truncated"))


def test_pixel_limit() -> None:
    data = encode(Image.fromarray(gradient(100, 100)), "PNG")
    with pytest.raises(ImageError, match="too large: 100x100"):
        decode(data, max_pixels=9999)
    assert decode(data, max_pixels=10000).shape == (100, 100, 3)


def test_arrays() -> None:
    gray = np.full((5, 6), 0.5, np.float32)
    assert images.array_to_rgb(gray)[0, 0].tolist() == [128, 128, 128]
    assert images.array_to_rgb(gray, "0-255")[0, 0].tolist() == [0, 0, 0]
    assert images.array_to_rgb(np.full((5, 6, 4), 65535, np.uint16))[0, 0].tolist() == [255] * 3
    assert images.prepare_array(gray, (10, 10), "stretch").shape == (10, 10, 3)
    with pytest.raises(InvalidInput):
        images.array_to_rgb(np.zeros((5, 6, 2)))
