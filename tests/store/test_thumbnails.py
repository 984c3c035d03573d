"""Thumbnails in the store: written with their items, read by key, dropped with them."""

from __future__ import annotations

import io
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

from featurebank import store as store_mod
from featurebank.core.errors import InvalidInput, NotFound
from featurebank.embedder.images import thumbnail_jpeg
from tests.support.specs import make_spec, make_vectors


def jpeg(value: int, size: int = 120) -> bytes:
    return thumbnail_jpeg(np.full((size, size // 2, 3), value, np.uint8))


def test_thumbnail_is_a_small_jpeg_keeping_the_aspect() -> None:
    data = jpeg(200)
    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG" and im.size == (48, 96)


def test_thumbnails_follow_their_items(store: store_mod.Store) -> None:
    keys = [f"k{i}" for i in range(6)]
    thumbs = [jpeg(10 * i) if i != 2 else None for i in range(6)]
    store.put_batch(keys, make_vectors(6), thumbnails=thumbs)
    got = store.thumbnails(["k5", "k2", "k0"])
    assert got == [thumbs[5], None, thumbs[0]]
    store.delete(["k5"])
    store.put_batch(["k0"], make_vectors(1, seed=3), replace=True)  # replaced without one
    assert store.thumbnails(["k0", "k1"]) == [None, thumbs[1]]
    with pytest.raises(NotFound, match="k5"):
        store.thumbnails(["k5"])
    store.compact()
    assert store.thumbnails(["k1", "k4"]) == [thumbs[1], thumbs[4]]


def test_bad_thumbnails_are_refused_before_anything_is_written(store: store_mod.Store) -> None:
    with pytest.raises(InvalidInput, match="thumbnail of key 'b' is not a JPEG"):
        store.put_batch(["a", "b"], make_vectors(2), thumbnails=[jpeg(1), b"PNG..."])
    with pytest.raises(InvalidInput, match="1 thumbnails for 2 keys"):
        store.put_batch(["a", "b"], make_vectors(2), thumbnails=[jpeg(1)])
    big = b"\xff\xd8\xff" + bytes(70_000)
    with pytest.raises(InvalidInput, match="thumbnail of key 'a' has 70003 bytes"):
        store.put_batch(["a"], make_vectors(1), thumbnails=[big])
    assert store.count == 0


def test_a_store_made_before_thumbnails_opens_and_has_none(bank: Path) -> None:
    with store_mod.create(bank, make_spec()) as st:
        st.put_batch(["old"], make_vectors(1))
    env_dir = next((bank / "store").glob("env-*"))
    env = lmdb.open(str(env_dir), max_dbs=16)  # what an older featurebank wrote: no thumbs
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"thumbs", txn=txn), delete=True)
    with env.begin() as txn:
        assert txn.get(b"thumbs") is None
    env.close()
    with store_mod.open(bank) as st:
        assert st.thumbnails(["old"]) == [None]
        st.put_batch(["new"], make_vectors(1, seed=1), thumbnails=[jpeg(5)])
        assert st.thumbnails(["new"]) == [jpeg(5)]
