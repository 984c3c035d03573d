"""An operator's mistakes at start-up, and what tools and clients need from a running server.

Empty token files, TLS files that are garbage or do not belong together, the startup
line saying how the server is protected, tokens kept out of `ps`, reflection v1.
The `featurebank serve` cases run the real command in a subprocess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from featurebank.cli import main
from featurebank.core.errors import InvalidInput, NotFound
from featurebank.server.app import FeatureBankServer, ServeConfig
from featurebank.server.auth import Tokens
from tests.support.server import RunningServer, free_port, make_certs, make_vector_bank

DIM = 8
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_vector_bank(tmp_path_factory.mktemp("serve") / "bank", dim=DIM, n_per_class=6)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certs(tmp_path_factory.mktemp("certs"))


def serve(bank: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`featurebank serve` that is expected to refuse to start."""
    cmd = [sys.executable, "-m", "featurebank", "serve", "--bank", str(bank),
           "--port", str(free_port()), *extra]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATUREBANK_")}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


# ------------------------------------------------------------------ tokens


@pytest.mark.parametrize("text", ["", "\n\n", "# read r0\n   \n"], ids=["empty", "blank", "comments"])
def test_a_token_file_without_tokens_is_an_error(bank: Path, tmp_path: Path, text: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(InvalidInput, match="has no tokens"):
        Tokens.load(path, environ={})
    r = serve(bank, "--tokens", str(path))
    assert r.returncode == 2, r.stderr
    assert f"tokens file {path} has no tokens" in r.stderr and "Traceback" not in r.stderr


def test_unreadable_token_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        Tokens.load(tmp_path / "missing", environ={})
    with pytest.raises(InvalidInput, match="cannot be read"):
        Tokens.load(tmp_path, environ={})  # a folder
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00read")
    with pytest.raises(InvalidInput, match="not UTF-8"):
        Tokens.load(tmp_path / "bin", environ={})


def test_startup_line_states_tls_and_auth(bank: Path, certs: dict[str, Path],
                                          tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    secrets = ("read-secret-r0", "write-secret-w0", "write-secret-w1")
    tokens.write_text(f"read {secrets[0]}\nwrite {secrets[1]}\nwrite {secrets[2]}\n")
    for extra, expect in [
        ((), "(plaintext, auth off)"),
        (("--tokens", str(tokens), "--tls-cert", str(certs["server_cert"]),
          "--tls-key", str(certs["server_key"])), "(TLS, auth by tokens (1 read, 2 write))"),
    ]:
        cmd = [sys.executable, "-m", "featurebank", "serve", "--bank", str(bank),
               "--port", str(free_port()), *extra]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEATUREBANK_")}
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert expect in line, line
        assert not any(secret in line for secret in secrets)
        assert proc.returncode == 0


# ------------------------------------------------------------------ TLS files


def _bad_tls(certs: dict[str, Path], tmp: Path, case: str) -> tuple[dict[str, Path], str]:
    """TLS options with one thing wrong, and the words the error must say."""
    good = {"tls_cert": certs["server_cert"], "tls_key": certs["server_key"]}
    garbage = tmp / "garbage.pem"
    garbage.write_bytes(os.urandom(300))
    if case == "key of another certificate":
        return {**good, "tls_key": certs["client_key"]}, (
            f"--tls-key {certs['client_key']} does not match the certificate in --tls-cert "
            f"{certs['server_cert']}"
        )
    if case == "garbage certificate":
        return {**good, "tls_cert": garbage}, f"--tls-cert {garbage} holds no PEM certificate"
    if case == "garbage key":
        return {**good, "tls_key": garbage}, f"--tls-key {garbage} holds no PEM private key"
    if case == "certificate with broken base64":
        broken = tmp / "broken.pem"
        text = certs["server_cert"].read_text().splitlines()
        broken.write_text("\n".join(text[:3] + ["!!!!"] + text[4:]) + "\n")
        return {**good, "tls_cert": broken}, f"--tls-cert {broken} holds a malformed certificate"
    if case == "key given as certificate":
        return {**good, "tls_cert": certs["server_key"]}, "holds no PEM certificate"
    if case == "certificate given as key":
        return {**good, "tls_key": certs["server_cert"]}, "holds no PEM private key"
    if case == "encrypted key":
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(certs["server_key"].read_bytes(), None)
        enc = tmp / "enc.key"
        enc.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ))
        return {**good, "tls_key": enc}, f"--tls-key {enc} is encrypted"
    if case == "garbage client CA":
        return {**good, "tls_client_ca": garbage}, f"--tls-client-ca {garbage} holds no PEM"
    if case == "key is a folder":
        return {**good, "tls_key": tmp}, "is a folder"
    raise AssertionError(case)


TLS_CASES = ["key of another certificate", "garbage certificate", "garbage key",
             "certificate with broken base64", "key given as certificate",
             "certificate given as key", "encrypted key", "garbage client CA", "key is a folder"]


@pytest.mark.parametrize("case", TLS_CASES)
def test_bad_tls_files_are_named_before_binding(bank: Path, certs: dict[str, Path],
                                                tmp_path: Path, case: str) -> None:
    options, words = _bad_tls(certs, tmp_path, case)
    import asyncio

    port = free_port()
    server = None
    with pytest.raises(InvalidInput) as e:
        server = FeatureBankServer(ServeConfig(bank=bank, port=port, **options))  # type: ignore[arg-type]
        asyncio.run(server.start())
    assert words in str(e.value), str(e.value)
    assert server is None or server.port == 0  # nothing was bound


def test_serve_names_a_mismatched_key_without_a_traceback(bank: Path,
                                                          certs: dict[str, Path]) -> None:
    r = serve(bank, "--tls-cert", str(certs["server_cert"]), "--tls-key", str(certs["client_key"]))
    assert r.returncode == 2
    assert "does not match the certificate" in r.stderr and str(certs["client_key"]) in r.stderr
    assert "Traceback" not in r.stderr and "Failed to bind" not in r.stderr


# ------------------------------------------------------------------ clients and tools


@pytest.fixture(scope="module")
def served(bank: Path) -> Iterator[RunningServer]:
    tokens = Tokens({"read": ["r0"], "write": ["w0"]})
    with RunningServer(ServeConfig(bank=bank, port=free_port(), tokens=tokens)) as rs:
        yield rs


def test_client_commands_take_a_token_file(served: RunningServer, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "token"
    token.write_text("# the read token\nr0\n")
    code = main(["search", "--key", "dog/1-0", "--k", "2", "--server", served.target,
                 "--token-file", str(token)])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0 and len(out.strip().splitlines()) == 1 + 2, err  # a header, 2 neighbours
    token.write_text("# nothing here\n")
    code = main(["search", "--key", "dog/1-0", "--server", served.target,
                 "--token-file", str(token)])  # fmt: skip
    assert code == 2 and "holds no token" in capsys.readouterr().err
    code = main(["search", "--key", "dog/1-0", "--server", served.target,
                 "--token-file", str(tmp_path / "nope")])  # fmt: skip
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_help_says_where_a_token_is_safe(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("classify", "search", "upsert", "rebuild"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--token-file" in text and "ps" in text and "FEATUREBANK_TOKEN" in text


def _list_services(target: str, version: str) -> list[str]:
    from google.protobuf import descriptor_pool, message_factory

    pool = descriptor_pool.Default()
    package = f"grpc.reflection.{version}"
    request = message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"{package}.ServerReflectionRequest"))
    response = message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"{package}.ServerReflectionResponse"))
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(
            f"/{package}.ServerReflection/ServerReflectionInfo",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response.FromString,
        )
        answers = list(call(iter([request(list_services=""),
                                  request(file_containing_symbol="featurebank.v1.FeatureBank")]),
                            timeout=30))  # fmt: skip
    assert answers[1].file_descriptor_response.file_descriptor_proto  # the service is described
    return sorted(s.name for s in answers[0].list_services_response.service)


def test_reflection_v1_and_v1alpha_without_a_token(served: RunningServer) -> None:
    v1 = _list_services(served.target, "v1")
    v1alpha = _list_services(served.target, "v1alpha")
    assert v1 == v1alpha
    assert {"featurebank.v1.FeatureBank", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= set(v1)  # fmt: skip
