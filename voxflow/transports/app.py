"""The voxflow server: one ASGI app carrying every HTTP and WebSocket endpoint.

Voices are loaded and warmed in the lifespan before the server reports ready, so the first
request is as fast as the hundredth; the warm-up phrases are spoken into the audio cache then
too, so their first request is already a replay. The agent's recognizer and LLM, shared by every
conversation, are made (and the recognizer warmed) there as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from ..agent.asr import SpeechRecognizer
from ..agent.llm import LanguageModel
from ..config import Settings
from ..errors import VoxflowError
from ..streaming.audio_cache import AudioCache
from ..streaming.engine import Engine
from ..streaming.events import StreamEnd
from .core.admission import Admission, pool_limits
from .core.browser_guard import BrowserGuard
from .core.contexts import ContextSet, Deliver
from .conversations import LiveConversation, agent_plugins
from .elevenlabs_http import install as install_elevenlabs_http
from .elevenlabs_ws import install as install_elevenlabs
from .core.http import error_response, install_error_handlers
from .core.metrics import ServerMetrics
from .core.request_id import RequestId
from .native_ws import install as install_native
from .openai_http import install as install_openai
from .voices_http import install as install_voices
from .watermark_http import install as install_watermark
from .web_page import install as install_web_page
from .webrtc_http import install as install_webrtc
from .wyoming_server import install as install_wyoming

_LOGGER = logging.getLogger(__name__)

# The pools a load balancer fills: a replica with any of them full is not ready for more.
ROUTED_POOLS = ("socket", "http_stream", "webrtc")


@dataclass
class ServerState:
    """Everything the endpoints share; one per app."""

    settings: Settings
    engine: Engine
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    ready: bool = False
    # Set the moment a drain begins, before the work in flight finishes: /health/ready turns 503
    # so that a load balancer sends new work elsewhere while this server still serves its own.
    stopping: bool = False
    # Every open ContextSet, whatever carries it: a drain waits for them all.
    context_sets: set[ContextSet] = field(default_factory=set)
    conversations: set[LiveConversation] = field(default_factory=set)
    # The agent's plug-ins, one of each for every conversation (set in the lifespan).
    recognizer: SpeechRecognizer | None = None
    llm: LanguageModel | None = None
    # Long-running services beside the HTTP app (MQTT bridge, Wyoming server): each is entered
    # in the lifespan once the voices are warm and exited at shutdown.
    services: list[Callable[["ServerState"], AbstractAsyncContextManager[None]]] = field(default_factory=list)
    # Run first when draining: a service stops taking new work where it is offered (an MQTT
    # worker leaves its share group so other workers get the requests).
    drain_hooks: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.settings.server, pool_limits(self.settings.server, self.settings.agent.max_conversations))

    @property
    def draining(self) -> bool:
        return self.admission.draining

    def voice_for(self, name: str | None) -> str:
        """A requested voice name, alias (e.g. an OpenAI voice) or None -> a registry name."""
        aliases = dict(pair.split("=", 1) for pair in self.settings.server.voice_aliases if "=" in pair)
        if name in aliases:
            return aliases[name]
        # An unknown name is passed on as it is: the registry's error names it and the choices.
        return name or self.settings.engine.voice

    def connection_contexts(
        self, deliver: Deliver, after_drain: Callable[[], Awaitable[None]] | None = None
    ) -> ContextSet:
        """The context set of one client connection, with the server's per-connection limits."""
        config = self.settings.server
        return ContextSet(
            self.engine, deliver, max_contexts=config.max_contexts_per_socket,
            send_timeout=config.send_timeout_seconds, metrics=self.metrics, after_drain=after_drain,
        )

    @contextlib.asynccontextmanager
    async def serving(self, contexts: ContextSet) -> AsyncIterator[ContextSet]:
        """A connection's context set while the connection lasts: drains and /health see it,
        and on the way out every context it still has is cancelled and awaited."""
        self.context_sets.add(contexts)
        try:
            yield contexts
        finally:
            self.context_sets.discard(contexts)
            await contexts.close()

    async def drain(self) -> None:
        """Stop taking new work and give open contexts the grace period to finish."""
        self.stopping = True
        # Hooks first: requests a broker handed over before a worker left its group are still
        # served rather than refused.
        await asyncio.gather(*(hook() for hook in self.drain_hooks), return_exceptions=True)
        self.admission.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.server.grace_seconds
        # Again for sets opened meanwhile: work accepted just before the drain may open one.
        drained: set[ContextSet] = set()
        while (waiting := self.context_sets - drained) and (left := deadline - loop.time()) > 0:
            await asyncio.gather(*(c.drain(left) for c in waiting), return_exceptions=True)
            drained |= waiting
        # HTTP speech responses hold no context set; each is in-flight work until it ends.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self.admission.until_empty("http_stream")


def _open_cache(path: Path, max_bytes: int) -> AudioCache:
    path.parent.mkdir(parents=True, exist_ok=True)
    return AudioCache(path, max_bytes)


async def _start_cache(state: ServerState) -> AudioCache | None:
    """Attach the configured audio cache to the engine and speak the warm-up phrases into it.

    Returns the cache this server opened, to close at shutdown; an engine that came with a
    cache of its own keeps it. A cache that cannot be opened leaves the server uncached.
    """
    server, engine = state.settings.server, state.engine
    opened = None
    if server.cache_enabled and engine.cache is None:
        path = Path(server.cache_path).expanduser()
        try:
            opened = await asyncio.get_running_loop().run_in_executor(None, _open_cache, path, server.cache_max_mb * 2**20)
        except Exception:
            _LOGGER.exception("audio cache %s cannot be opened; serving without it", path)
        engine.cache = opened
    if engine.cache is not None:
        # Default voice, style, seed and output format: what a request that names none gets.
        for phrase in server.warmup_phrases:
            stream = engine.open_stream()
            await stream.push(phrase)
            await stream.end()
            async for event in stream:
                if isinstance(event, StreamEnd) and event.reason != "done":
                    _LOGGER.warning("warm-up phrase %r failed: %s", phrase, event.message)
        await engine.cache.settle()
    return opened


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    state = ServerState(settings, engine or Engine(settings.engine, concurrent=True))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        voices = {settings.engine.voice}
        services = AsyncExitStack()
        cache = None
        try:
            warming = asyncio.ensure_future(asyncio.gather(*(state.engine.warm_up(name) for name in voices)))
            try:
                # Before `ready`, so that no conversation's first turn waits for a speech model.
                # Its model loads on a thread of its own while the voice warms up on the
                # compute threads, which shortens the start.
                await services.enter_async_context(agent_plugins(state))
            finally:
                await warming
            cache = await _start_cache(state)
            for service in state.services:
                await services.enter_async_context(service(state))
            state.ready = True
            _LOGGER.info("voxflow ready with voices %s", ", ".join(sorted(voices)))
            yield
        finally:
            state.admission.draining = True
            await services.aclose()
            await asyncio.gather(*(c.close() for c in list(state.context_sets)), return_exceptions=True)
            if cache is not None:
                state.engine.cache = None
                await asyncio.get_running_loop().run_in_executor(None, cache.close)
            if engine is None:
                await asyncio.get_running_loop().run_in_executor(None, state.engine.close)

    app = FastAPI(title="voxflow", version="0.1.0", lifespan=lifespan, description="Streaming neural text-to-speech.")
    app.state.voxflow = state
    if settings.server.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.server.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["authorization", "content-type", "xi-api-key"],
        )
    install_error_handlers(app)
    # Outside CORS and the routes, so nothing a hostile page sends reaches a route (or the CORS
    # preflight logic).
    app.add_middleware(BrowserGuard, config=settings.server)
    # Outermost, so the guard's refusals carry an id too.
    app.add_middleware(RequestId)

    @app.get("/health", summary="Readiness and load")
    async def health() -> JSONResponse:
        status = "draining" if state.draining else "ok" if state.ready else "starting"
        admitted = state.admission.counts()
        body = {
            "status": status,
            "active_streams": sum(len(c) for c in state.context_sets),
            "connections": admitted["socket"],
            "admitted": admitted,
        }
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/health/live", summary="Liveness: the process answers")
    async def live() -> JSONResponse:
        return JSONResponse({"status": "live"})

    @app.get("/health/ready", summary="Readiness: whether a load balancer should send new work here")
    async def ready() -> JSONResponse:
        full = [pool for pool in ROUTED_POOLS if state.admission.at_capacity(pool)]
        if state.stopping or state.draining:
            status = "draining"
        elif not state.ready:
            status = "starting"
        else:
            status = "full" if full else "ready"
        return JSONResponse({"status": status, "full": full}, status_code=200 if status == "ready" else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=ServerMetrics.content_type)

    # Wire protocols: each module adds its routes on top of the shared state.
    # (one `install(app, state)` call per protocol module, in this block)
    install_voices(app, state)  # GET, POST /v1/voices, DELETE /v1/voices/{name}
    install_watermark(app, state)  # POST /v1/watermark/detect
    install_native(app, state)
    install_openai(app, state)
    install_elevenlabs(app, state)
    install_elevenlabs_http(app, state)
    install_webrtc(app, state)
    install_web_page(app, state)  # the browser demo at /
    install_wyoming(app, state)  # a TCP server beside the app, when ServerConfig.wyoming_url is set
    if settings.server.mqtt_url:
        # Imported only then: its MQTT client library is a tenth of the server's start.
        from .mqtt_bridge import install as install_mqtt

        install_mqtt(app, state)  # an MQTT bridge beside the app

    @app.exception_handler(VoxflowError)
    async def voxflow_error(request: Request, exc: VoxflowError) -> JSONResponse:
        state.metrics.errors.labels(exc.code).inc()
        return error_response(exc)

    return app
