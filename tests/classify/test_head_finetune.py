"""Fine-tuning a tiny backbone on CPU, and embedding with the exported backbone."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurebank import store as store_mod
from featurebank.classify.finetune import finetune, preprocessing_affine
from featurebank.classify.head_training import train_head
from featurebank.cli import main
from featurebank.core.errors import FailedPrecondition, InvalidInput


def tiny_backbone(path: Path) -> Path:
    """16x16 RGB -> conv + BatchNorm -> dropout -> dense 'features' (8) -> softmax (3)."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(0.25)(x)  # active while fine-tuning, as in the shipped CNN
    x = keras.layers.Dense(8, activation="relu", name="features")(x)
    out = keras.layers.Dense(3, activation="softmax", name="top")(x)
    keras.Model(inp, out).save(path)
    return path


def image_folders(root: Path, per_class: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (16, 16, 3)).astype(np.uint8)
            img[4:12, 4:12, c] = 220
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def vectors(bank: Path) -> dict[str, np.ndarray]:
    with store_mod.open(bank, readonly=True) as st:
        items = st.to_numpy()
    return dict(zip(items.keys, items.vectors, strict=True))


def test_preprocessing_affine_matches_the_embedder() -> None:
    from featurebank.embedder.backbones import preprocess_numpy

    px = np.random.default_rng(0).uniform(0, 255, (5, 3)).astype(np.float32)
    for mode in ("tf", "caffe", "torch", "raw0-255", "raw0-1"):
        k, b = preprocessing_affine(mode)
        np.testing.assert_allclose(px @ k + b, preprocess_numpy(px, mode), rtol=1e-5, atol=1e-4)
    k1, b1 = preprocessing_affine("raw0-1", channels=1)
    assert k1.shape == (3, 1) and b1.shape == (1,)


@pytest.fixture(scope="module")
def bank_with_head(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(images, bank): a tiny backbone's features of 36 images with a trained head."""
    from featurebank.embedder.pipeline import embed

    root = tmp_path_factory.mktemp("finetune")
    images = image_folders(root / "images")
    model = tiny_backbone(root / "tiny.keras")
    bank = root / "bank"
    # preprocessing "tf" must be folded into the exported backbone
    embed(
        str(images),
        str(bank),
        str(model),
        layer="features",
        image_size=16,
        preprocessing="tf",
        dtype="float32",
        progress=False,
    )
    with pytest.raises(FailedPrecondition, match="head train"):
        finetune(str(images), bank, root / "x.keras")
    train_head(bank, epochs=5, stacked=False)
    return images, bank


def test_finetune_exports_a_backbone_that_embeds(
    bank_with_head: tuple[Path, Path], tmp_path: Path
) -> None:
    from featurebank.embedder.pipeline import embed

    images, bank = bank_with_head
    # unfreeze 0: only the head moves, so the exported backbone reproduces the bank's vectors
    same = tmp_path / "same.keras"
    s = finetune(str(images), bank, same, unfreeze=0, epochs=1, lr=1e-3, force=True)
    assert s["unfrozen"] == [] and s["images"] == 36 and same.exists() and s["published"]
    embed(
        str(images),
        str(tmp_path / "bank_same"),
        str(same),
        image_size=16,
        dtype="float32",
        progress=False,
    )
    before, after = vectors(bank), vectors(tmp_path / "bank_same")
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_allclose(after[key], before[key], rtol=1e-4, atol=1e-4)
    with pytest.raises(InvalidInput, match=".keras"):
        finetune(str(images), bank, tmp_path / "out.h5")


@pytest.mark.slow
def test_finetune_command_trains_top_layers(
    bank_with_head: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from featurebank.embedder.pipeline import embed

    images, bank = bank_with_head
    before = vectors(bank)
    # top three weighted layers, BatchNorm among them stays frozen; augmentation; real step size
    tuned = tmp_path / "tuned.keras"
    rc = main(
        [
            "finetune",
            str(images),
            "--bank",
            str(bank),
            "--out",
            str(tuned),
            "--unfreeze",
            "3",
            "--epochs",
            "2",
            "--lr",
            "1e-2",
            "--augment",
            "--force",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    opened = out.split("(")[1].split(")")[0]
    assert "features" in opened and "bn" not in opened
    embed(
        str(images),
        str(tmp_path / "bank_tuned"),
        str(tuned),
        image_size=16,
        dtype="float32",
        progress=False,
    )
    moved = vectors(tmp_path / "bank_tuned")
    assert all(v.shape == (8,) for v in moved.values())
    assert max(float(np.abs(moved[k] - before[k]).max()) for k in before) > 1e-3


def test_finetune_refuses_to_write_a_backbone_worse_than_the_probe(
    bank_with_head: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, bank = bank_with_head
    wrecked = tmp_path / "wrecked.keras"
    # a step size far too large: the tuned backbone loses what the probe had
    args = ["finetune", str(images), "--bank", str(bank), "--out", str(wrecked),
            "--unfreeze", "3", "--epochs", "3", "--lr", "30"]
    assert main(args) == 1
    assert not wrecked.exists()
    captured = capsys.readouterr()
    assert "not written" in captured.err and "--force" in captured.err
    before, after = captured.out.split("val accuracy ")[1].split(";")[0].split(" -> ")
    assert float(after) < float(before)
    assert main([*args, "--force"]) == 0 and wrecked.exists()


def backbone_weights(path: Path) -> list[np.ndarray]:
    import keras

    return [np.asarray(w) for w in keras.models.load_model(path).get_weights()]


def test_finetune_with_a_seed_is_reproducible(
    bank_with_head: tuple[Path, Path], tmp_path: Path
) -> None:
    images, bank = bank_with_head
    runs = []
    for i, (before, seed) in enumerate(((1, 7), (2, 7), (1, 8))):
        random.seed(before)  # what ran earlier in the process (or none) must not matter:
        np.random.seed(before)  # the backbone's layers draw their seeds when it is loaded
        runs.append(finetune(str(images), bank, tmp_path / f"{i}.keras", unfreeze=3, epochs=3,
                             lr=1e-2, seed=seed, force=True))
    assert runs[0]["curves"] == runs[1]["curves"] != runs[2]["curves"]
    for a, b in zip(backbone_weights(tmp_path / "0.keras"), backbone_weights(tmp_path / "1.keras"),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_finetune_from_a_random_head_starts_without_the_probe(
    bank_with_head: tuple[Path, Path], tmp_path: Path
) -> None:
    images, bank = bank_with_head
    # the smallest step: what the head knows before tuning is where it started
    start = {"unfreeze": 0, "epochs": 1, "lr": 1e-9, "force": True}
    probe = finetune(str(images), bank, tmp_path / "probe.keras", **start)
    random = finetune(str(images), bank, tmp_path / "random.keras", head_init="random", **start)
    assert probe["head_init"] == "probe" and random["head_init"] == "random"
    assert random["val_accuracy_before"] < probe["val_accuracy_before"]
    with pytest.raises(InvalidInput, match="probe, random"):
        finetune(str(images), bank, tmp_path / "x.keras", head_init="zeros")


def test_early_stopping_keeps_the_epoch_with_the_lowest_held_out_loss(
    bank_with_head: tuple[Path, Path], tmp_path: Path
) -> None:
    images, bank = bank_with_head
    s = finetune(str(images), bank, tmp_path / "es.keras", unfreeze=3, epochs=40, lr=3e-2,
                 patience=2, force=True)
    val_loss = s["curves"]["val_loss"]
    assert s["epochs_run"] == len(val_loss) < 40  # stopped before the budget
    assert s["best_epoch"] == int(np.argmin(val_loss)) + 1 == s["epochs_run"] - 2
    # the model measured (and written) afterwards is the best epoch's, not the last one's
    assert s["val_accuracy_after"] == pytest.approx(s["curves"]["val_accuracy"][s["best_epoch"] - 1])
