"""`voxflow serve` as a real process: ready only after warm-up, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from server_harness import free_port
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from voxflow.transports.protocols.native_protocol import AudioPacket, Done, End, Start, Text, parse_server, serialize_client

LONG_TEXT = "This reply is long enough to still be speaking when the server is asked to stop. " * 3


@pytest.fixture
def serve_process(tmp_path):
    port = free_port()
    env = {**os.environ, "VOXFLOW_CACHE_ENABLED": "false", "VOXFLOW_GRACE_SECONDS": "30"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "voxflow.cli", "serve", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.2)
    yield proc, port
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


async def test_sigterm_lets_in_flight_speech_finish_then_closes_1001(serve_process):
    proc, port = serve_process
    async with asyncio.timeout(120), httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        assert (await http.get("/health/ready")).status_code == 200
        async with connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None) as ws:
            await ws.recv()  # ready
            await ws.send(serialize_client(Start(context="a")))
            await ws.send(serialize_client(Text(context="a", text=LONG_TEXT)))
            await ws.send(serialize_client(End(context="a")))
            frames, done = 0, False
            while frames < 5:
                if isinstance(parse_server(await ws.recv()), AudioPacket):
                    frames += 1
            proc.send_signal(signal.SIGTERM)
            # Not ready from the start of the drain, so a load balancer sends new work elsewhere,
            # while the stream in flight is still being spoken and the process still answers.
            while (ready := await http.get("/health/ready")).status_code == 200:
                await asyncio.sleep(0.01)
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            assert (await http.get("/health")).json()["active_streams"] == 1
            assert (await http.get("/health/live")).status_code == 200
            try:
                async for data in ws:
                    msg = parse_server(data)
                    frames += isinstance(msg, AudioPacket)
                    done = done or isinstance(msg, Done)
            except ConnectionClosed:
                pass
            assert done, "the in-flight context was cut off instead of finishing"
            assert frames > 200  # the whole text, not the few frames before the signal
            assert ws.close_code == 1001
    assert proc.wait(timeout=60) is not None
    out = proc.stdout.read().decode(errors="replace")
    assert "voxflow serving on http://127.0.0.1:" in out
