"""The voxflow server: one ASGI app carrying every HTTP and WebSocket endpoint.

Voices are loaded and warmed in the lifespan before the server reports ready, so the first
request is as fast as the hundredth.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from ..config import Settings
from ..errors import VoxflowError
from ..streaming.engine import Engine
from .auth import RateLimiter
from .contexts import ContextSet
from .http_errors import error_response, install_error_handlers
from .metrics import ServerMetrics

_LOGGER = logging.getLogger(__name__)


@dataclass
class ServerState:
    """Everything the endpoints share; one per app."""

    settings: Settings
    engine: Engine
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    ready: bool = False
    draining: bool = False
    connections: set[ContextSet] = field(default_factory=set)
    limiter: RateLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.limiter = RateLimiter(self.settings.server.requests_per_second)

    def voice_for(self, name: str | None) -> str:
        """A requested voice name, alias (e.g. an OpenAI voice) or None -> a registry name."""
        aliases = dict(pair.split("=", 1) for pair in self.settings.server.voice_aliases if "=" in pair)
        if name in aliases:
            return aliases[name]
        if name is None or name in {i.name for i in self.engine.voices.infos()}:
            return name or self.settings.engine.voice
        return name

    async def drain(self) -> None:
        """Stop taking new work and give open contexts the grace period to finish."""
        self.draining = True
        grace = self.settings.server.grace_seconds
        await asyncio.gather(*(c.drain(grace) for c in list(self.connections)), return_exceptions=True)


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    state = ServerState(settings, engine or Engine(settings.engine))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        voices = {settings.engine.voice}
        for name in voices:
            await state.engine.warm_up(name)
        state.ready = True
        _LOGGER.info("voxflow ready with voices %s", ", ".join(sorted(voices)))
        try:
            yield
        finally:
            state.draining = True
            await asyncio.gather(*(c.close() for c in list(state.connections)), return_exceptions=True)
            if engine is None:
                await asyncio.get_running_loop().run_in_executor(None, state.engine.close)

    app = FastAPI(title="voxflow", version="0.1.0", lifespan=lifespan, description="Streaming neural text-to-speech.")
    app.state.voxflow = state
    if settings.server.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.server.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "xi-api-key"],
        )
    install_error_handlers(app)

    @app.get("/health", summary="Readiness and load")
    async def health() -> JSONResponse:
        status = "draining" if state.draining else "ok" if state.ready else "starting"
        body = {"status": status, "active_streams": sum(len(c) for c in state.connections), "connections": len(state.connections)}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/v1/voices", summary="Voices this server can speak with")
    async def voices() -> dict:
        return {
            "default": settings.engine.voice,
            "voices": [
                {"name": i.name, "language": i.language, "sample_rate": i.sample_rate, "quality": i.quality,
                 "speakers": list(i.speakers), "espeak_voice": i.espeak_voice}
                for i in state.engine.voices.infos()
            ],
        }

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=ServerMetrics.content_type)

    # Wire protocols: each module adds its routes on top of the shared state.
    # (one `install(app, state)` call per protocol module, in this block)

    @app.exception_handler(VoxflowError)
    async def voxflow_error(request: Request, exc: VoxflowError) -> JSONResponse:
        state.metrics.errors.labels(exc.code).inc()
        return error_response(exc)

    return app
