"""Fine-tuning the top of a bank's backbone together with its trained head (LP-FT).

The Keras transfer-learning recipe, in the order of Kumar et al. (ICLR 2022, "linear
probe, then fine-tune"): start from the frozen backbone plus the linear probe already
solved on its features (a random head's first gradients would distort the features),
unfreeze only the top N layers, keep BatchNorm in inference mode (its layers stay
frozen: its statistics were fitted on far more data than we have), and train with
Adam until the loss on a validation split carved from the labelled images stops
falling (`patience` epochs), keeping the best epoch's weights. The backbone's own
dropout stays active while training (Keras runs a nested model's layers in the outer
model's training mode). The defaults were chosen by benchmarks/finetune_bench.py
(face crops through the shipped digits CNN, seeds other than the benchmark's).
What comes out is a *backbone* (image -> feature vector, preprocessing folded in)
that `featurebank embed --backbone X.keras` accepts; its features differ from the
bank's, so it goes into a new bank. The held-out accuracy is measured before
(backbone + probe) and after tuning; a tuned backbone that is worse is not written
unless `force` says so. One seed fixes the split, the batch order, the dropout and
any random initialisation, so a run is reproducible on one machine.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from featurebank.core.bank import Bank
from featurebank.core.errors import FailedPrecondition, InvalidInput
from featurebank.core.vocabulary import HEAD_INITS, check_choice
from featurebank.embedder.backbones import PREPROCESSING, global_pool

log = logging.getLogger(__name__)

# rgb_to_grayscale's weights (tf.image), for models that take one channel
_GRAY = np.array([0.2989, 0.587, 0.114], np.float32)


def preprocessing_affine(mode: str, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Kernel (3, channels) and bias (channels,) so that raw 0-255 RGB @ kernel + bias equals
    the embedder's preprocessing (and grey conversion for one-channel models).

    Why: every preprocessing featurebank knows is per-pixel affine, so a fixed 1x1
    convolution bakes it into the exported model and `embed` needs no extra option.
    """
    if mode not in (*PREPROCESSING, "none"):
        raise InvalidInput(f"cannot fold preprocessing {mode!r} into an exported backbone")
    k, b = PREPROCESSING["raw0-255" if mode == "none" else mode].affine()
    if channels == 1:
        k, b = k @ _GRAY[:, None], np.array([b @ _GRAY], np.float32)
    return k.astype(np.float32), b.astype(np.float32)


def _load_images(
    images: str, size: tuple[int, int], resize: str, vocabulary: list[str], bank_labels: Any
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pixels (n, h, w, 3) uint8 and label codes of the labelled, decodable inputs."""
    from featurebank.embedder import sources
    from featurebank.embedder.images import ImageError

    src = sources.open_source(images, labels="folders")
    code = {label: i for i, label in enumerate(vocabulary)}
    pixels: list[np.ndarray] = []
    ys: list[int] = []
    skipped = 0
    try:
        for rec in src.records:
            label = rec.label if rec.label is not None else bank_labels(rec.key)
            if label not in code:
                skipped += 1
                continue
            try:
                px, _ = src.load(rec, size, resize)
            except ImageError as e:
                log.warning("skipping %s: %s", rec.key, e)
                skipped += 1
                continue
            pixels.append(px)
            ys.append(code[label])
    finally:
        src.close()
    if not pixels:
        raise InvalidInput(
            f"no usable images in {images}: none has a label the head knows "
            f"({', '.join(vocabulary[:10])}{'...' if len(vocabulary) > 10 else ''})"
        )
    return np.stack(pixels), np.array(ys, np.int64), skipped


def _split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = int(round(fraction * len(idx))) if len(idx) >= 3 else 0
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return np.array(sorted(train), np.int64), np.array(sorted(val), np.int64)


def weighted_layers(model: Any) -> list[Any]:
    """Layers that hold weights, input to output (a nested model counts as its layers)."""
    out: list[Any] = []
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            out.extend(weighted_layers(layer))
        elif layer.weights:
            out.append(layer)
    return out


def unfreeze_top(model: Any, n: int) -> list[str]:
    """Make only the top `n` weighted layers trainable; BatchNorm stays frozen. Returns names."""
    import keras

    model.trainable = True
    layers = weighted_layers(model)
    for layer in layers:
        layer.trainable = False
    opened: list[str] = []
    for layer in layers[-n:] if n > 0 else []:
        if isinstance(layer, keras.layers.BatchNormalization):
            continue
        layer.trainable = True
        opened.append(layer.name)
    return opened


def reinitialise(model: Any, seed: int) -> None:
    """Glorot-uniform kernels and zero biases for every dense layer (a head not from the probe)."""
    import keras

    for i, layer in enumerate(weighted_layers(model)):
        kernel, bias = layer.get_weights()
        init = keras.initializers.GlorotUniform(seed=seed + i)
        layer.set_weights([np.asarray(init(kernel.shape)), np.zeros_like(bias)])


def finetune(
    images: str,
    bank: str | Path | Bank,
    out: str | Path,
    unfreeze: int = 2,
    lr: float = 1e-3,
    epochs: int = 60,
    augment: bool = False,
    batch_size: int = 32,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = False,
    force: bool = False,
    head_init: str = "probe",
    patience: int = 10,
) -> dict[str, Any]:
    """Fine-tune the bank's backbone + head on labelled IMAGES; save the backbone to `out`.

    `published` in the summary says whether `out` was written: not when the held-out
    accuracy after tuning is under the one before, unless `force`. `epochs` is a budget:
    training stops after `patience` epochs without a lower validation loss and keeps the
    best epoch (patience 0: every epoch, the last kept). `head_init` "random" starts the
    head's dense layers at random instead of from the probe (plain fine-tuning, what LP-FT
    is measured against).
    """
    import keras

    from featurebank import store as store_mod
    from featurebank.classify.head_model import keras_head
    from featurebank.classify.published_heads import load_head
    from featurebank.embedder.embedding import Embedder

    b = Bank(bank)
    out = Path(out)
    if out.suffix != ".keras":
        raise InvalidInput(f"--out must name a .keras file, got {out}")
    check_choice(head_init, HEAD_INITS, "head_init")
    if unfreeze < 0 or epochs < 1 or lr <= 0 or patience < 0:
        raise InvalidInput(
            f"need unfreeze >= 0, epochs >= 1, lr > 0 and patience >= 0 "
            f"(got {unfreeze}, {epochs}, {lr}, {patience})"
        )
    started = time.time()
    with store_mod.open(b.root, readonly=True) as st:
        spec = st.spec
        if not spec.has_model or spec.input_size is None:
            raise FailedPrecondition(
                f"bank {b.root} holds external vectors: there is no backbone to fine-tune"
            )
        loaded = load_head(b)
        if loaded is None:
            raise FailedPrecondition(
                f"no head in {b.root}: run `featurebank head train` before fine-tuning"
            )

        def bank_label(key: str) -> str | None:
            return st.get_by_keys([key]).labels[0] if st.has(key) else None

        vocab = loaded.vocabulary
        pixels, y, skipped = _load_images(images, spec.input_size, spec.resize, vocab, bank_label)
    keras.utils.set_random_seed(seed)  # before the backbone: its layers draw their seeds
    backbone = Embedder.from_spec(spec, freeze=False).model  # only the Keras model is used
    channels = int(backbone.inputs[0].shape[-1])
    h, w = spec.input_size

    # image (raw 0-255) -> [augment] -> fixed preprocessing conv -> backbone -> [pool] -> head
    kernel, bias = preprocessing_affine(spec.preprocessing, channels)
    prep = keras.layers.Conv2D(channels, 1, name="preprocessing", trainable=False)
    inp = keras.Input((h, w, 3), name="image")
    x = inp
    if augment:
        for layer in (
            keras.layers.RandomTranslation(0.08, 0.08, fill_mode="nearest", seed=seed),
            keras.layers.RandomRotation(0.04, fill_mode="nearest", seed=seed),
            keras.layers.RandomZoom(0.08, fill_mode="nearest", seed=seed),
        ):
            x = layer(x)
    feats_in = prep(inp)
    prep.set_weights([kernel[None, None], bias])
    feats = global_pool(backbone(prep(x)), spec.pooling)
    exported = keras.Model(
        inp, global_pool(backbone(feats_in), spec.pooling), name="finetuned_backbone"
    )
    if int(exported.outputs[0].shape[-1]) != loaded.head.input_dim:
        raise FailedPrecondition(
            f"backbone gives {exported.outputs[0].shape[-1]} features, head expects "
            f"{loaded.head.input_dim}: retrain the head on this bank"
        )
    head = keras_head(loaded.head)
    if head_init == "random":
        reinitialise(head, seed)
    model = keras.Model(inp, head(feats), name="finetune")
    opened = unfreeze_top(backbone, unfreeze)
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    tr, va = _split(y, val_fraction, seed)
    xf = pixels.astype(np.float32)
    val = (xf[va], y[va]) if len(va) else None
    before = _accuracy(model, xf[va], y[va]) if len(va) else None
    stop = (
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
        if patience and len(va)
        else None
    )
    hist = model.fit(
        _batches(xf[tr], y[tr], min(batch_size, len(tr)), seed),
        validation_data=val,
        epochs=epochs,
        verbose=1 if progress else 0,
        shuffle=False,  # the batches are shuffled, reproducibly
        callbacks=[stop] if stop else [],
    )
    epochs_run = len(hist.history["loss"])
    after = _accuracy(model, xf[va], y[va]) if len(va) else None
    backbone.trainable = False
    worse = before is not None and after is not None and after < before
    published = force or not worse
    if published:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp.keras")
        exported.save(tmp)
        tmp.replace(out)
    else:
        log.warning(
            "fine-tuned backbone is worse on the held-out images (%.4f -> %.4f): %s not written",
            before, after, out,
        )
    summary = {
        "out": str(out),
        "images": int(len(y)),
        "skipped": skipped,
        "train": int(len(tr)),
        "val": int(len(va)),
        "classes": len(vocab),
        "unfrozen": opened,
        "epochs": epochs,
        "epochs_run": epochs_run,
        "best_epoch": stop.best_epoch + 1 if stop else epochs_run,
        "patience": patience,
        "lr": lr,
        "augment": augment,
        "head_init": head_init,
        "val_accuracy_before": before,
        "val_accuracy_after": after,
        "published": published,
        "curves": {k: [float(v) for v in vals] for k, vals in hist.history.items()},
        "seconds": round(time.time() - started, 2),
        "next": f"featurebank embed IMAGES --bank NEW_BANK --backbone {out}",
    }
    log.info(
        "fine-tuned %d layers on %d images in %.1fs -> %s",
        len(opened),
        len(y),
        summary["seconds"],
        out,
    )
    return summary


def _batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> Any:
    """Shuffled batches, a new order each epoch from `seed` alone (fit's own shuffle is not
    reproducible in the first fit of a process)."""
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((x, y))
    return data.shuffle(len(x), seed=seed, reshuffle_each_iteration=True).batch(batch_size)


def _accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    p = model.predict(x, verbose=0, batch_size=64)
    return float((np.argmax(p, axis=1) == y).mean())
