"""The shipped source backbone: small, the documented shape, and still good at its source task."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from featurebank.embedder import source_model


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return keras.models.load_model(source_model.MODEL_PATH)


def test_file_is_small_and_has_a_model_card() -> None:
    assert source_model.MODEL_PATH.stat().st_size < 4 * 1024 * 1024
    card = (source_model.MODELS_DIR / source_model.CARD_FILE).read_text()
    for needle in ("mnist_data", "28x28x3", "`features`", "make source-model", "Held-out accuracy"):
        assert needle in card


def test_architecture_and_feature_layer(model: keras.Model) -> None:
    assert tuple(model.input.shape) == (None, 28, 28, 3)
    assert isinstance(model.layers[1], keras.layers.Rescaling)  # takes raw 0-255 pixels
    features = model.get_layer(source_model.FEATURE_LAYER)
    assert isinstance(features, keras.layers.Dense)
    assert tuple(features.output.shape) == (None, source_model.FEATURE_DIM)
    assert tuple(model.output.shape) == (None, 10)


def test_classifies_held_out_mnist(model: keras.Model) -> None:
    split = source_model.load_mnist_split()
    x, y = split.x_test[:500], split.y_test[:500]
    probs = model.predict(x.astype("float32"), batch_size=250, verbose=0)
    assert float(np.mean(np.argmax(probs, axis=1) == y)) > 0.9
    # the feature layer is usable on its own, as the embedder uses it
    extractor = keras.Model(model.input, model.get_layer(source_model.FEATURE_LAYER).output)
    feats = extractor.predict(x[:8].astype("float32"), verbose=0)
    assert feats.shape == (8, source_model.FEATURE_DIM) and np.isfinite(feats).all()
