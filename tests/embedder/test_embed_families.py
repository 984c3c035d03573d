"""Every keras.applications family in the registry builds, frozen, and embeds a few images."""

from __future__ import annotations

import gc
import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from featurebank.core.errors import InvalidInput, NotFound
from featurebank.embedder import backbones

# Building and freezing a family takes seconds to tens of seconds on a small CPU: one runs
# by default (MobileNetV2 is exercised by test_embed.py), the rest are marked slow.
DEFAULT = {"MobileNetV3Small"}


def family_params() -> list[object]:
    out = []
    for name in backbones.FAMILIES:
        marks = [] if name in DEFAULT else [pytest.mark.slow]
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (3, 4, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.resize((120, 90), Image.Resampling.BICUBIC).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(autouse=True)
def release_models() -> Iterator[None]:
    """Forget each test's model, so a run over all families stays within memory."""
    yield
    import keras

    keras.backend.clear_session()
    gc.collect()


@pytest.mark.parametrize("name", family_params())
def test_family_builds_and_embeds(name: str) -> None:
    from featurebank.embedder.embedding import Embedder

    fam = backbones.FAMILIES[name]
    size = max(fam.min_size, 32)
    # float32: random weights in the deepest families (EfficientNetV2M/L) exceed float16
    emb = Embedder.create(name, weights="none", image_size=size, pooling="max", dtype="float32")
    assert emb.dim == fam.dim and emb.spec.dim == fam.dim
    assert emb.spec.preprocessing == fam.preprocessing and emb.spec.input_size == (size, size)
    assert emb.model.trainable is False
    vecs = emb.embed_images([jpeg(i) for i in range(3)])
    assert vecs.shape == (3, fam.dim) and np.isfinite(vecs).all()
    assert np.abs(vecs).max() > 0 and not np.allclose(vecs[0], vecs[1])


def test_registry_lookup_and_options() -> None:
    assert backbones.family("mobilenet_v2").name == "MobileNetV2"
    with pytest.raises(NotFound, match="unknown backbone 'AlexNet'"):
        backbones.family("AlexNet")
    with pytest.raises(InvalidInput, match="at least 75px"):
        backbones.build_family("InceptionV3", (32, 32))
    with pytest.raises(InvalidInput, match="pooling 'flatten'"):
        backbones.build_family("MobileNetV2", (32, 32), pooling="flatten")
    modes = {f.preprocessing for f in backbones.FAMILIES.values()}
    assert modes == {"tf", "caffe", "torch", "raw0-255"}
    x = np.array([[[0.0, 127.5, 255.0]]], np.float32)
    np.testing.assert_allclose(backbones.preprocess_numpy(x, "tf"), [[[-1.0, 0.0, 1.0]]])
    np.testing.assert_allclose(
        backbones.preprocess_numpy(x, "caffe"), [[[255 - 103.939, 127.5 - 116.779, -123.68]]]
    )
    pixels = np.random.default_rng(0).integers(0, 255, (2, 5, 5, 3)).astype(np.uint8)
    for mode in backbones.PREPROCESSING:  # the graph version matches the reference
        got = np.asarray(backbones.preprocess_tf(pixels, mode))
        np.testing.assert_allclose(got, backbones.preprocess_numpy(pixels, mode), rtol=1e-6)


def test_local_weights_file_is_identified_by_hash(tmp_path) -> None:
    from featurebank.embedder.embedding import Embedder, make_spec

    src = Embedder.create("MobileNetV3Small", weights="none", image_size=32, freeze=False)
    path = tmp_path / "w.weights.h5"
    src.model.save_weights(path)
    spec = make_spec("MobileNetV3Small", weights=str(path), image_size=32)
    assert spec.weights == f"sha256:{backbones.sha256_file(path)}"
    assert spec.weights_path == str(path.resolve())
    emb = Embedder.from_spec(spec, freeze=False)
    img = [jpeg(7)]
    np.testing.assert_allclose(emb.embed_images(img), src.embed_images(img), rtol=1e-3, atol=1e-4)
    path.write_bytes(path.read_bytes() + b"changed")
    with pytest.raises(Exception, match="changed since the bank was made"):
        Embedder.from_spec(spec)
