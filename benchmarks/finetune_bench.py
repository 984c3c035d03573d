"""Fine-tuning the shipped backbone on a far domain: LP-FT against the frozen probe.

Data: scikit-image's lfw_subset (200 25x25 grey crops, 100 faces and 100 non-faces),
in the 28x28 RGB layout of classify_quality.py's "far" case, through the shipped MNIST
CNN (embedder/models/digits_cnn.keras, layer `features`, 128-d). Each draw (seed) holds
out TEST_PER_CLASS crops per class as the test set; the other crops are the labelled
pool, and each setting takes the first 5, 20 or all of them per class (nested). For
every setting, held-out accuracy on the same test crops of:

- frozen probe: `featurebank embed` + `index build` + `head train` on the shipped
  backbone, the head (linear probe) classifying the test crops;
- LP-FT: `finetune` (the library call the CLI makes) from that bank's probe, its exported
  backbone embedded into a new bank and a probe solved there (what a user does next);
  "as published" counts the frozen probe's answer where finetune refused to write;
- FT random head: the same call and recipe with the head initialised at random
  (`head_init="random"`), then the same new-bank probe;
- scikit-learn LogisticRegression() on the frozen features (the user's three lines).

Prints mean +- std over the draws, LP-FT minus probe (mean and std of the paired
difference), and the targets with all non-test labels: LP-FT >= probe + 2 points and
LP-FT >= FT random head. Preconditions (exit 1 in every mode): the same test crops for
every method, no test crop in any training set or bank, the bank's vectors equal to the
backbone's on the same pixels (the test features come from the same model).

    python benchmarks/finetune_bench.py [--quick] [--draws N] [--unfreeze N] [--lr X]
        [--epochs E] [--patience P] [--augment]
"""

from __future__ import annotations

import argparse
import inspect
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _checks import Checks  # noqa: E402
from classify_quality import backbone_path, far_data  # noqa: E402

TEST_PER_CLASS = 50
SETTINGS = {"5 per class": 5, "20 per class": 20, "all non-test": None}
TARGET_SETTING = "all non-test"
TARGET_GAIN = 0.02  # LP-FT >= frozen probe + 2 points
METHODS = ("frozen probe", "LP-FT", "LP-FT as published", "FT random head", "sklearn logreg")
DRAWS = 6
FIRST_SEED = 100  # draws use FIRST_SEED, FIRST_SEED + 1, ...
CLASSES = ("face", "other")


def split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(test indices, labelled pool in a random order per class: pool[c] is an array)."""
    rng = np.random.default_rng(seed)
    test, pool = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test.append(idx[:TEST_PER_CLASS])
        pool.append(idx[TEST_PER_CLASS:])
    return np.sort(np.concatenate(test)), np.stack(pool)


def write_folders(pixels: np.ndarray, y: np.ndarray, idx: np.ndarray, root: Path) -> Path:
    """PNG files in class folders, named by their index in the data set."""
    from PIL import Image

    for i in idx:
        d = root / CLASSES[y[i]]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i]).save(d / f"{i}.png")
    return root


def probe_bank(images: Path, bank: Path, backbone: Path, **embed_options: Any) -> None:
    """What a user runs on labelled images: embed, index build, head train."""
    from featurebank.classify.head_training import train_head
    from featurebank.embedder.pipeline import embed
    from featurebank.index.build import build_index

    embed(str(images), str(bank), str(backbone), dtype="float32", progress=False, **embed_options)
    build_index(bank, transform="cl2n", metric="cosine", k=10)
    train_head(bank)


def head_accuracy(
    bank: Path, pixels: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray,
    problems: list[str],
) -> tuple[float, np.ndarray]:
    """Accuracy of the bank's head on the test crops embedded by the bank's own model, and
    every crop's features.

    Also checks that the bank holds exactly the training crops and that its model gives
    the bank's vectors on their pixels (appends what failed to `problems`)."""
    from featurebank import store as store_mod
    from featurebank.classify.classifier import Classifier
    from featurebank.embedder.embedding import Embedder

    with store_mod.open(bank, readonly=True) as st:
        items = st.to_numpy()
        spec = st.spec
    keys = np.array([int(Path(k).stem) for k in items.keys])
    if not np.array_equal(np.sort(keys), train) or np.intersect1d(keys, test).size:
        problems.append(f"{bank.name} does not hold exactly the training crops")
    emb = Embedder.from_spec(spec, freeze=False)
    if not np.allclose(emb.forward(pixels[keys]), items.vectors, rtol=1e-4, atol=1e-4):
        problems.append(f"{bank.name}: its model does not reproduce its vectors")
    feats = emb.forward(pixels)
    with Classifier(bank, mode="head") as clf:
        p, vocab = clf.predict_proba(feats[test])
    pred = np.asarray(vocab)[p.argmax(axis=1)]
    truth = np.array([CLASSES[c] for c in y[test]])
    return float(np.mean(pred == truth)), feats


def run_setting(
    pixels: np.ndarray,
    y: np.ndarray,
    test: np.ndarray,
    train: np.ndarray,
    backbone: Path,
    recipe: dict[str, Any],
    seed: int,
    tmp: Path,
    problems: list[str],
) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression

    from featurebank.classify.finetune import finetune

    if np.intersect1d(train, test).size:
        problems.append("a test crop is in a training set")
    images = write_folders(pixels, y, train, tmp / "images")
    frozen = tmp / "frozen"
    probe_bank(images, frozen, backbone, layer="features", image_size=28)
    acc: dict[str, float] = {}
    acc["frozen probe"], feats = head_accuracy(frozen, pixels, y, train, test, problems)
    lr = LogisticRegression(max_iter=2000).fit(feats[train], y[train])
    acc["sklearn logreg"] = float(np.mean(lr.predict(feats[test]) == y[test]))
    for name, init in (("LP-FT", "probe"), ("FT random head", "random")):
        if init != "probe" and "head_init" not in inspect.signature(finetune).parameters:
            continue  # code from before the option: LP-FT only
        out = tmp / f"{init}.keras"
        start = {} if init == "probe" else {"head_init": init}
        s = finetune(str(images), frozen, out, seed=seed, force=True, **start, **recipe)
        if s["images"] != len(train):
            problems.append(f"{name}: finetune read {s['images']} images, not {len(train)}")
        tuned = tmp / f"bank-{init}"
        probe_bank(images, tuned, out)
        acc[name], _ = head_accuracy(tuned, pixels, y, train, test, problems)
        if init == "probe":
            kept = s["val_accuracy_after"] is None or s["val_accuracy_after"] >= s["val_accuracy_before"]
            acc["LP-FT as published"] = acc[name] if kept else acc["frozen probe"]
            acc["published"] = float(kept)
        acc[f"{name} epochs"] = float(len(s["curves"]["loss"]))
    shutil.rmtree(tmp)
    return acc


def load() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0] if Path("/proc/loadavg").exists() else "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 draw, 2 epochs")
    parser.add_argument("--draws", type=int, default=None, help="train/test splits (default 6)")
    parser.add_argument("--unfreeze", type=int, default=None, help="finetune's --unfreeze")
    parser.add_argument("--lr", type=float, default=None, help="finetune's --lr")
    parser.add_argument("--epochs", type=int, default=None, help="finetune's --epochs")
    parser.add_argument("--patience", type=int, default=None, help="finetune's --patience")
    parser.add_argument("--augment", action="store_true", help="finetune's --augment")
    args = parser.parse_args(argv)
    draws = args.draws or (1 if args.quick else DRAWS)
    logging.basicConfig(level=logging.ERROR)
    from featurebank.embedder.devices import load_tensorflow

    load_tensorflow(verbose=False)
    given = {"unfreeze": args.unfreeze, "lr": args.lr, "patience": args.patience,
             "epochs": args.epochs or (2 if args.quick else None),
             "augment": args.augment or None}
    recipe = {k: v for k, v in given.items() if v is not None}  # the rest: finetune's defaults
    started = time.time()
    backbone = backbone_path()
    pixels, _, y = far_data()
    print(
        f"backbone {backbone.name} (layer 'features'); skimage lfw_subset: {len(y)} face / "
        f"non-face crops, {TEST_PER_CLASS} per class held out per draw; {draws} draws; "
        f"finetune options {recipe or 'none'} (the rest at their defaults); load {load()}",
        flush=True,
    )
    results: dict[str, dict[str, list[float]]] = {s: {} for s in SETTINGS}
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fb-finetune-") as tmp:
        for d in range(draws):
            seed = FIRST_SEED + d
            test, pool = split(y, seed)
            for name, per_class in SETTINGS.items():
                train = np.sort(pool[:, :per_class].ravel())
                acc = run_setting(pixels, y, test, train, backbone, recipe, seed,
                                  Path(tmp) / f"{d}-{per_class}", problems)
                for k, v in acc.items():
                    results[name].setdefault(k, []).append(v)
                print(f"  draw {d + 1}/{draws}, {name} ({len(train)} labelled): "
                      + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
                      + f"  ({time.time() - started:.0f}s)", flush=True)

    cols = list(SETTINGS)
    print(f"\nheld-out accuracy on {2 * TEST_PER_CLASS} test crops a draw "
          f"(mean +- std over {draws} draws)")
    print(f"{'method':<22}" + "".join(f"{c:>18}" for c in cols))
    rows = {m: m for m in METHODS}
    rows |= {"LP-FT - probe": "gain", "published (share)": "published",
             "LP-FT epochs run": "LP-FT epochs", "FT random epochs run": "FT random head epochs"}
    for c in cols:
        r = results[c]
        r["gain"] = list(np.subtract(r["LP-FT"], r["frozen probe"]))
    for row, key in rows.items():
        print(f"{row:<22}" + "".join(
            f"{np.mean(results[c][key]):>+11.4f} +-{np.std(results[c][key]):.3f}"
            if key == "gain" and key in results[c]
            else f"{np.mean(results[c][key]):>11.4f} +-{np.std(results[c][key]):.3f}"
            if key in results[c] else f"{'-':>18}"
            for c in cols))
    print()
    m = {k: float(np.mean(v)) for k, v in results[TARGET_SETTING].items()}
    m.setdefault("FT random head", float("nan"))  # code from before head_init: not measured
    checks = Checks()
    checks.check(not problems, "preconditions: one test split per draw for every method; every "
              "bank and fine-tuning holds exactly the training crops (no test crop); each "
              "bank's model reproduces its vectors"
              + "".join(f"; {p}" for p in sorted(set(problems))))
    for ok, text in (
        (m["LP-FT"] >= m["frozen probe"] + TARGET_GAIN,
         f"{TARGET_SETTING}: LP-FT {m['LP-FT']:.4f} >= frozen probe {m['frozen probe']:.4f} "
         f"+ {100 * TARGET_GAIN:.0f} points (gain {100 * (m['LP-FT'] - m['frozen probe']):+.2f})"),
        (m["LP-FT"] >= m["FT random head"],
         f"{TARGET_SETTING}: LP-FT {m['LP-FT']:.4f} >= FT random head {m['FT random head']:.4f}"),
    ):
        if args.quick and not ok:  # one draw of two epochs: the full run judges the targets
            print(f"MISSED  {text} (judged by the full run)")
        else:
            checks.check(ok, text)
    print(f"({time.time() - started:.0f}s total, load {load()})")
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main())
