"""Running the demo's `featurebank` commands and its background server, as a user would."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from featurebank.embedder.devices import NOISE, write_stderr

STEP_TIMEOUT_S = 600.0
SERVE_START_TIMEOUT_S = 180.0
SERVE_STOP_TIMEOUT_S = 60.0


class DemoFailed(Exception):
    """A step exited non-zero or did not produce what the next step needs."""


# ---------------------------------------------------------------------- running commands


def featurebank_command() -> list[str]:
    """The installed console script beside this interpreter, else `python -m featurebank`."""
    script = Path(sys.executable).parent / "featurebank"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "featurebank"]


def _read_all(src: Any, into: list[bytes]) -> None:
    into.append(src.read())


def _copy_filtered(src: Any) -> None:
    """Copy a child's stderr to ours as it comes (progress bars included), minus NOISE lines."""
    pending = b""
    while chunk := os.read(src.fileno(), 65536):
        pending += chunk
        parts = re.split(rb"(?<=[\r\n])", pending)
        pending = parts.pop()  # incomplete tail (may be b"")
        out = b"".join(p for p in parts if not NOISE.match(p))
        if out:
            write_stderr(out)
    if pending and not NOISE.match(pending):
        write_stderr(pending)


class Runner:
    """Prints each `featurebank ...` command as a user would type it, then runs it in workdir."""

    def __init__(self, workdir: Path, verbose: bool = False) -> None:
        self.workdir = workdir
        self.verbose = verbose
        self.base = featurebank_command()
        self.env = dict(os.environ)
        self.env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's own logging quiet
        self.env.setdefault("PYTHONUNBUFFERED", "1")

    def show(self, args: Sequence[str], display: str | None = None) -> None:
        print(f"\n$ {display or shlex.join(['featurebank', *args])}", flush=True)

    def run(self, args: Sequence[str], display: str | None = None, capture: bool = False) -> str:
        """Run `featurebank ARGS`; stdout is returned when captured, else it goes to ours."""
        self.show(args, display)
        proc = subprocess.Popen(
            [*self.base, *args],
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.PIPE if capture else None,
            stderr=None if self.verbose else subprocess.PIPE,
        )
        captured: list[bytes] = []
        readers = []
        if proc.stdout is not None:
            readers.append(threading.Thread(target=_read_all, args=(proc.stdout, captured)))
        if proc.stderr is not None:
            readers.append(threading.Thread(target=_copy_filtered, args=(proc.stderr,)))
        for t in readers:
            t.daemon = True
            t.start()
        try:
            proc.wait(timeout=STEP_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            proc.kill()
            proc.wait()
            raise DemoFailed(f"`featurebank {args[0]}` did not finish in {e.timeout:.0f}s") from e
        finally:
            for t in readers:
                t.join(timeout=10)
        text = b"".join(captured).decode(errors="replace")
        if proc.returncode != 0:
            print(text, end="")
            raise DemoFailed(f"`featurebank {args[0]}` exited with status {proc.returncode}")
        return text

    def start(self, args: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
        """Start a long-running command in the background, its output going to `log_path`."""
        self.show(args, shlex.join(["featurebank", *args]) + " &")
        with open(log_path, "wb") as log:
            return subprocess.Popen(
                [*self.base, *args],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )


def rel(path: Path, workdir: Path) -> str:
    """`path` as the user would type it from the workdir."""
    try:
        return str(path.resolve().relative_to(workdir.resolve()))
    except ValueError:
        return str(path.resolve())


def free_port() -> int:
    """A free loopback port (the tiny race before the server binds it is acceptable here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(address: str, server: subprocess.Popen[bytes], log_path: Path) -> float:
    """Poll grpc.health.v1 until SERVING; fail fast if the server process dies first."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    start = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if server.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise DemoFailed(f"the server exited with status {server.returncode}:\n{tail}")
            if time.monotonic() - start > SERVE_START_TIMEOUT_S:
                raise DemoFailed(f"the server was not SERVING after {SERVE_START_TIMEOUT_S:.0f}s")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - start
            except grpc.RpcError:
                pass
            time.sleep(0.5)


def stop_server(server: subprocess.Popen[bytes]) -> int:
    """SIGTERM and wait: the server drains in-flight calls and closes the store."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=SERVE_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            raise DemoFailed(
                f"the server ignored SIGTERM for {SERVE_STOP_TIMEOUT_S:.0f}s"
            ) from None
    return int(server.returncode)


# ---------------------------------------------------------------------- reading results
