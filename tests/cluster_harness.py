"""Replicas behind a real load balancer, on loopback: HAProxy started on deploy/haproxy.cfg as
it ships (only addresses come from the environment, as deploy/compose.yaml sets them),
`voxflow serve` processes behind it, and a mosquitto broker they share.

Used by tests/test_cluster.py, tests/test_haproxy.py and benchmarks/cluster.py.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from mosquitto_harness import Broker, start_mosquitto
from server_harness import free_port

REPO = Path(__file__).resolve().parent.parent
HAPROXY_CONFIG = REPO / "deploy" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
BACKEND = "voxflow"  # the backend's name in deploy/haproxy.cfg
MAX_REPLICAS = 3  # the `server` lines deploy/haproxy.cfg has
STARTUP_TIMEOUT = 180.0  # replicas warming up together on shared cores


class HarnessError(RuntimeError):
    """A component of the cluster did not start or stop as it should."""


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def haproxy_command(*flags: str) -> list[str]:
    if HAPROXY is None:
        raise HarnessError("haproxy is not installed (Debian package: haproxy; `make test` installs it)")
    return [HAPROXY, *flags, "-f", str(HAPROXY_CONFIG)]


def haproxy_env(addresses: dict[str, str]) -> dict[str, str]:
    """This process's environment with only the given VOXFLOW_* variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith("VOXFLOW_")} | addresses


def check_config(addresses: dict[str, str]) -> subprocess.CompletedProcess:
    """`haproxy -c`: deploy/haproxy.cfg as these environment variables expand it."""
    return subprocess.run(haproxy_command("-c"), env=haproxy_env(addresses), capture_output=True, text=True, timeout=30)


@dataclass
class HAProxy:
    """HAProxy on deploy/haproxy.cfg, in the foreground of a child process."""

    replicas: list[str]  # HOST:PORT of each server line, in order
    directory: Path
    port: int = field(default_factory=free_port)
    stats_port: int = field(default_factory=free_port)
    tls_cert: Path | None = None  # a PEM with chain and key: also serve TLS on tls_port
    tls_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "haproxy.log"

    def environment(self) -> dict[str, str]:
        if not 1 <= len(self.replicas) <= MAX_REPLICAS:
            raise HarnessError(f"deploy/haproxy.cfg has server lines for 1 to {MAX_REPLICAS} replicas")
        env = {
            "VOXFLOW_HAPROXY_BIND": f"127.0.0.1:{self.port}",
            "VOXFLOW_HAPROXY_STATS": f"127.0.0.1:{self.stats_port}",
            **{f"VOXFLOW_REPLICA_{n}": address for n, address in enumerate(self.replicas, 1)},
        }
        if self.tls_cert is not None:
            env |= {"VOXFLOW_HAPROXY_TLS_CERT": str(self.tls_cert), "VOXFLOW_HAPROXY_TLS_BIND": f"127.0.0.1:{self.tls_port}"}
        return env

    def start(self, timeout: float = 15.0) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                haproxy_command("-db"), env=haproxy_env(self.environment()), stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not (_accepts(self.port) and _accepts(self.stats_port)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise HarnessError(f"haproxy did not start:\n{_tail(self.log)}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def states(self) -> dict[str, str]:
        """Each server's state as HAProxy's stats report it, by name (replica1, ...): "UP",
        "DOWN", or a transition such as "UP 1/2"."""
        text = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5).text
        rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == BACKEND and r["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_for(self, wanted: dict[str, str], timeout: float = 60.0) -> None:
        """Return once each named server is in the wanted state."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.states()
            if all(states.get(name) == state for name, state in wanted.items()):
                return
            if time.monotonic() > deadline:
                raise HarnessError(f"haproxy servers {states}, waited for {wanted}")
            time.sleep(0.05)


@dataclass
class Replica:
    """One `voxflow serve` process on a fixed loopback port, restartable on the same port."""

    name: str  # as deploy/haproxy.cfg calls its server line: replica1, ...
    env: dict[str, str]
    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://{self.address}"

    @property
    def log(self) -> Path:
        return self.directory / f"{self.name}.log"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "voxflow.cli", "serve", "--port", str(self.port)],
                env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.http}/health/ready", timeout=2).status_code == 200:
                    return
            if self.process is None or self.process.poll() is not None or time.monotonic() > deadline:
                raise HarnessError(f"{self.name} did not become ready:\n{_tail(self.log)}")
            time.sleep(0.1)

    def health(self) -> dict:
        return httpx.get(f"{self.http}/health", timeout=10).json()

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (the graceful drain) and wait for the process to exit; its exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


def replica_env(broker: Broker | None, keys: tuple[str, ...]) -> dict[str, str]:
    """The replicas' settings as deploy/compose.yaml gives them, addresses aside: API keys
    required, HAProxy's address trusted for X-Forwarded-For, the MQTT bridge on the shared
    broker. The audio cache is off, so every reply is synthesized."""
    env = {
        "VOXFLOW_API_KEYS": ",".join(keys),
        "VOXFLOW_TRUSTED_PROXIES": "127.0.0.1",
        "VOXFLOW_CACHE_ENABLED": "false",
    }
    if broker is not None:
        env["VOXFLOW_MQTT_URL"] = broker.url
    return env


@dataclass
class Cluster:
    broker: Broker
    replicas: list[Replica]
    haproxy: HAProxy

    @property
    def ws_url(self) -> str:
        return f"{self.haproxy.ws}/v1/stream"

    def replica(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    def connections(self) -> dict[str, int]:
        """Open WebSockets each replica counts (its own /health)."""
        return {r.name: r.health()["connections"] for r in self.replicas}

    def wait_all_up(self, timeout: float = 60.0) -> None:
        self.haproxy.wait_for({r.name: "UP" for r in self.replicas}, timeout)

    def restart(self, replica: Replica) -> None:
        """Start a stopped replica again on its port, and wait until HAProxy sends it work."""
        replica.start()
        replica.wait_ready()
        self.haproxy.wait_for({replica.name: "UP"})


@contextlib.contextmanager
def running_cluster(directory: Path, size: int, keys: tuple[str, ...], extra_env: dict[str, str] | None = None) -> Iterator[Cluster]:
    """mosquitto, `size` replicas (started together) and HAProxy, all UP, until the block exits."""
    directory.mkdir(parents=True, exist_ok=True)
    broker = start_mosquitto()
    env = replica_env(broker, keys) | (extra_env or {})
    replicas = [Replica(f"replica{n}", env, directory) for n in range(1, size + 1)]
    haproxy = HAProxy([r.address for r in replicas], directory)
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready()
        haproxy.start()
        cluster = Cluster(broker, replicas, haproxy)
        cluster.wait_all_up()
        yield cluster
    finally:
        haproxy.stop()
        for replica in replicas:
            replica.stop()
        broker.stop()
        shutil.rmtree(broker.directory, ignore_errors=True)
