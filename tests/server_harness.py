"""A real voxflow server (uvicorn, websockets protocol, uvloop) on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping

import uvicorn
import uvloop

from voxflow.config import AgentConfig, ServerConfig, Settings
from voxflow.streaming.engine import Engine
from voxflow.transports.app import ServerState, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    http: str  # http://127.0.0.1:PORT
    ws: str  # ws://127.0.0.1:PORT
    state: ServerState
    server: uvicorn.Server = field(repr=False)
    loop: asyncio.AbstractEventLoop = field(repr=False)

    def call(self, coro_fn, *args):
        """Run a coroutine function on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro_fn(*args), self.loop).result(timeout=60)


@contextlib.contextmanager
def run_server(engine: Engine, *, agent: Mapping[str, Any] | None = None, **server_options) -> Iterator[RunningServer]:
    """Serve `engine` with ServerConfig(**server_options) and AgentConfig(**agent) until the block exits."""
    port = free_port()
    server_cfg = replace(ServerConfig(), **{"port": port, "cache_enabled": False, **server_options})
    settings = Settings(engine=engine.config, server=server_cfg, agent=replace(AgentConfig(), **(agent or {})))
    app = create_app(settings, engine=engine)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, loop="none", ws="websockets-sansio", lifespan="on", log_level="warning")
    server = uvicorn.Server(config)
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), name=f"voxflow-test-server-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", app.state.voxflow, server, loop)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        loop.close()
