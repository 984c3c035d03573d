"""The demo's data: scikit-learn's 8x8 digits written as MNIST-like PNGs in class folders."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TEST_FRACTION = 0.3
UPSERT_PER_CLASS = 2
SEED = 0
DIGIT_BOX = 20  # MNIST puts a digit's 20x20 box in the middle of a 28x28 frame
FRAME = 28


@dataclass
class Digits:
    """Where the demo's images went, and what the held-out ones really are."""

    images_dir: Path  # embedded into the bank: train/<digit>/*.png and test/<digit>/*.png
    new_dir: Path  # upserted over gRPC in step 5: <digit>/*.png
    labels_csv: Path
    test_paths: list[Path]  # the held-out images under images_dir/test
    test_labels: list[str]
    labelled: int
    unlabelled: int
    raw_pixel_1nn: float  # the no-transfer baseline with the same labelled images
    counts: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------- step 1: the images


def to_mnist_frame(image_8x8: np.ndarray) -> np.ndarray:
    """An 8x8 scikit-learn digit (0-16) as a 28x28 uint8 image laid out like MNIST.

    Why not leave the 8x8 file to the embedder's resize: upscaled to fill the whole 28x28
    frame, the strokes sit where MNIST has its black border, and the source backbone never saw
    that. Scaled to the central 20x20 box with a 4-pixel border, the digits look like the
    backbone's training data (few-shot 1-NN on the features: about 0.92 versus 0.95).
    """
    from PIL import Image

    gray = np.clip(np.rint(image_8x8 * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    box = Image.fromarray(gray).resize((DIGIT_BOX, DIGIT_BOX), Image.Resampling.BILINEAR)
    frame = np.zeros((FRAME, FRAME), dtype=np.uint8)
    o = (FRAME - DIGIT_BOX) // 2
    frame[o : o + DIGIT_BOX, o : o + DIGIT_BOX] = np.asarray(box)
    return frame


def write_digits(data_dir: Path, labels_per_class: int, seed: int = SEED) -> Digits:
    """Write load_digits as PNGs in class folders, the labels CSV, and the raw-pixel baseline."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neighbors import KNeighborsClassifier

    digits = load_digits()
    images, target = digits.images, digits.target.astype(int)
    order = np.arange(len(target))
    pool, test = train_test_split(
        order, test_size=TEST_FRACTION, stratify=target, random_state=seed
    )
    rng = np.random.default_rng(seed)
    labelled: list[int] = []
    new: list[int] = []
    for c in range(10):
        members = rng.permutation(pool[target[pool] == c])
        labelled.extend(members[:labels_per_class].tolist())
        new.extend(members[labels_per_class : labels_per_class + UPSERT_PER_CLASS].tolist())
    new_set = set(new)
    bank_pool = [i for i in pool.tolist() if i not in new_set]

    images_dir, new_dir = data_dir / "images", data_dir / "new"

    def write(i: int, folder: Path) -> Path:
        path = folder / str(target[i]) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_mnist_frame(images[i])).save(path)
        return path

    for i in bank_pool:
        write(i, images_dir / "train")
    test_paths = [write(i, images_dir / "test") for i in test.tolist()]
    for i in new:
        write(i, new_dir)

    # keys are paths relative to the embedded folder, as `featurebank embed` names them
    labels_csv = data_dir / "labels.csv"
    with open(labels_csv, "w", newline="") as f:
        w = csv.writer(f)
        for i in sorted(labelled):
            w.writerow([f"train/{target[i]}/{i:04d}.png", str(target[i]), "train"])
        for i in sorted(test.tolist()):
            w.writerow([f"test/{target[i]}/{i:04d}.png", str(target[i]), "test"])

    flat = images.reshape(len(images), -1)
    knn = KNeighborsClassifier(n_neighbors=1).fit(flat[labelled], target[labelled])
    raw_acc = float(knn.score(flat[test], target[test]))
    return Digits(
        images_dir=images_dir,
        new_dir=new_dir,
        labels_csv=labels_csv,
        test_paths=test_paths,
        test_labels=[str(target[i]) for i in test.tolist()],
        labelled=len(labelled),
        unlabelled=len(bank_pool) - len(labelled),
        raw_pixel_1nn=raw_acc,
        counts={"bank_train": len(bank_pool), "test": len(test), "new": len(new)},
    )
