"""A real mosquitto broker on a free loopback port, for tests that need MQTT.

The broker runs as a daemon (`mosquitto -c CONF -d`) and is stopped by the pid in its pid
file; `restart()` keeps the port, so clients can reconnect to the same URL.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Broker:
    port: int
    directory: Path
    host: str = "127.0.0.1"
    pid: int | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def pid_path(self) -> Path:
        return self.directory / "mosquitto.pid"

    def start(self, timeout: float = 10.0) -> None:
        if MOSQUITTO is None:
            raise RuntimeError("mosquitto is not installed (Debian packages: mosquitto mosquitto-clients)")
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            f"pid_file {self.pid_path}",
            "persistence false",
            f"log_dest file {self.directory / 'mosquitto.log'}",
        ]
        if os.geteuid() == 0:
            # mosquitto drops root to the user "mosquitto", which cannot write the temp dir.
            lines.append("user root")
        self.config_path.write_text("\n".join(lines) + "\n")
        self.pid_path.unlink(missing_ok=True)
        subprocess.run([MOSQUITTO, "-c", str(self.config_path), "-d"], check=True, timeout=timeout, capture_output=True)
        deadline = time.monotonic() + timeout
        while not (_accepts(self.port) and self.pid_path.exists() and self.pid_path.read_text().strip()):
            if time.monotonic() > deadline:
                log = self.directory / "mosquitto.log"
                raise RuntimeError(f"mosquitto did not listen on {self.port}: {log.read_text() if log.exists() else ''}")
            time.sleep(0.05)
        self.pid = int(self.pid_path.read_text().strip())

    def stop(self, timeout: float = 10.0) -> None:
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while _pid_alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        # The port must be free again before a restart binds it.
        while _accepts(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()


def start_mosquitto(port: int | None = None) -> Broker:
    """Start a broker (on `port`, or a free one) and return once it accepts connections."""
    broker = Broker(port or _free_port(), Path(tempfile.mkdtemp(prefix="voxflow-mosquitto-")))
    broker.start()
    return broker
