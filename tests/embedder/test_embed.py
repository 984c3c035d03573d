"""The batch embedder end to end: real image files, real stores, real Keras models."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from featurebank import store as store_mod
from featurebank.cli import main as cli_main
from featurebank.core.errors import InvalidInput, SpecMismatch
from featurebank.embedder import backbones, images
from featurebank.embedder.devices import NOISE
from tests.support.specs import make_spec

SIZE = 64
ROOT = Path(__file__).resolve().parents[2]


def photo(seed: int, w: int, h: int) -> np.ndarray:
    """A smooth, photo-like colour image (not white noise, so JPEG behaves normally)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (4, 5, 3), dtype=np.uint8)
    im = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(im)


def write_photos(root: Path) -> dict[str, str]:
    """Two classes of images in every supported format and mode; returns key -> label."""
    kinds = [
        ("a.jpg", "JPEG", "RGB", (96, 72)),
        ("b.png", "PNG", "RGB", (50, 80)),
        ("c.gif", "GIF", "P", (70, 70)),
        ("d.bmp", "BMP", "RGB", (64, 64)),
        ("e.png", "PNG", "L", (90, 60)),
        ("f.png", "PNG", "RGBA", (66, 99)),
        ("g.png", "PNG", "I;16", (40, 44)),
    ]
    labels = {}
    for c, cls in enumerate(["cat", "dog"]):
        for i, (name, fmt, mode, (w, h)) in enumerate(kinds):
            im = Image.fromarray(photo(10 * c + i, w, h))
            if mode == "I;16":
                im = Image.fromarray(np.asarray(im.convert("L"), np.uint16) * 257)
            elif mode != "RGB":
                im = im.convert(mode)
            path = root / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            im.save(path, fmt)
            labels[f"{cls}/{name}"] = cls
    return labels


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("photos")
    return root, write_photos(root)


@pytest.fixture(scope="module")
def photo_bank(
    photos: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    from featurebank.embedder.pipeline import embed

    bank = tmp_path_factory.mktemp("bank") / "b"
    summary = embed(
        str(photos[0]), str(bank), "MobileNetV2", weights="none", image_size=SIZE,
        batch_size=4, progress=False,
    )  # fmt: skip
    return bank, summary


def reference_vectors(paths: list[Path], size: int = SIZE) -> np.ndarray:
    """The model applied directly to the preprocessed images, without the pipeline."""
    model = backbones.build_family("MobileNetV2", (size, size), "avg", "none")
    pixels = np.stack([images.decode(p.read_bytes(), (size, size), "crop") for p in paths])
    x = pixels.astype(np.float32) / 127.5 - 1.0
    return np.asarray(model.predict(x, verbose=0), np.float32)


def assert_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-3) -> None:
    scale = np.abs(want).max(axis=1, keepdims=True)
    assert np.all(np.abs(got - want) <= rel * scale + 1e-7), np.abs(got - want).max()


def test_stored_vectors_equal_model_on_preprocessed_images(photos, photo_bank) -> None:
    root, labels = photos
    bank, summary = photo_bank
    assert summary["embedded"] == len(labels) and summary["failed"] == 0
    assert summary["images_per_s"] > 0 and summary["device"].startswith("CPU")
    with store_mod.open(bank, readonly=True) as st:
        assert st.spec.backbone == "MobileNetV2" and st.spec.dim == 1280
        assert st.spec.dtype == "float16" and st.spec.preprocessing == "tf"
        keys = sorted(labels)
        items = st.get_by_keys(keys)
        metas = items.meta
    assert items.labels == [labels[k] for k in keys]
    assert metas[0]["uri"].endswith("cat/a.jpg") and len(metas[0]["sha256"]) == 64
    want = reference_vectors([root / k for k in keys])
    assert np.abs(want).mean() > 1e-3  # random weights still give well-scaled features
    assert_close(items.vectors, want)


def test_embedder_from_spec_matches_the_store(photos, photo_bank) -> None:
    from featurebank.embedder.embedding import Embedder

    root, labels = photos
    bank, _ = photo_bank
    with store_mod.open(bank, readonly=True) as st:
        spec = st.spec
        keys = sorted(labels)[:5]
        stored = st.get_by_keys(keys).vectors
    emb = Embedder.from_spec(spec)  # a fresh build: seeded weights reproduce the bank's
    data = [(root / k).read_bytes() for k in keys]
    assert_close(emb.embed_images(data), stored)
    pixels = [images.decode(d) for d in data]
    assert_close(emb.embed_arrays(pixels), stored)
    with pytest.raises(InvalidInput, match="image 1: not an image"):
        emb.embed_images([data[0], b"junk"])


def test_rerun_skips_stored_keys_and_mismatch_is_refused(photos, photo_bank) -> None:
    from featurebank.embedder.pipeline import embed

    root, labels = photos
    bank, _ = photo_bank
    again = embed(str(root), str(bank), "MobileNetV2", weights="none", image_size=SIZE,
                  progress=False)  # fmt: skip
    assert (again["embedded"], again["skipped"], again["failed"]) == (0, len(labels), 0)
    with pytest.raises(SpecMismatch, match="input_size"):
        embed(str(root), str(bank), "MobileNetV2", weights="none", image_size=SIZE + 16)
    with pytest.raises(SpecMismatch, match="MobileNetV3Small"):
        embed(str(root), str(bank), "MobileNetV3Small", weights="none", image_size=SIZE)
    with pytest.raises(SpecMismatch, match="dtype"):
        embed(str(root), str(bank), "MobileNetV2", weights="none", image_size=SIZE,
              dtype="float32")  # fmt: skip


def test_manifest_labels_and_splits(photos, tmp_path: Path) -> None:
    from featurebank.embedder.pipeline import embed

    root, _ = photos
    manifest = tmp_path / "list.csv"
    manifest.write_text(
        f"path,label,split,key\n{root}/cat/a.jpg,tabby,train,one\n"
        f"{root}/dog/b.png,,test,two\n{root}/dog/c.gif,puppy,,three\n"
    )
    s = embed(str(manifest), str(tmp_path / "bank"), "MobileNetV2", weights="none",
              image_size=SIZE, labels="manifest", progress=False)  # fmt: skip
    assert s["embedded"] == 3
    with store_mod.open(tmp_path / "bank", readonly=True) as st:
        items = st.get_by_keys(["one", "two", "three"])
    assert items.labels == ["tabby", None, "puppy"]
    assert items.splits == ["train", "test", "none"]


def write_bad_images(root: Path) -> dict[str, str]:
    """Each kind of bad input, beside good ones; returns key -> expected reason."""
    good = Image.fromarray(photo(99, 80, 60))
    for i in range(3):
        good.save(root / f"good{i}.jpg")
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.png").write_text("definitely not a picture")
    buf = io.BytesIO()
    Image.fromarray(photo(98, 300, 300)).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    Image.fromarray(photo(97, 600, 500)).save(root / "huge.png")
    Image.fromarray(photo(96, 30, 30)).save(root / "scan.tif", "TIFF")
    noise = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    at = raw.index(b"IDAT") + 4
    raw[at : at + 40] = b"\xff" * 40
    (root / "corrupt.png").write_bytes(bytes(raw))
    return {
        "zero.jpg": "empty file",
        "text.png": "not an image",
        "truncated.jpg": "truncated",
        "huge.png": "too large",
        "scan.tif": "unsupported format TIFF",
        "corrupt.png": "corrupt",
    }


def test_bad_images_land_in_errors_and_the_rest_is_embedded(tmp_path: Path) -> None:
    from featurebank.embedder.pipeline import EmbedFailed, embed

    src = tmp_path / "mixed"
    src.mkdir()
    expected = write_bad_images(src)
    bank = tmp_path / "bank"
    s = embed(str(src), str(bank), "MobileNetV2", weights="none", image_size=SIZE,
              batch_size=2, max_pixels=200_000, progress=False)  # fmt: skip
    assert (s["embedded"], s["failed"]) == (3, len(expected))
    with store_mod.open(bank, readonly=True) as st:
        errors = {e["key"]: e["reason"] for e in st.errors()}
        assert st.count == 3
    assert set(errors) == set(expected)
    for key, reason in expected.items():
        assert reason in errors[key], (key, errors[key])
    with pytest.raises(EmbedFailed) as e:  # a rerun retries only the failures
        embed(str(src), str(bank), "MobileNetV2", weights="none", image_size=SIZE,
              max_pixels=200_000, fail_on_error=True, progress=False)  # fmt: skip
    assert e.value.summary["skipped"] == 3 and e.value.summary["failed"] == len(expected)


def test_array_sources(tmp_path: Path) -> None:
    from featurebank.embedder.embedding import Embedder
    from featurebank.embedder.pipeline import embed

    x = np.stack([photo(i, 40, 30) for i in range(6)])
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "x_labels.npy", np.array([0, 1, 0, 1, 0, 1]))
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["pixels"] = x[:, :, :, :1]  # grayscale
        f["labels"] = np.array([b"a", b"b", b"a", b"b", b"a", b"b"])
    s = embed(str(tmp_path / "x.npy"), str(tmp_path / "bank"), "MobileNetV2", weights="none",
              image_size=SIZE, progress=False)  # fmt: skip
    assert s["embedded"] == 6
    s = embed(f"{tmp_path / 'x.h5'}:pixels", str(tmp_path / "bank"), "MobileNetV2",
              weights="none", image_size=SIZE, progress=False)  # fmt: skip
    assert s["embedded"] == 6
    with store_mod.open(tmp_path / "bank", readonly=True) as st:
        npy = st.get_by_keys([f"x.npy#{i}" for i in range(6)])
        h5 = st.get_by_keys([f"x.h5:pixels#{i}" for i in range(6)])
        spec = st.spec
    assert npy.labels == ["0", "1"] * 3 and h5.labels == ["a", "b"] * 3
    assert_close(npy.vectors, Embedder.from_spec(spec, freeze=False).embed_arrays(x))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "featurebank", "embed", *args]


def kill_when_committed(cmd: list[str], bank: Path, log_path: Path, at_least: int = 8) -> int:
    """Run `cmd`, SIGKILL it once the bank holds `at_least` items; returns the count then."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    st = None
    with open(log_path, "wb") as log:  # a file: a full pipe could stall the child
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=ROOT)
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and proc.poll() is None:
                if st is None and (bank / "store" / "CURRENT").exists():
                    try:
                        st = store_mod.open(bank, readonly=True)
                    except Exception:
                        st = None
                if st is not None and st.count >= at_least:
                    break
                time.sleep(0.02)
            assert proc.poll() is None, log_path.read_text()
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            assert st is not None
            return st.count
        finally:
            if proc.poll() is None:
                proc.kill()
            if st is not None:
                st.close()


def test_resume_after_sigkill_gives_the_same_store(tmp_path: Path, capsys) -> None:
    """A job killed with SIGKILL mid-run and rerun ends with exactly the uninterrupted store."""
    from featurebank.embedder.pipeline import embed

    src = tmp_path / "src"
    n = 200
    for i in range(n):
        cls = src / f"class{i % 3}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(i, 80, 60)).save(cls / f"{i:04d}.jpg", quality=90)
    opts = ["--backbone", "MobileNetV2", "--weights", "none", "--image-size", str(SIZE),
            "--batch-size", "4"]  # fmt: skip
    bank = tmp_path / "killed"
    killed_at = kill_when_committed(
        cli(str(src), "--bank", str(bank), "--no-progress", *opts), bank, tmp_path / "stderr.txt"
    )
    assert 0 < killed_at < n

    err = (tmp_path / "stderr.txt").read_text()
    assert "running on CPU" in err and "no GPU visible" in err
    assert not any(NOISE.match(line) for line in err.encode().splitlines()), err  # quiet start

    # The rerun, through the same command line (in-process: no second TensorFlow start-up).
    code = cli_main(["embed", str(src), "--bank", str(bank), "--json", "--no-progress",
                     "--fail-on-error", *opts])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"] == killed_at and summary["embedded"] == n - killed_at

    whole = tmp_path / "whole"
    embed(str(src), str(whole), "MobileNetV2", weights="none", image_size=SIZE, batch_size=4,
          progress=False)  # fmt: skip
    with store_mod.open(bank, readonly=True) as a, store_mod.open(whole, readonly=True) as b:
        ia, ib = a.to_numpy(), b.to_numpy()
        assert a.count == b.count == n and a.spec == b.spec
    assert ia.keys == ib.keys and np.array_equal(ia.ids, ib.ids)
    assert ia.labels == ib.labels
    assert_close(ia.vectors, ib.vectors)


def tiny_model(path: Path) -> None:
    import keras

    inp = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inp)
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv")(x)
    x = keras.layers.MaxPooling2D(4, name="feat_map")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(12, activation="tanh", name="features")(x)
    out = keras.layers.Dense(3, activation="softmax")(x)
    keras.utils.set_random_seed(3)
    keras.Model(inp, out).save(path)


def test_custom_keras_model_with_layer(photos, tmp_path: Path) -> None:
    import keras

    from featurebank.embedder.pipeline import embed

    root, labels = photos
    model_path = tmp_path / "tiny.keras"
    tiny_model(model_path)
    keys = sorted(labels)
    pixels = np.stack([images.decode((root / k).read_bytes(), (32, 32)) for k in keys])
    full = keras.models.load_model(model_path)

    s = embed(str(root), str(tmp_path / "b1"), str(model_path), layer="features",
              progress=False)  # fmt: skip
    assert s["embedded"] == len(keys)
    with store_mod.open(tmp_path / "b1", readonly=True) as st:
        spec, got = st.spec, st.get_by_keys(keys).vectors
    assert (spec.dim, spec.pooling, spec.layer, spec.input_size) == (
        12,
        "none",
        "features",
        (32, 32),
    )
    assert spec.weights.startswith("sha256:") and spec.preprocessing == "raw0-255"
    cut = keras.Model(full.inputs, full.get_layer("features").output)
    assert_close(got, cut.predict(pixels.astype(np.float32), verbose=0))

    s = embed(str(root), str(tmp_path / "b2"), str(model_path), layer="feat_map",
              pooling="flatten", dtype="float32", progress=False)  # fmt: skip
    with store_mod.open(tmp_path / "b2", readonly=True) as st:
        spec, got = st.spec, st.get_by_keys(keys).vectors
    assert (spec.dim, spec.pooling) == (7 * 7 * 6, "flatten")
    cut = keras.Model(full.inputs, full.get_layer("feat_map").output)
    want = cut.predict(pixels.astype(np.float32), verbose=0).reshape(len(keys), -1)
    assert_close(got, want, rel=1e-5)
    with pytest.raises(InvalidInput, match="no layer 'nope'"):
        embed(str(root), str(tmp_path / "b3"), str(model_path), layer="nope", progress=False)


def test_writer_close_does_not_hang_after_a_failed_commit(tmp_path: Path) -> None:
    from tqdm import tqdm

    from featurebank.core.errors import FailedPrecondition
    from featurebank.embedder import sources
    from featurebank.embedder.pipeline import Batch, Loader, Timings, Writer

    store_mod.create(tmp_path / "bank", make_spec()).close()
    readonly = store_mod.open(tmp_path / "bank", readonly=True)  # every commit fails
    src = sources.ArraySource("a", np.zeros((2, 4, 4, 3), np.uint8), None)
    loader = Loader(src, src.records, (4, 4), "none", 1 << 20, Timings())
    writer = Writer(readonly, loader, Timings(), tqdm(disable=True))
    vec = np.zeros((1, 8), np.float32)
    writer.put(Batch(np.array([0]), vec, 1))
    writer._thread.join(10)
    writer._q.put(Batch(np.array([1]), vec, 2))  # handed over just before the failure
    with pytest.raises(FailedPrecondition):
        writer.close(None)
    readonly.close()
