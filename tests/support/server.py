"""Helpers for the server tests: real banks, a real server in a thread, real certificates."""

from __future__ import annotations

import asyncio
import datetime
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featurebank.server.app import FeatureBankServer, ServeConfig

CLASSES = ("cat", "dog", "fox")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def class_centers(dim: int, classes: Sequence[str] = CLASSES, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(len(classes), dim)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def clustered(
    n_per_class: int, dim: int, classes: Sequence[str] = CLASSES, seed: int = 1, noise: float = 0.05
) -> tuple[list[str], np.ndarray, list[str]]:
    """Keys, vectors and labels of well separated clusters (one per class)."""
    rng = np.random.default_rng(seed)
    centers = class_centers(dim, classes)
    keys: list[str] = []
    vecs: list[np.ndarray] = []
    labels: list[str] = []
    for ci, name in enumerate(classes):
        for j in range(n_per_class):
            keys.append(f"{name}/{seed}-{j}")
            vecs.append(centers[ci] + noise * rng.normal(size=dim).astype(np.float32))
            labels.append(name)
    return keys, np.stack(vecs).astype(np.float32), labels


def make_vector_bank(
    root: Path,
    *,
    dim: int = 16,
    n_per_class: int = 40,
    index: bool = True,
    head: bool = False,
) -> Path:
    """A bank of external vectors with train/val splits, optionally with index and head."""
    from featurebank import store as store_mod
    from featurebank.core.spec import Spec

    spec = Spec(backbone="external", weights="external", input_size=None, resize="none",
                dim=dim, dtype="float32")
    keys, vectors, labels = clustered(n_per_class, dim)
    splits = ["val" if i % 5 == 0 else "train" for i in range(len(keys))]
    with store_mod.create(root, spec) as st:
        st.put_batch(keys, vectors, labels=labels, splits=splits)
    if index:
        from featurebank.index.build import build_index

        build_index(root)
    if head:
        from featurebank.classify.head_training import train_head

        train_head(root, epochs=30)
    return root


class RunningServer:
    """A FeatureBankServer on its own event loop thread, for blocking tests."""

    def __init__(self, config: ServeConfig) -> None:
        if config.port == 50051:
            config.port = free_port()
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = FeatureBankServer(config)
        try:
            self.run(self.server.start(), timeout=300)
        except BaseException:
            self._stop_loop()
            raise

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stop(self, grace: float = 1.0) -> None:
        try:
            self.run(self.server.stop(grace), timeout=120)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_certs(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def write(path: Path, data: bytes) -> Path:
        path.write_bytes(data)
        return path

    def pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key = key()
    ca = (
        x509.CertificateBuilder().subject_name(name("featurebank test CA"))
        .issuer_name(name("featurebank test CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: Any, san: list[x509.GeneralName] | None) -> tuple[bytes, bytes]:
        k = key()
        b = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
            .public_key(k.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), pem_key(k)

    server_cert, server_key = leaf(
        "localhost", ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_cert, client_key = leaf("featurebank client", ExtendedKeyUsageOID.CLIENT_AUTH, None)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "ca": write(folder / "ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
        "server_cert": write(folder / "server.pem", server_cert),
        "server_key": write(folder / "server.key", server_key),
        "client_cert": write(folder / "client.pem", client_cert),
        "client_key": write(folder / "client.key", client_key),
    }


COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def color_images(n_per_color: int, size: int = 40, seed: int = 0) -> list[tuple[str, bytes]]:
    """(color, PNG bytes) of noisy solid-colour images: trivially separable classes."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    out: list[tuple[str, bytes]] = []
    for name, rgb in COLORS.items():
        for _ in range(n_per_color):
            px = np.clip(np.array(rgb) + rng.normal(0, 12, (size, size, 3)), 0, 255)
            buf = io.BytesIO()
            Image.fromarray(px.astype(np.uint8)).save(buf, format="PNG")
            out.append((name, buf.getvalue()))
    return out


def tiny_keras_model(path: Path, features: int = 16) -> Path:
    """A small random conv net saved as .keras: a custom backbone with `features`-d pooled
    features."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.Conv2D(features, 3, strides=2, activation="relu", name="features"),
    ])
    model.save(path)
    return path


def make_image_bank(
    root: Path, n_per_color: int = 6, features: int = 16, prefix: str = "",
) -> tuple[Path, Path]:
    """A bank embedded with a tiny custom .keras model through the Embedder, keys
    `{prefix}{color}/{i}`; (bank, model)."""
    from featurebank import store as store_mod
    from featurebank.embedder.embedding import Embedder

    root.mkdir(parents=True, exist_ok=True)
    model = tiny_keras_model(root.parent / f"{root.name}-tiny.keras", features)
    embedder = Embedder.create(str(model), image_size=32, pooling="avg", dtype="float32")
    pictures = color_images(n_per_color)
    vectors = embedder.embed_images([b for _, b in pictures])
    with store_mod.create(root, embedder.spec) as st:
        st.put_batch([f"{prefix}{c}/{i}" for i, (c, _) in enumerate(pictures)], vectors,
                     labels=[c for c, _ in pictures], splits=["train"] * len(pictures))
    from featurebank.index.build import build_index

    build_index(root, k=5)
    return root, model
