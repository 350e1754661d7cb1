"""`voxflow serve` in a process of its own, for benchmarks that measure it as a client would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(port: int, server: subprocess.Popen, timeout: float, poll: float = 0.02) -> None:
    """Return once the server on `port` answers /health with 200; SystemExit if it dies or times out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            raise SystemExit("voxflow serve did not become ready")
        time.sleep(poll)


@contextmanager
def voxflow_serve(*args: str, env: dict[str, str] | None = None, ready_timeout: float = 120) -> Iterator[int]:
    """Start `voxflow serve --port PORT *args` with extra environment, yield PORT once /health
    says ready, stop it with SIGTERM (its graceful path) at the end.

    Every benchmark client is one process, so the per-client rate limit is off unless `env`
    says otherwise.
    """
    port = free_port()
    environment = {**os.environ, "VOXFLOW_REQUESTS_PER_SECOND": "0", **(env or {})}
    server = subprocess.Popen(
        [sys.executable, "-m", "voxflow.cli", "serve", "--port", str(port), *args],
        env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_ready(port, server, ready_timeout)
        yield port
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
