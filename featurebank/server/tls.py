"""The server's TLS files, checked before the server binds.

gRPC reads certificates and keys only when it binds, and then reports any problem as
"Failed to bind to address" with a traceback. Loading them first with the standard
library's `ssl` names the file and what is wrong with it: not PEM, an encrypted key, a
key that does not belong to the certificate.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from featurebank.core.errors import InvalidInput
from featurebank.core.files import read_named_file

_CERT = "-----BEGIN CERTIFICATE-----"


def _check_certificates(flag: str, path: Path, data: bytes) -> None:
    """At least one PEM certificate, each of which parses."""
    text = data.decode("ascii", "replace")
    if _CERT not in text:
        raise InvalidInput(f"{flag} {path} holds no PEM certificate (no '{_CERT}' line)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError) as e:
        raise InvalidInput(f"{flag} {path} holds a malformed certificate ({_reason(e)})") from None


def _check_key(cert_path: Path, key_path: Path, key: bytes) -> None:
    text = key.decode("ascii", "replace")
    if "PRIVATE KEY-----" not in text:
        raise InvalidInput(f"--tls-key {key_path} holds no PEM private key")
    if "ENCRYPTED" in text:
        raise InvalidInput(
            f"--tls-key {key_path} is encrypted with a passphrase; the server needs an "
            "unencrypted key (protect the file with permissions instead)"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert_path, key_path, password=b"")
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e) or "key values mismatch" in str(e):
            raise InvalidInput(
                f"--tls-key {key_path} does not match the certificate in --tls-cert {cert_path}"
            ) from None
        raise InvalidInput(f"--tls-key {key_path} is not a usable private key ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    reason = getattr(e, "reason", None)
    return str(reason or e).lower().replace("_", " ")


def server_credentials(
    cert: Path, key: Path, client_ca: Path | None = None
) -> grpc.ServerCredentials:
    """Credentials from checked PEM files; a bad file is an InvalidInput naming it."""
    cert_data = read_named_file("--tls-cert", cert)
    key_data = read_named_file("--tls-key", key)
    _check_certificates("--tls-cert", cert, cert_data)
    _check_key(cert, key, key_data)
    ca_data = None
    if client_ca is not None:
        ca_data = read_named_file("--tls-client-ca", client_ca)
        _check_certificates("--tls-client-ca", client_ca, ca_data)
    return grpc.ssl_server_credentials(
        [(key_data, cert_data)], root_certificates=ca_data, require_client_auth=ca_data is not None
    )
