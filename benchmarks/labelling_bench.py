"""The labelling loop on real digits: which labels to buy, and which stored labels are wrong.

Features: scikit-learn's load_digits (1,797 scans, 10 classes) embedded by the shipped
MNIST backbone (embedder/models/digits_cnn.keras, frozen), as in classify_quality.py.
A stratified 30 % is held out as the test set; the rest is the bank.

Active learning: the bank starts with 1 label per class; each round adds 20 labels
chosen by a strategy (margin, entropy, diverse; `featurebank suggest`), at random
(what a user does without suggestions), or by a hand-written loop a user would write
instead ("LR margin": scikit-learn's LogisticRegression() fitted on the labels so far,
the 20 items with the smallest margin between its two best classes, scored by that
LogisticRegression); the featurebank rows retrain the head and score the test set in
the default mode. The limit is the accuracy with every bank item labelled. Targets:
`diverse` reaches random's accuracy at 100 added labels with at most 40, and beats the
LR margin loop at every budget from 20 to 120.

Cold start: the bank starts with no label; the first round of 20 is chosen by
`suggest` (k-means representatives) or at random, then the head is trained and the
test set scored. Target: cold start beats random by 5 points.

Round time: a bank of 10,000 items (the digits' vectors, each repeated with a little
noise) with 100 labels per class: one round of `head train` plus `suggest` (diverse).
Target: under 1 s.

Audit: every bank item labelled, 5 % of the labels flipped to another class at
random, index rebuilt and head retrained on the noisy labels; the top-N of
`featurebank audit` (N = 1x, 1.5x, 2x the number flipped) is scored by precision and
recall (the audit lists only items it disagrees with, so its list may be shorter
than N). Beside it, what a user would otherwise do: rank by the out-of-fold
probability of the given label from scikit-learn's standardised LogisticRegression
(5-fold cross_val_predict, confident-learning style). Target: recall >= 0.8 at precision >= 0.5.

    python benchmarks/labelling_bench.py [--quick] [--draws N] [--rounds R] [--batch B] [--noise F]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from classify_quality import backbone_path, digits_data  # noqa: E402

from featurebank.core.vocabulary import SUGGEST_STRATEGIES  # noqa: E402

LR_LOOP = "LR margin"
STRATEGIES = ("random", *SUGGEST_STRATEGIES, LR_LOOP)
CHECKED = "diverse"
TEST_FRACTION = 0.3
ROUND_ITEMS, ROUND_PER_CLASS, ROUND_LIMIT_S = 10_000, 100, 1.0
COLD_GAIN = 0.05


def spec_for(dim: int) -> Any:
    from featurebank.core.spec import Spec

    return Spec("external", "external", None, "none", "none", "none", dim)


def split_pool_test(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    pool, test = train_test_split(idx, test_size=TEST_FRACTION, stratify=y, random_state=seed)
    return np.sort(pool), np.sort(test)


def make_bank(root: Path, feats: np.ndarray, keys: list[str], labels: list[str | None]) -> Path:
    from featurebank import store as store_mod
    from featurebank.index.build import build_index

    with store_mod.create(root, spec_for(feats.shape[1])) as st:
        st.put_batch(keys, feats, labels=labels, splits=["train"] * len(keys))
    build_index(root, transform="cl2n", metric="cosine", factory="Flat", k=10)
    return root


def retrain_and_score(bank: Path, x_test: np.ndarray, y_test: list[str]) -> float:
    from featurebank.classify.classifier import Classifier
    from featurebank.classify.head_training import train_head

    train_head(bank, stacked=False)
    with Classifier(bank) as clf:
        p, vocab = clf.predict_proba(x_test)
    return float(np.mean(np.asarray(vocab)[p.argmax(axis=1)] == np.asarray(y_test)))


def active_run(
    strategy: str, feats: np.ndarray, y: np.ndarray, pool: np.ndarray, test: np.ndarray,
    rounds: int, batch: int, seed: int, tmp: Path,
) -> tuple[list[float], float]:
    """Test accuracy after 0, batch, 2*batch, ... added labels; and seconds spent choosing."""
    from featurebank import store as store_mod
    from featurebank.classify.classifier import Classifier
    from featurebank.classify.suggest import suggest

    rng = np.random.default_rng(seed)
    names = np.array([str(c) for c in y])
    start = np.array([rng.choice(pool[y[pool] == c]) for c in np.unique(y)])
    keys = [f"d{i}" for i in pool]
    first = set(start.tolist())
    labels = [names[i] if i in first else None for i in pool]
    bank = make_bank(tmp / f"{strategy}-{seed}", feats[pool], keys, labels)
    truth = {f"d{i}": names[i] for i in pool}
    score = lr_score if strategy == LR_LOOP else retrain_and_score
    acc = [score(bank, feats[test], list(names[test]))]
    choosing = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        if strategy == LR_LOOP:
            chosen = lr_margin_pick(bank, batch)
        elif strategy == "random":
            with store_mod.open(bank, readonly=True) as st:
                items = st.to_numpy()
                unl = [k for k, lab in zip(items.keys, items.labels, strict=True) if lab is None]
            chosen = list(rng.choice(unl, batch, replace=False))
        else:
            with Classifier(bank) as clf:
                chosen = [s.key for s in suggest(clf, n=batch, strategy=strategy, seed=seed)]
        choosing += time.perf_counter() - t
        with store_mod.open(bank) as st:
            st.set_labels({k: truth[k] for k in chosen})
        acc.append(score(bank, feats[test], list(names[test])))
    return acc, choosing


def _labelled(bank: Path) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    from featurebank import store as store_mod

    with store_mod.open(bank, readonly=True) as st:
        items = st.to_numpy()
    has = np.array([lab is not None for lab in items.labels])
    return items.vectors, has, items.keys, np.array([str(lab) for lab in items.labels])


def lr_margin_pick(bank: Path, batch: int) -> list[str]:
    """What a user writes by hand: LogisticRegression() on the labels, smallest margins."""
    from sklearn.linear_model import LogisticRegression

    x, has, keys, labels = _labelled(bank)
    p = LogisticRegression().fit(x[has], labels[has]).predict_proba(x[~has])
    top2 = -np.partition(-p, 1, axis=1)[:, :2]
    order = np.argsort(top2[:, 0] - top2[:, 1], kind="stable")[:batch]
    unl = np.flatnonzero(~has)
    return [keys[unl[i]] for i in order]


def lr_score(bank: Path, x_test: np.ndarray, y_test: list[str]) -> float:
    from sklearn.linear_model import LogisticRegression

    x, has, _, labels = _labelled(bank)
    lr = LogisticRegression().fit(x[has], labels[has])
    return float(np.mean(lr.predict(x_test) == np.asarray(y_test)))


def cold_start_run(
    feats: np.ndarray, y: np.ndarray, pool: np.ndarray, test: np.ndarray, batch: int,
    seed: int, tmp: Path,
) -> dict[str, float]:
    """Test accuracy after a first round of `batch` labels on a bank with none."""
    from featurebank import store as store_mod
    from featurebank.classify.classifier import Classifier
    from featurebank.classify.suggest import suggest

    names = np.array([str(c) for c in y])
    keys = [f"d{i}" for i in pool]
    truth = dict(zip(keys, names[pool], strict=True))
    out = {}
    for how in ("random", "cold start"):
        bank = make_bank(tmp / f"cold-{how.replace(' ', '_')}-{seed}", feats[pool], keys,
                         [None] * len(pool))
        if how == "random":
            chosen = list(np.random.default_rng(seed).choice(keys, batch, replace=False))
        else:
            with Classifier(bank) as clf:
                chosen = [s.key for s in suggest(clf, n=batch, seed=seed)]
        with store_mod.open(bank) as st:
            st.set_labels({k: truth[k] for k in chosen})
        out[how] = retrain_and_score(bank, feats[test], list(names[test]))
    return out


def round_time(feats: np.ndarray, y: np.ndarray, tmp: Path) -> tuple[float, float, float]:
    """(head train s, suggest s, total s) of one round at ROUND_ITEMS items."""
    from featurebank.classify.classifier import Classifier
    from featurebank.classify.head_training import train_head
    from featurebank.classify.suggest import suggest

    rng = np.random.default_rng(0)
    pick = rng.choice(len(y), ROUND_ITEMS)
    spread = float(feats.std())
    x = (feats[pick] + 0.05 * spread * rng.normal(size=(ROUND_ITEMS, feats.shape[1])))
    labels: list[str | None] = [None] * ROUND_ITEMS
    for c in np.unique(y):
        for i in np.flatnonzero(y[pick] == c)[:ROUND_PER_CLASS]:
            labels[i] = str(c)
    bank = make_bank(tmp / "round", x.astype(np.float32), [f"r{i}" for i in range(ROUND_ITEMS)],
                     labels)
    train_head(bank, stacked=False)  # a first head, as a bank in use has
    t = time.perf_counter()
    train_head(bank, stacked=False)
    trained = time.perf_counter()
    with Classifier(bank) as clf:
        suggest(clf, n=20, strategy=CHECKED)
    done = time.perf_counter()
    return trained - t, done - trained, done - t


def audit_run(
    feats: np.ndarray, y: np.ndarray, pool: np.ndarray, noise: float, seed: int, tmp: Path,
) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featurebank.classify.audit import audit
    from featurebank.classify.classifier import Classifier
    from featurebank.classify.head_training import train_head

    rng = np.random.default_rng(seed)
    yp = y[pool].copy()
    n_flip = round(noise * len(pool))
    flipped = rng.choice(len(pool), n_flip, replace=False)
    noisy = yp.copy()
    for i in flipped:
        noisy[i] = rng.choice([c for c in np.unique(y) if c != yp[i]])
    keys = [f"d{i}" for i in pool]
    wrong = {keys[i] for i in flipped}
    bank = make_bank(tmp / f"audit-{seed}", feats[pool], keys, [str(c) for c in noisy])
    train_head(bank, stacked=False)
    sizes = {"1x": n_flip, "1.5x": round(1.5 * n_flip), "2x": 2 * n_flip}
    out: dict[str, Any] = {"flipped": n_flip, "items": len(pool), "sizes": sizes}

    def score(ranked: list[str]) -> dict[str, tuple[float, float]]:
        res = {}
        for name, n in sizes.items():
            top = ranked[:n]
            hits = len(set(top) & wrong)
            res[name] = (hits / max(len(top), 1), hits / n_flip)
        return res

    with Classifier(bank) as clf:
        for mode in ("knn", "hybrid"):
            t = time.perf_counter()
            found = audit(clf, n=2 * n_flip, mode=mode)
            out[f"seconds {mode}"] = time.perf_counter() - t
            out[f"featurebank audit ({mode})"] = score([f.key for f in found])
    t = time.perf_counter()
    lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    oof = cross_val_predict(lr, feats[pool], noisy, cv=5, method="predict_proba")
    classes = np.unique(noisy)
    given = oof[np.arange(len(pool)), np.searchsorted(classes, noisy)]
    out["seconds sklearn"] = time.perf_counter() - t
    out["sklearn logreg OOF"] = score([keys[i] for i in np.argsort(given, kind="stable")])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 draw of 2 rounds; targets reported, judged by the full run")
    parser.add_argument("--draws", type=int, default=None, help="random starts per strategy")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of added labels")
    parser.add_argument("--batch", type=int, default=20, help="labels added per round")
    parser.add_argument("--noise", type=float, default=0.05, help="fraction of labels flipped")
    args = parser.parse_args(argv)
    args.draws = args.draws or (1 if args.quick else 2)
    if args.quick:
        args.rounds = min(args.rounds, 2)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.ERROR)

    from featurebank.embedder.embedding import Embedder

    started = time.time()
    path = backbone_path()
    pixels, _, y = digits_data()
    emb = Embedder.create(str(path), layer="features", image_size=28, dtype="float32")
    feats = emb.forward(pixels)
    print(f"backbone {path.name} (frozen, {feats.shape[1]}-d); sklearn load_digits, {len(y)} "
          f"images; {args.draws} draws; rounds of {args.batch} labels", flush=True)

    budgets = [args.batch * r for r in range(args.rounds + 1)]
    curves: dict[str, list[list[float]]] = {s: [] for s in STRATEGIES}
    choosing: dict[str, float] = dict.fromkeys(STRATEGIES, 0.0)
    limit: list[float] = []
    audits: list[dict[str, Any]] = []
    cold: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="fb-labelling-") as tmp_dir:
        tmp = Path(tmp_dir)
        for d in range(args.draws):
            pool, test = split_pool_test(y, seed=d)
            for s in STRATEGIES:
                acc, secs = active_run(s, feats, y, pool, test, args.rounds, args.batch,
                                       seed=100 + d, tmp=tmp)
                curves[s].append(acc)
                choosing[s] += secs
                print(f"  draw {d} {s:<8} " + " ".join(f"{a:.3f}" for a in acc)
                      + f"  ({time.time() - started:.0f}s)", flush=True)
            cold.append(cold_start_run(feats, y, pool, test, args.batch, seed=200 + d, tmp=tmp))
            full = make_bank(tmp / f"full-{d}", feats[pool], [f"d{i}" for i in pool],
                             [str(c) for c in y[pool]])
            limit.append(retrain_and_score(full, feats[test], [str(c) for c in y[test]]))
            audits.append(audit_run(feats, y, pool, args.noise, seed=d, tmp=tmp))
            print(f"  draw {d} audit done ({time.time() - started:.0f}s)", flush=True)
        timing = round_time(feats, y, tmp)

    mean = {s: np.mean(curves[s], axis=0) for s in STRATEGIES}
    start_labels = len(np.unique(y))
    print()
    print(f"test accuracy (featurebank: default mode, head retrained each round; {LR_LOOP}: "
          f"its own LogisticRegression) vs labels added to the first {start_labels}, "
          f"mean of {args.draws} draws")
    print(f"{'added':<10}" + "".join(f"{b:>9}" for b in budgets))
    for s in STRATEGIES:
        print(f"{s:<10}" + "".join(f"{a:>9.4f}" for a in mean[s]))
    gap = mean[CHECKED][1:] - mean[LR_LOOP][1:]
    print(f"{CHECKED + ' - LR':<10}" + f"{'':>9}" + "".join(f"{g:>+9.4f}" for g in gap))
    lim = float(np.mean(limit))
    print(f"{'all labels':<10}{lim:>9.4f}  (limit: every one of the {len(pool)} bank items "
          "labelled)")
    print()
    goal = float(mean["random"][-1])
    print(f"labels needed to reach random's accuracy at {budgets[-1]} added ({goal:.4f}):")
    needed: dict[str, int | None] = {}
    for s in STRATEGIES:
        hit = [b for b, a in zip(budgets, mean[s], strict=True) if a >= goal]
        needed[s] = hit[0] if hit else None
        ratio = "" if not hit else f"  ({hit[0] / budgets[-1]:.2f}x random's labels)"
        at_end = f"; at {budgets[-1]}: {mean[s][-1]:.4f} = {mean[s][-1] / lim:.3f}x the limit"
        print(f"  {s:<10}{'not reached' if not hit else hit[0]:>12}{ratio}{at_end}")
    per_round = {s: 1000 * choosing[s] / (args.draws * args.rounds) for s in STRATEGIES}
    print("ms to choose a round: " + ", ".join(f"{s} {v:.0f}" for s, v in per_round.items()))
    print()
    rows = ("featurebank audit (knn)", "featurebank audit (hybrid)", "sklearn logreg OOF")
    first = audits[0]
    print(f"audit: {first['flipped']} of {first['items']} labels flipped ({args.noise:.0%}), "
          f"precision / recall of the top N, mean of {args.draws} draws")
    print(f"{'':<28}" + "".join(f"{'N=' + k + f' ({v})':>20}" for k, v in first["sizes"].items()))
    summary: dict[str, dict[str, tuple[float, float]]] = {}
    for r in rows:
        summary[r] = {
            k: (float(np.mean([a[r][k][0] for a in audits])),
                float(np.mean([a[r][k][1] for a in audits])))
            for k in first["sizes"]
        }
        print(f"{r:<28}" + "".join(f"{p:>11.3f} / {rc:.3f}" for p, rc in summary[r].values()))
    print("limit: 1.000 / 1.000 at N=1x")
    for mode in ("knn", "hybrid"):
        secs = np.mean([a[f"seconds {mode}"] for a in audits])
        print(f"audit ({mode}) {1000 * secs:.0f} ms for {first['items']} items; "
              f"sklearn OOF {1000 * np.mean([a['seconds sklearn'] for a in audits]):.0f} ms")
    print()
    cold_mean = {k: float(np.mean([c[k] for c in cold])) for k in ("random", "cold start")}
    print(f"cold start, first round of {args.batch} labels on a bank with none: "
          f"suggest {cold_mean['cold start']:.4f}, random {cold_mean['random']:.4f} "
          f"({cold_mean['cold start'] - cold_mean['random']:+.4f})")
    print(f"round at {ROUND_ITEMS} items, {ROUND_PER_CLASS} labelled per class: head train "
          f"{timing[0]:.2f}s + suggest ({CHECKED}) {timing[1]:.2f}s = {timing[2]:.2f}s "
          f"(limit {ROUND_LIMIT_S:.0f}s; {timing[2] / ROUND_LIMIT_S:.2f}x the limit)")
    print()
    goal_at = 100 if 100 in budgets else budgets[-1]
    goal100 = float(mean["random"][budgets.index(goal_at)])
    hit = [b for b, a in zip(budgets, mean[CHECKED], strict=True) if a >= goal100]
    reached = hit[0] if hit else None
    checks = [
        (f"{CHECKED} reaches random@{goal_at} ({goal100:.4f}) with <= {round(0.4 * goal_at)} "
         "labels", reached is not None and reached <= 0.4 * goal_at,
         f"{reached if reached is not None else 'not reached'}"),
        (f"{CHECKED} >= {LR_LOOP} at every budget {budgets[1]}..{budgets[-1]}",
         bool((gap >= 0).all()), f"worst {gap.min():+.4f}"),
        (f"cold start >= random + {COLD_GAIN:.2f} on the first round",
         cold_mean["cold start"] >= cold_mean["random"] + COLD_GAIN,
         f"{cold_mean['cold start'] - cold_mean['random']:+.4f}"),
        (f"a round under {ROUND_LIMIT_S:.0f}s at {ROUND_ITEMS} items", timing[2] < ROUND_LIMIT_S,
         f"{timing[2]:.2f}s"),
    ]
    for r in rows[:2]:
        ok = [k for k, (p, rc) in summary[r].items() if rc >= 0.8 and p >= 0.5]
        checks.append((f"{r}: recall >= 0.8 at precision >= 0.5", bool(ok),
                       f"at N={ok[0]}" if ok else "no N"))
    for text, ok, got in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}: {got}")
    print(f"\n({time.time() - started:.0f}s total)")
    failed = sum(not ok for _, ok, _ in checks)
    print(f"{len(checks) - failed} of {len(checks)} checks passed")
    if args.quick:  # a smoke run on one draw: the targets are judged by the full run
        print("(--quick: checks reported; the full run exits 1 when one fails)")
        return 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
