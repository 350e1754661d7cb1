"""A real `voxflow serve` process, and the clients test_adversarial.py attacks it with.

Every attack ends with the same two questions: is a well-behaved client still served, and has
everything the attack took been given back? `assert_recovered` asks both, and also that the
server logged no traceback while the attack ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlencode

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from server_harness import free_port
from voxflow.client import AsyncVoxflowClient

GOOD_KEY = "good-key"
ATTACKER_KEY = "attacker-key"
VOICE_ID = "21m00Tcm4TlvDq8ikWCM"  # an ElevenLabs voice id: the server speaks it with its default voice
TIMEOUT = 120  # generous: the machine is shared, these are not benchmarks


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    _log_mark: int = 0

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def origin(self) -> str:
        """What a page the server itself served sends as its Origin."""
        return self.http

    def mark_log(self) -> None:
        self._log_mark = self.log_path.stat().st_size

    def log_since_mark(self) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(self._log_mark)
            return log.read().decode(errors="replace")


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


@contextlib.contextmanager
def serve_process(directory: Path, **server: object) -> Iterator[ServeProcess]:
    """`voxflow serve` on a free port, configured by VOXFLOW_* variables (ServerConfig fields),
    ready once /health answers 200 (voices warm). Its output goes to a file: a pipe nobody
    reads would stall the server once it filled."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXFLOW_")}
    env.update({f"VOXFLOW_{name.upper()}": _env_value(value) for name, value in server.items()})
    log_path = directory / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "voxflow.cli", "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    running = ServeProcess(proc, port, log_path)
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{running.http}/health", timeout=1, trust_env=False).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"voxflow serve did not become ready:\n{running.log_since_mark()[-4000:]}")
            time.sleep(0.2)
        yield running
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


# -- /health and recovery ---------------------------------------------------------------------


async def health(server: ServeProcess) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        return (await http.get(f"{server.http}/health")).json()


async def wait_for_health(
    server: ServeProcess, condition: Callable[[dict[str, Any]], bool], what: str, timeout: float = 60
) -> dict[str, Any]:
    """Polls /health until `condition` holds; fails with the last body after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        body = await health(server)
        if condition(body):
            return body
        assert time.monotonic() < deadline, f"/health never showed {what} within {timeout:g} s; last: {body}"
        await asyncio.sleep(0.05)


def is_idle(body: Mapping[str, Any]) -> bool:
    return body["connections"] == 0 and body["active_streams"] == 0 and not any(body["admitted"].values())


async def assert_nothing_leaked(server: ServeProcess) -> None:
    """Every connection, stream and admitted place of every pool is given back (in time)."""
    await wait_for_health(server, is_idle, "no connection, stream or admitted place")


async def assert_serves(server: ServeProcess) -> None:
    """A well-behaved native client gets a short text spoken to the end."""
    async with AsyncVoxflowClient(f"{server.ws}/v1/stream", GOOD_KEY, connect_timeout=30, max_retries=3) as client:
        async with asyncio.timeout(TIMEOUT):
            speech = await client.speak("Still here.")
    assert speech.pcm, "a well-behaved client got no audio"
    assert speech.metrics is not None  # sent right before `done`: the context finished


async def assert_recovered(server: ServeProcess) -> None:
    await assert_serves(server)
    await assert_nothing_leaked(server)
    log = server.log_since_mark()
    assert "Traceback" not in log, f"the server logged a traceback:\n{log[max(0, log.index('Traceback') - 500):][:6000]}"


# -- WebSocket clients ------------------------------------------------------------------------


def open_socket(url: str, key: str | None = GOOD_KEY, *, header: str = "Authorization", **kwargs: Any) -> connect:
    """A client that does not ping on its own (a stalled test client must not close itself),
    and that waits little for the server's answer to its own close: leaving a socket it has
    stalled is not what a test checks."""
    headers = {}
    if key is not None:
        headers[header] = f"Bearer {key}" if header == "Authorization" else key
    return connect(
        url, additional_headers=headers, max_size=None, proxy=None, open_timeout=60, ping_interval=None,
        close_timeout=2, compression=None, **kwargs,
    )


def native_url(server: ServeProcess) -> str:
    return f"{server.ws}/v1/stream"


def elevenlabs_url(server: ServeProcess, endpoint: str = "multi-stream-input", **query: str) -> str:
    params = {"model_id": "eleven_flash_v2_5", "output_format": "pcm_16000", **query}
    return f"{server.ws}/v1/text-to-speech/{VOICE_ID}/{endpoint}?{urlencode(params)}"


def elevenlabs_socket(
    server: ServeProcess, key: str | None = GOOD_KEY, endpoint: str = "multi-stream-input",
    query: Mapping[str, str] | None = None, **kwargs: Any,
) -> connect:
    return open_socket(elevenlabs_url(server, endpoint, **(query or {})), key, header="xi-api-key", **kwargs)


async def send_json(ws: ClientConnection, *messages: Mapping[str, Any]) -> None:
    """As json.dumps writes them: a lone surrogate becomes the escape "\\ud800", which is how
    a client sends one (it cannot be encoded as UTF-8)."""
    for message in messages:
        await ws.send(json.dumps(message))


async def receive_json(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(TIMEOUT):
        return json.loads(await ws.recv())


async def receive_until(
    ws: ClientConnection, stop: Callable[[Any], bool], parse: Callable[[str | bytes], Any] = json.loads
) -> list[Any]:
    """Messages up to the first one `stop` accepts (included), or up to the server's close."""
    messages: list[Any] = []
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(TIMEOUT):
            while not messages or not stop(messages[-1]):
                messages.append(parse(await ws.recv()))
    return messages


async def closed_with(ws: ClientConnection, parse: Callable[[str | bytes], Any] = json.loads) -> tuple[list[Any], int | None]:
    """Everything the server sends until it closes, and its close code (1006: no close frame)."""
    messages = await receive_until(ws, lambda _: False, parse)
    return messages, ws.close_code


async def until_final(ws: ClientConnection, context: str) -> list[dict[str, Any]]:
    """ElevenLabs messages up to the context's isFinal."""
    messages = []
    while True:
        messages.append(message := await receive_json(ws))
        if message.get("isFinal") and message.get("contextId") == context:
            return messages


def audio_bytes(messages: list[dict[str, Any]], context: str | None = None) -> int:
    """Bytes of PCM in ElevenLabs audio messages (of one context, if named); base64 is 4/3 of it."""
    return sum(len(m["audio"]) * 3 // 4 for m in messages if m.get("audio") and context in (None, m.get("contextId")))


def stalling_socket(server: ServeProcess) -> socket.socket:
    """A connected socket that the server's sends back up on soon after its client stops reading.

    Its receive buffer is tiny, and so are the segments it accepts: the server's kernel sizes
    its send buffer from the segment size (a few MB at loopback's 64 KiB segments, seconds of
    synthesis to fill on a busy machine; tens of KB at 536 bytes).
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", server.port))
    return sock


def small_receive_buffer_socket(server: ServeProcess) -> socket.socket:
    """A stalling socket for a WebSocket client (hand it to connect as sock=)."""
    sock = stalling_socket(server)
    sock.setblocking(False)
    return sock


# -- raw HTTP ---------------------------------------------------------------------------------


def post_request(server: ServeProcess, path: str, body: bytes, headers: Mapping[str, str]) -> bytes:
    """An HTTP/1.1 request as bytes, for a client that sends it and then never reads."""
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def send_and_stall(server: ServeProcess, request: bytes) -> socket.socket:
    """Sends the request on a stalling socket and reads nothing back (yet)."""
    sock = stalling_socket(server)
    sock.sendall(request)
    return sock


@dataclass(frozen=True)
class RawResponse:
    status: int
    body: dict[str, Any] | None  # the JSON body of a response with a Content-Length


def read_response(sock: socket.socket, timeout: float = 30) -> RawResponse:
    """The status and, when the response is JSON of known length, its body; the rest of a
    streamed response is left unread."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"the connection closed before a response head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    if "content-length" not in headers or "json" not in headers.get("content-type", ""):
        return RawResponse(status, None)
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(4096)
        assert chunk, "the connection closed in the middle of a response body"
        rest += chunk
    return RawResponse(status, json.loads(rest[:length]))
