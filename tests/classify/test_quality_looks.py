"""Thumbnails decide near copies the features leave out: a crop or resize of a picture
matches it, another picture does not, and the cut is calibrated on the candidates."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from featurebank import store as store_mod
from featurebank.classify.quality import looks
from featurebank.embedder.images import thumbnail_jpeg
from tests.support.specs import make_spec


def picture(seed: int, side: int = 120) -> np.ndarray:
    """A smooth random RGB picture: coarse noise scaled up, like a blurred photo."""
    coarse = np.random.default_rng(seed).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC))


def edited(pixels: np.ndarray, trim: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """`pixels` trimmed by `trim` of each side, then saved at `scale` times the size."""
    im = Image.fromarray(pixels)
    w, h = im.size
    im = im.crop((round(trim * w), round(trim * h), w - round(trim * w), h - round(trim * h)))
    return np.asarray(im.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR))


def signature(pixels: np.ndarray) -> np.ndarray:
    frame = looks.frame(thumbnail_jpeg(pixels))
    assert frame is not None and frame.shape == (looks.FRAME, looks.FRAME)
    return looks.signatures(frame[None])[0]


def test_crops_and_resizes_match_their_picture_and_others_do_not() -> None:
    original = signature(picture(1))
    for trim, scale in ((0.02, 1.0), (0.04, 1.0), (0.0, 0.5), (0.0, 2.0), (0.03, 0.7)):
        assert looks.match(original, signature(edited(picture(1), trim, scale))) >= looks.MIN_MATCH
    others = [looks.match(original, signature(picture(seed))) for seed in range(2, 12)]
    assert max(others) < 0.9
    assert abs(looks.match(original, original) - 1) < 1e-5


def test_a_flat_or_undecodable_thumbnail_matches_nothing() -> None:
    assert looks.frame(b"\xff\xd8\xffnot really a jpeg") is None
    flat = looks.signatures(np.full((1, looks.FRAME, looks.FRAME), 128, np.uint8))[0]
    assert not flat.any()  # no pattern to match: correlation 0 with anything
    assert looks.match(flat, signature(picture(3))) == 0.0


def test_the_cut_is_calibrated_on_the_candidates() -> None:
    rng = np.random.default_rng(0)
    typical = 1 - np.exp(rng.normal(np.log(0.2), 0.3, 200))  # different pictures
    copies = np.array([0.9995, 0.9991, 0.998])
    found = looks.copies(np.concatenate([typical, copies, [np.nan]]))
    assert found[-4:-1].all() and not found[:200].any() and not found[-1]
    # where near neighbours all look much alike, only outliers of that spread are copies
    alike = 1 - np.exp(rng.normal(np.log(0.006), 0.3, 200))
    assert looks.copies(np.concatenate([alike, [0.9991]]))[-1]
    assert looks.copies(np.concatenate([alike, [0.9991]]))[:200].sum() <= 2
    # too few candidates to calibrate on: MIN_MATCH alone
    assert looks.copies(np.array([0.995, 0.98])).tolist() == [True, False]


def test_matches_are_kept_by_id_and_forgotten_with_their_pairs(tmp_path: Path) -> None:
    pictures = [picture(1), edited(picture(1), 0.03), picture(2), picture(4)]
    keys = ["a", "a-crop", "b", "no-thumbnail"]
    thumbs = [thumbnail_jpeg(p) for p in pictures[:3]] + [None]
    with store_mod.create(tmp_path / "bank", make_spec(4)) as st:
        st.put_batch(keys, np.eye(4, dtype=np.float32), thumbnails=thumbs)
        ids = np.asarray(st.ids_of(keys), np.int64)
        seen = looks.Looks()
        m = seen.matches(st, ids, keys, [(0, 1), (0, 2), (2, 3)])
        assert m[0] >= looks.MIN_MATCH and m[1] < 0.9 and np.isnan(m[2])
        st.delete(["a-crop"])  # a kept match is never read again: the item may be gone
        again = seen.matches(st, ids, keys, [(0, 1)])
        assert again.tolist() == m[:1].tolist()
        assert len(seen._matches) == 1  # the pairs no longer asked about are forgotten


def test_a_thumbnail_of_another_size_or_mode_is_framed_alike() -> None:
    grey = Image.fromarray(picture(5)).convert("L").resize((40, 64))
    buf = io.BytesIO()
    grey.save(buf, "JPEG")
    frame = looks.frame(buf.getvalue())
    assert frame is not None and frame.shape == (looks.FRAME, looks.FRAME)


def test_the_fast_decode_gives_the_pixels_pillow_gives() -> None:
    """Thumbnails decode straight at a reduced DCT scale (their size read from the frame
    header); the pixels are those of Pillow's own draft decode, for baseline and
    progressive JPEGs of any size, and a JPEG the fast path refuses (CMYK) still frames."""

    def general(jpeg: bytes) -> np.ndarray:
        im = Image.open(io.BytesIO(jpeg))
        im.draft("L", (looks.FRAME, looks.FRAME))
        im = im.convert("L").resize((looks.FRAME, looks.FRAME), Image.Resampling.BILINEAR)
        return np.asarray(im)

    rng = np.random.default_rng(1)
    jpegs = [thumbnail_jpeg(rng.integers(0, 256, shape, dtype=np.uint8))
             for shape in ((28, 28, 3), (300, 200, 3), (64, 40, 3), (97, 500, 3), (20, 20, 3))]
    for options in ({"progressive": True}, {}):
        buf = io.BytesIO()
        Image.fromarray(picture(7)).save(buf, "JPEG", **options)
        jpegs.append(buf.getvalue())
    for jpeg in jpegs:
        np.testing.assert_array_equal(looks.frame(jpeg), general(jpeg))
    cmyk = io.BytesIO()
    Image.fromarray(picture(8)).convert("CMYK").save(cmyk, "JPEG")
    framed = looks.frame(cmyk.getvalue())
    assert framed is not None and framed.shape == (looks.FRAME, looks.FRAME)


def test_thumbnails_decoded_on_several_threads_are_those_decoded_one_by_one() -> None:
    jpegs: list[bytes | None] = [thumbnail_jpeg(picture(s)) for s in range(40)] * 16
    jpegs[3], jpegs[500] = None, b"not a jpeg"  # missing, and undecodable
    decoded = looks.frames(jpegs)
    assert len(jpegs) > 2 * looks.DECODE_RUN and len(decoded) == len(jpegs)
    assert decoded[3] is None and decoded[500] is None
    for j, f in zip(jpegs, decoded, strict=True):
        one = None if j is None else looks.frame(j)
        assert (f is None and one is None) or (f is not None and one is not None
                                               and np.array_equal(f, one))
