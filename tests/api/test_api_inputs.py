"""Every form of `x`, in process and over gRPC: one bank of real image files embedded by the
shipped digits CNN, served on a loopback port; both sides must give the same answers."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import featurebank as fb
from featurebank.core.errors import FeaturebankError, InvalidInput, NotFound
from featurebank.embedder.source_model import MODEL_PATH
from featurebank.server.client import FeatureBankClient

PER_CLASS = 4
CLASSES = 5


def digit_images() -> tuple[np.ndarray, list[str]]:
    """scikit-learn's 8x8 digits as 28x28 uint8 frames, PER_CLASS of each of CLASSES digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rows = [i for c in range(CLASSES) for i in np.flatnonzero(d.target == c)[:PER_CLASS]]
    frames = [np.pad(np.kron(d.images[i], np.ones((3, 3))), 2) * (255 / 16) for i in rows]
    return np.rint(np.stack(frames)).astype(np.uint8), [str(d.target[i]) for i in rows]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class folders of PNG files: <digit>/<n>.png."""
    root = tmp_path_factory.mktemp("images")
    frames, labels = digit_images()
    for n, (frame, label) in enumerate(zip(frames, labels, strict=True)):
        (root / label).mkdir(exist_ok=True)
        Image.fromarray(frame, "L").save(root / label / f"{n}.png")
    return root


@pytest.fixture(scope="module")
def banks(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> Iterator[dict[str, Any]]:
    """The bank in process and the same bank over gRPC (served from this process)."""
    bank = fb.create(tmp_path_factory.mktemp("bank") / "b", backbone=str(MODEL_PATH), layer="features")
    written = bank.upsert(folder)
    assert written.added == PER_CLASS * CLASSES
    bank.build_index()
    served = bank.serve()
    remote = served.connect()
    try:
        yield {"local": bank, "remote": remote, "served": served}
    finally:
        remote.close()
        bank.close()


SIDES = ("local", "remote")


def first_png(folder: Path) -> Path:
    return sorted(folder.glob("*/*.png"))[0]


@pytest.mark.parametrize("side", SIDES)
def test_every_image_form_gives_the_vector_of_the_file(
    banks: dict[str, Any], folder: Path, side: str
) -> None:
    bank = banks[side]
    path = first_png(folder)
    expected = bank.embed(path)
    assert expected.shape == (128,) and expected.dtype == np.float32
    gray = np.asarray(Image.open(path))
    rgb = np.asarray(Image.open(path).convert("RGB"))
    forms: dict[str, Any] = {
        "str path": str(path),
        "bytes": path.read_bytes(),
        "PIL image": Image.open(path),
        "uint8 (H,W,3)": rgb,
        "uint8 (H,W,1)": gray[..., None],
        "float 0-1 (H,W,1)": gray[..., None] / 255.0,
        "float 0-255 (H,W,3)": rgb.astype(np.float32),
    }
    for name, x in forms.items():
        np.testing.assert_array_equal(bank.embed(x), expected, err_msg=name)
    batch = np.stack([rgb, rgb])
    np.testing.assert_array_equal(bank.embed(batch), np.stack([expected, expected]))
    np.testing.assert_array_equal(bank.embed([path, path.read_bytes()])[1], expected)


@pytest.mark.parametrize("side", SIDES)
def test_a_resized_image_embeds_the_same_from_bytes_and_from_an_array(
    banks: dict[str, Any], folder: Path, side: str
) -> None:
    rgb = np.asarray(Image.open(first_png(folder)).convert("RGB"))
    big = np.asarray(Image.fromarray(rgb).resize((61, 47)))  # not the model's 28x28
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    bank = banks[side]
    np.testing.assert_array_equal(bank.embed(buf.getvalue()), bank.embed(big))


def test_both_sides_give_the_same_answers(banks: dict[str, Any], folder: Path) -> None:
    local, remote = banks["local"], banks["remote"]
    paths = sorted(folder.glob("*/*.png"))
    np.testing.assert_array_equal(local.embed(folder), remote.embed(folder))
    a, b = local.classify(folder, include_neighbors=True), remote.classify(folder, include_neighbors=True)
    assert len(a) == len(b) == len(paths)
    assert a.to_numpy().tolist() == b.to_numpy().tolist()
    np.testing.assert_allclose(a.to_numpy("probabilities"), b.to_numpy("probabilities"), rtol=1e-5)
    assert [c.neighbors[0].key for c in a] == [c.neighbors[0].key for c in b]
    assert [(c.mode, c.index_generation) for c in a] == [(c.mode, c.index_generation) for c in b]
    ha, hb = local.search(paths, k=4), remote.search(paths, k=4)
    assert ha.to_numpy().tolist() == hb.to_numpy().tolist()
    np.testing.assert_allclose(ha.to_numpy("scores"), hb.to_numpy("scores"), rtol=1e-5)
    assert local.info() == remote.info()


@pytest.mark.parametrize("side", SIDES)
def test_batched_inputs_give_results_in_their_order(
    banks: dict[str, Any], folder: Path, side: str
) -> None:
    bank = banks[side]
    paths = sorted(folder.glob("*/*.png"))
    forward = bank.classify(paths)
    backward = bank.classify(paths[::-1])
    assert backward.to_numpy().tolist() == forward.to_numpy().tolist()[::-1]
    # a folder is its images in key order; the key is the path relative to the folder
    hits = bank.search(folder, k=1)
    assert hits.to_numpy()[:, 0].tolist() == [str(p.relative_to(folder)) for p in paths]
    # labels came from the class folders, and the few-shot answers are mostly right
    truth = [p.parent.name for p in paths]
    assert float(np.mean(forward.to_numpy() == np.array(truth))) >= 0.8


@pytest.mark.parametrize("side", SIDES)
def test_stored_keys_are_told_apart_from_paths(
    banks: dict[str, Any], folder: Path, side: str
) -> None:
    bank = banks[side]
    key = str(first_png(folder).relative_to(folder))
    hits = bank.search(fb.keys(key), k=3)
    assert key not in hits.keys and len(hits.keys) == 3  # left out of its own neighbours
    assert bank.classify(fb.keys([key])).label == key.split("/")[0]
    with pytest.raises(NotFound, match="featurebank.keys"):
        bank.search(key)  # a plain string is a path, and this one is not a file here


def test_vectors_are_searched_as_they_are(banks: dict[str, Any], folder: Path) -> None:
    local, remote = banks["local"], banks["remote"]
    vectors = local.embed(fb.keys("0/0.png", "1/4.png"))
    assert vectors.shape == (2, 128)
    for bank in (local, remote):
        assert bank.search(vectors, k=1).to_numpy()[:, 0].tolist() == ["0/0.png", "1/4.png"]
        assert bank.search(vectors[0].tolist(), k=1).keys == ["0/0.png"]
        assert bank.search([vectors[0], vectors[1]], k=1)[1].keys == ["1/4.png"]


WRONG: list[tuple[str, Any, str]] = [
    ("a number", 3, "got 3"),
    ("None", None, "got None"),
    ("a dict", {"a": 1}, "got dict"),
    ("an empty list", [], "empty list"),
    ("a missing file", "no/such.png", "no such file or folder"),
    ("vectors of another dimension", np.zeros((2, 5)), "dimension 5, the bank's dimension is 128"),
    ("a 5-d array", np.zeros((1, 2, 3, 4, 3)), "shape (1, 2, 3, 4, 3)"),
    ("two channels", np.zeros((28, 28, 2), np.uint8), "C = 1, 3 or 4"),
    ("strings in an array", np.array(["a", "b"]), "neither images nor vectors"),
    ("NaN pixels", np.full((28, 28, 3), np.nan), "NaN"),
    ("bytes that are no image", b"not an image", "not an image"),
    ("keys inside a list", [fb.keys("a")], "keys cannot be mixed"),
    ("vectors of two lengths", [[1.0, 2.0], [1.0]], "different lengths"),
]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize(("what", "x", "says"), WRONG, ids=[w[0] for w in WRONG])
def test_a_wrong_input_gets_one_line_naming_it(
    banks: dict[str, Any], side: str, what: str, x: Any, says: str
) -> None:
    with pytest.raises(FeaturebankError) as e:
        banks[side].classify(x)
    assert says in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("side", SIDES)
def test_wrong_options_are_named(banks: dict[str, Any], side: str) -> None:
    bank = banks[side]
    v = np.zeros(128, np.float32)
    for call, says in (
        (lambda: bank.search(v, k=-3), "k must be a positive integer, got -3"),
        (lambda: bank.classify(v, top_n=0), "top_n must be a positive integer"),
        (lambda: bank.classify(v, abstain_below=1.5), "abstain_below must be a precision"),
        (lambda: bank.classify(v, mode="magic"), "mode"),
        (lambda: bank.upsert(v), "upsert needs keys="),
        (lambda: bank.upsert(fb.keys("0/0.png")), "upsert takes images or vectors"),
        (lambda: bank.set_labels({"0/0.png": 3}), "is not key -> label"),
        (lambda: bank.delete([]), "delete takes one or more"),
    ):
        with pytest.raises(FeaturebankError) as e:
            call()
        assert says in str(e.value), str(e.value)


def test_a_server_does_not_hand_out_stored_vectors(banks: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput, match="does not return stored vectors"):
        banks["remote"].embed(fb.keys("0/0.png"))


def test_the_grpc_client_takes_arrays_paths_and_vectors(banks: dict[str, Any], folder: Path) -> None:
    path = first_png(folder)
    rgb = np.asarray(Image.open(path).convert("RGB"))
    vector = banks["local"].embed(path)
    with FeatureBankClient(banks["served"].address) as client:
        np.testing.assert_array_equal(client.embed(rgb), vector)
        by_array = client.classify(rgb)
        results = client.classify_batch([rgb, path, path.read_bytes(), vector])
        assert len({r.labels[0].label for r in results}) == 1
        assert by_array.labels[0].label == results[0].labels[0].label
        with pytest.raises(InvalidInput, match="image must be bytes, a file path or an image array"):
            client.classify(12)  # type: ignore[arg-type]
        with pytest.raises(NotFound, match="does not exist"):
            client.embed(folder / "missing.png")
