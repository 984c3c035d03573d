"""Image bytes -> RGB pixels at the model's input size, with a clear reason when that fails.

Decoding uses Pillow: it handles 16-bit PNGs, palettes, GIF frames and EXIF orientation,
releases the GIL while decoding and resizing (so a thread pool scales), and can decode
large JPEGs at 1/2, 1/4 or 1/8 scale directly when the target is much smaller.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable

import numpy as np
from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
)

from featurebank.core.errors import InvalidInput
from featurebank.core.params import EmbedParams
from featurebank.core.vocabulary import RESIZE_MODES, check_choice

SUPPORTED_FORMATS = {"JPEG", "MPO", "PNG", "GIF", "BMP"}
DEFAULT_MAX_PIXELS = EmbedParams.max_pixels  # the default lives with the other embed options

# Orientations (EXIF tag 274) that swap width and height.
_TRANSPOSED = {5, 6, 7, 8}


class ImageError(InvalidInput):
    """An input that is not a usable image; `reason` is short and says which kind."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode(
    data: bytes,
    size: tuple[int, int] | None = None,
    resize: str = "crop",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode to uint8 RGB (h, w, 3); resized to `size` = (height, width) when given."""
    check_choice(resize, RESIZE_MODES, "resize")
    if len(data) == 0:
        raise ImageError("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError(f"too large: {e}") from e
    except Exception as e:  # UnidentifiedImageError and friends
        raise ImageError(_open_failure(data, e)) from e
    fmt = im.format or "unknown"
    if fmt not in SUPPORTED_FORMATS:
        raise ImageError(f"unsupported format {fmt} (supported: JPEG, PNG, GIF, BMP)")
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError(f"corrupt: image size {w}x{h}")
    if w * h > max_pixels:
        raise ImageError(f"too large: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    jpeg = fmt in ("JPEG", "MPO")
    # A JPEG's EXIF is in its header; other formats may keep it after the pixels, and
    # reading it would load (and hide errors of) the pixel data, so they load first.
    orientation = _orientation(im) if jpeg else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if size is not None and jpeg:
                im.draft("RGB", _draft_request(w, h, size, resize, orientation in _TRANSPOSED))
            im.load()
    except Exception as e:
        msg = str(e) or type(e).__name__
        if "truncat" in msg.lower() or isinstance(e, EOFError):
            raise ImageError(f"truncated: {msg}") from e
        raise ImageError(f"corrupt: {msg}") from e
    if not jpeg:
        orientation = _orientation(im)
    out: Image.Image = im
    if orientation not in (None, 1):
        out = ImageOps.exif_transpose(out)
    out = to_rgb(out)
    if size is not None:
        out = resize_image(out, size, resize)
    return np.asarray(out, dtype=np.uint8)


def _open_failure(data: bytes, error: Exception) -> str:
    """Why Pillow could not open `data`.

    Pillow tries every format and, when none accepts the file, reports only "cannot
    identify image file"; a file that starts like one of the supported formats is
    opened again by that format alone, which says what is wrong with it (a bad
    checksum, a text chunk that inflates past Pillow's limit, a truncated header).
    """
    for signature, (fmt, opener) in _SIGNATURES.items():
        if data.startswith(signature):
            try:
                opener(io.BytesIO(data))
            except Exception as e:  # noqa: BLE001 - the reason is the point
                reason = str(e) or type(e).__name__
            else:
                reason = str(error) or type(error).__name__
            if "decompressed data too large" in reason.lower():
                return (
                    f"corrupt {fmt}: a compressed text chunk inflates past "
                    f"{PngImagePlugin.MAX_TEXT_CHUNK} bytes (decompression bomb)"
                )
            return f"corrupt {fmt}: {reason}"
    return "not an image (unrecognised format)"


_SIGNATURES: dict[bytes, tuple[str, Callable[[io.BytesIO], object]]] = {
    b"\x89PNG\r\n\x1a\n": ("PNG", PngImagePlugin.PngImageFile),
    b"\xff\xd8\xff": ("JPEG", JpegImagePlugin.JpegImageFile),
    b"GIF87a": ("GIF", GifImagePlugin.GifImageFile),
    b"GIF89a": ("GIF", GifImagePlugin.GifImageFile),
    b"BM": ("BMP", BmpImagePlugin.BmpImageFile),
}


def _orientation(im: Image.Image) -> int | None:
    try:
        value = im.getexif().get(274)
        return int(value) if value is not None else None
    except Exception:  # a broken EXIF block should not lose the image
        return None


def _draft_request(
    w: int, h: int, size: tuple[int, int], resize: str, transposed: bool
) -> tuple[int, int]:
    """Smallest decoded (w, h) that still gives full detail after resizing to `size`."""
    th, tw = size
    ow, oh = (h, w) if transposed else (w, h)  # as displayed
    if resize == "stretch":
        need_w, need_h = tw, th
    else:
        f = max(th / oh, tw / ow) if resize == "crop" else min(th / oh, tw / ow)
        need_w, need_h = math.ceil(ow * f), math.ceil(oh * f)
    return (need_h, need_w) if transposed else (need_w, need_h)


def to_rgb(im: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA, CMYK and 16-bit images as 8-bit RGB (alpha dropped)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        scale = 257.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 1.0
        a8 = np.clip(np.rint(a / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a8 = np.clip(np.rint(a * (255.0 if a.max(initial=0) <= 1.0 else 1.0)), 0, 255)
        return Image.fromarray(a8.astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode == "LA":
        im = im.convert("RGBA")
    return im.convert("RGB")


def resize_image(im: Image.Image, size: tuple[int, int], resize: str = "crop") -> Image.Image:
    """Resize to (height, width): crop = shorter side then centre crop, pad = fit + black
    borders, stretch = ignore aspect ratio."""
    th, tw = size
    w, h = im.size
    if (w, h) == (tw, th):
        return im
    if resize == "stretch":
        return im.resize((tw, th), Image.Resampling.BILINEAR)
    if resize == "crop":
        # The centred region with the target's aspect ratio, resized in one step.
        f = max(th / h, tw / w)
        cw, ch = min(w, tw / f), min(h, th / f)  # min(): float round-off
        left, top = max(0.0, (w - cw) / 2), max(0.0, (h - ch) / 2)
        box = (left, top, min(w, left + cw), min(h, top + ch))
        return im.resize((tw, th), Image.Resampling.BILINEAR, box=box)
    if resize == "pad":
        f = min(th / h, tw / w)
        nw, nh = max(1, round(w * f)), max(1, round(h * f))
        inner = im.resize((nw, nh), Image.Resampling.BILINEAR)
        canvas = Image.new("RGB", (tw, th))
        canvas.paste(inner, ((tw - nw) // 2, (th - nh) // 2))
        return canvas
    raise InvalidInput(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")


def array_to_rgb(pixels: np.ndarray, float_range: str = "auto") -> np.ndarray:
    """One image array (h, w[, 1|3|4]) of uint8/uint16/float as uint8 RGB.

    float_range "0-1" or "0-255"; "auto" takes floats as 0-1 when their maximum is at
    most 1 (sources decide once for the whole array instead, see `sources`).
    """
    a = np.asarray(pixels)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise InvalidInput(f"image array must be (H, W), (H, W, 1|3|4), got shape {a.shape}")
    if a.dtype == np.uint8:
        a8 = a
    elif a.dtype == np.uint16:
        a8 = np.rint(a / 257.0).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer):
        af = a.astype(np.float32)
        if not np.isfinite(af).all():
            raise InvalidInput("image array contains NaN or infinity")
        if np.issubdtype(a.dtype, np.floating) and (
            float_range == "0-1" or (float_range == "auto" and af.max(initial=0) <= 1.0)
        ):
            af = af * 255.0
        a8 = np.clip(np.rint(af), 0, 255).astype(np.uint8)
    else:
        raise InvalidInput(f"unsupported image array dtype {a.dtype}")
    if a8.shape[-1] == 1:
        a8 = np.repeat(a8, 3, axis=-1)
    elif a8.shape[-1] == 4:
        a8 = a8[..., :3]
    return np.ascontiguousarray(a8)


def prepare_array(
    pixels: np.ndarray,
    size: tuple[int, int] | None,
    resize: str = "crop",
    float_range: str = "auto",
) -> np.ndarray:
    """An in-memory image as uint8 RGB at `size`, resized exactly like decoded files."""
    rgb = array_to_rgb(pixels, float_range)
    if size is None or rgb.shape[:2] == tuple(size):
        return rgb
    return np.asarray(resize_image(Image.fromarray(rgb, "RGB"), size, resize), dtype=np.uint8)


THUMBNAIL_SIZE = 96


def thumbnail_jpeg(pixels: np.ndarray, size: int = THUMBNAIL_SIZE, quality: int = 85) -> bytes:
    """A small JPEG (longest side at most `size`) of uint8 RGB pixels, for pages that show items."""
    im = Image.fromarray(np.asarray(pixels, dtype=np.uint8), "RGB")
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    """An in-memory image (see `array_to_rgb`) as a PNG file: lossless, so whoever decodes it
    (a server) gets exactly these pixels and embeds them as the bank in process would."""
    buf = io.BytesIO()
    Image.fromarray(array_to_rgb(pixels), "RGB").save(buf, format="PNG")
    return buf.getvalue()
