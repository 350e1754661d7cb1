"""A real voxflow server (uvicorn, websockets protocol, uvloop) on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Coroutine, Iterator, Mapping
from urllib.parse import urlsplit

import uvicorn
import uvloop

from voxflow.config import AgentConfig, ServerConfig, Settings
from voxflow.streaming.engine import Engine
from voxflow.transports.app import ServerState, create_app
from voxflow.transports.runner import check_tls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    http: str  # http://127.0.0.1:PORT (https:// with TLS)
    ws: str  # ws://127.0.0.1:PORT (wss:// with TLS)
    state: ServerState
    server: uvicorn.Server = field(repr=False)
    loop: asyncio.AbstractEventLoop = field(repr=False)

    def call(self, coro_fn, *args):
        """Run a coroutine function on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro_fn(*args), self.loop).result(timeout=60)


@contextlib.contextmanager
def serving_in_thread(server: uvicorn.Server, loop: asyncio.AbstractEventLoop, main: Coroutine[Any, Any, None], name: str) -> Iterator[None]:
    """Runs `main` (the server's serve(), or a coroutine around it) on `loop` in a daemon thread,
    from the moment the server has started until the block exits."""
    thread = threading.Thread(target=loop.run_until_complete, args=(main,), name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start")
        time.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        loop.close()


def small_buffer_socket(srv: RunningServer) -> socket.socket:
    """A connected, non-blocking client socket with a tiny receive buffer: a client that stops
    reading holds the server up at once (hand it to websockets' connect as sock=)."""
    address = urlsplit(srv.ws)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((address.hostname, address.port))
    sock.setblocking(False)
    return sock


async def shrink_server_send_buffers(srv: RunningServer) -> None:
    """Tiny send buffers on the server's open connections; else the kernel's autotuned buffer
    (MBs) soaks up the audio of a client that stopped reading for a while."""

    async def shrink() -> None:
        for protocol in srv.server.server_state.connections:
            protocol.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    await asyncio.to_thread(srv.call, shrink)


@contextlib.contextmanager
def run_server(engine: Engine, *, agent: Mapping[str, Any] | None = None, **server_options) -> Iterator[RunningServer]:
    """Serve `engine` with ServerConfig(**server_options) and AgentConfig(**agent) until the block exits."""
    port = free_port()
    server_cfg = replace(ServerConfig(), **{"port": port, "cache_enabled": False, **server_options})
    settings = Settings(engine=engine.config, server=server_cfg, agent=replace(AgentConfig(), **(agent or {})))
    check_tls(server_cfg)  # as runner.serve does
    app = create_app(settings, engine=engine)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, loop="none", ws="websockets-sansio", lifespan="on", log_level="warning",
        ssl_certfile=server_cfg.ssl_certfile or None, ssl_keyfile=server_cfg.ssl_keyfile or None,
        proxy_headers=False,  # as runner.serve does: X-Forwarded-For is Admission's to judge
    )
    server = uvicorn.Server(config)
    loop = uvloop.new_event_loop()
    http, ws = ("https", "wss") if server_cfg.ssl_certfile else ("http", "ws")
    with serving_in_thread(server, loop, server.serve(), f"voxflow-test-server-{port}"):
        yield RunningServer(f"{http}://127.0.0.1:{port}", f"{ws}://127.0.0.1:{port}", app.state.voxflow, server, loop)
