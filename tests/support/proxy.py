"""A real nginx in front of a primary and its replicas, on loopback, in a temp folder.

The configuration is the one docs/scale.md shows: `grpc_pass` to an upstream of replicas
for reads, every other method of the service routed to the primary by its path (the list
comes from the auth table, so a new write RPC cannot be sent to a replica by mistake).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from featurebank.server.auth import READ, SERVICE, required_role
from featurebank.server.client import FeatureBankClient, RemoteError
from featurebank.v1 import featurebank_pb2
from tests.support.server import free_port

NGINX_PATHS = ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
ROOT = Path(__file__).resolve().parents[2]


RETRIES = 5
"""The clients' retry policy in the tests and the benchmark: UNAVAILABLE is retried this many
times, each after `backoff(attempt)` seconds."""


def backoff(attempt: int) -> float:
    """0.1, 0.2, 0.4, 0.8, 1.6 s: 3.1 s in all, longer than nginx's fail_timeout (when every
    replica was marked failed at once, nginx answers 502, which gRPC clients see as UNAVAILABLE)."""
    return float(0.1 * 2**attempt)


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    return found or next((p for p in NGINX_PATHS if Path(p).exists()), None)


def primary_methods() -> list[str]:
    """The service's methods that only the primary serves (writes, lifecycle, replication)."""
    service = featurebank_pb2.DESCRIPTOR.services_by_name["FeatureBank"]
    return sorted(m.name for m in service.methods if required_role(SERVICE + m.name) != READ)


def nginx_config(folder: Path, listen: int, primary: str, replicas: Sequence[str]) -> str:
    """nginx.conf for `nginx -p folder -c nginx.conf`: reads to the replicas, writes to the
    primary; a replica that fails `max_fails` times is skipped for `fail_timeout`, and a
    call it could not answer is sent to the next one."""
    servers = "\n".join(f"        server {r} max_fails=3 fail_timeout=1s;" for r in replicas)
    writes = "|".join(primary_methods())
    return f"""daemon off;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    upstream featurebank_replicas {{
{servers}
        keepalive 32;
    }}
    upstream featurebank_primary {{
        server {primary};
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{listen} http2;
        client_max_body_size 64m;
        grpc_read_timeout 600s;
        grpc_send_timeout 600s;
        location ~ ^/featurebank\\.v1\\.FeatureBank/({writes})$ {{
            grpc_pass grpc://featurebank_primary;
        }}
        location / {{
            grpc_pass grpc://featurebank_replicas;
            grpc_next_upstream error timeout http_502 http_503 non_idempotent;
            grpc_next_upstream_tries 3;
            grpc_connect_timeout 5s;
        }}
    }}
}}
"""


class Serving:
    """`featurebank serve ARGS` in its own process on a fixed port (so it can be restarted)."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in stop()
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    def start(self) -> None:
        cmd = [sys.executable, "-m", "featurebank", "serve", "--port", str(self.port),
               "--grace", "1", *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=self.log,
                                     text=True)
        with FeatureBankClient(self.target) as c:
            try:
                c.wait_until_serving(timeout=120)
            except RemoteError:
                text = self.output()[-3000:]
                self.stop()  # never leave a server running behind a failed start
                raise AssertionError(f"{self.target} never served:\n{text}") from None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> Serving:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Nginx:
    """nginx running the config above until `stop()`."""

    def __init__(self, folder: Path, primary: str, replicas: Sequence[str]) -> None:
        binary = nginx_binary()
        if binary is None:
            raise FileNotFoundError("nginx is not installed (.ci/run installs it)")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        (folder / "nginx.conf").write_text(nginx_config(folder, self.port, primary, replicas))
        self.proc = subprocess.Popen(
            [binary, "-p", str(folder), "-c", str(folder / "nginx.conf")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.proc.stderr.read() if self.proc.stderr else ''}"
                                   f"{self.errors()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nginx did not listen on {self.target}: {self.errors()}")
            time.sleep(0.05)

    def errors(self) -> str:
        log = self.folder / "error.log"
        return log.read_text()[-3000:] if log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def __enter__(self) -> Nginx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
