"""The Wyoming server beside the HTTP app: the `wyoming` package's server and framing, one
handler per connection moving events between `wyoming_protocol` and engine streams."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import TYPE_CHECKING

from fastapi import FastAPI
from wyoming.event import Event
from wyoming.server import AsyncEventHandler, AsyncServer, AsyncTcpServer, AsyncUnixServer

from ..errors import StreamClosed, VoxflowError
from ..streaming.events import AudioFrame, StreamEnd
from ..streaming.stream import SynthesisStream
from .wyoming_protocol import (
    EndStream, OpenStream, PushText, Reply, Session, Speak, VoiceChoice,
    audio_chunk, audio_start, audio_stop, error_event, synthesize_stopped, voxflow_error_event,
)

if TYPE_CHECKING:
    from .app import ServerState  # app imports this module to install it

_LOGGER = logging.getLogger(__name__)
_ids = itertools.count()


class WyomingHandler(AsyncEventHandler):
    """One client connection. Its audio is written by a task of its own, so the connection
    keeps reading while it speaks: text chunks arrive during synthesis, and a client that goes
    away is noticed (and its synthesis cancelled) at once."""

    def __init__(
        self, state: ServerState, live: set[asyncio.Task[None]], version: str,
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    ) -> None:
        super().__init__(reader, writer)
        self.state = state
        self._live = live
        self._session = Session(state.engine.voices.infos(), state.settings.engine.voice, version)
        self._stream: SynthesisStream | None = None
        self._stopped: asyncio.Event | None = None  # set on synthesize-stop; None outside a stream
        self._pump: asyncio.Task[None] | None = None

    async def run(self) -> None:
        limit = self.state.settings.server.max_sockets
        if len(self._live) >= limit:
            self.state.metrics.errors.labels("limit_exceeded").inc()
            with contextlib.suppress(ConnectionError):
                await self.write_event(error_event("limit_exceeded", f"at most {limit} connections; try again later"))
            self.writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._live.add(task)
        try:
            await super().run()
        finally:
            self._live.discard(task)

    async def handle_event(self, event: Event) -> bool:
        try:
            action = self._session.handle(event)
            if isinstance(action, Reply):
                for reply in action.events:
                    await self.write_event(reply)
            elif isinstance(action, Speak):
                await self._start(action.choice, action.text)
            elif isinstance(action, OpenStream):
                await self._start(action.choice, None)
            elif isinstance(action, PushText):
                if self._stream is not None and self._stopped is not None and not self._stream.done:
                    await self._stream.push(action.text)
            elif isinstance(action, EndStream):
                await self._end_stream()
        except VoxflowError as exc:
            self.state.metrics.errors.labels(exc.code).inc()
            for reply in (voxflow_error_event(exc), *self._session.after_error(event)):
                await self.write_event(reply)
        return True

    async def disconnect(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)

    async def _start(self, choice: VoiceChoice, text: str | None) -> None:
        """Open a stream for a whole text, or (text None) for a text stream."""
        if self._pump is not None:
            # Each request's audio follows the previous one's, never interleaved with it.
            await asyncio.gather(self._pump, return_exceptions=True)
        self._stream, self._stopped, self._pump = None, None, None
        if self.state.draining:
            raise VoxflowError("the server is shutting down", code="draining")
        engine = self.state.engine
        if engine.voices.loaded(choice.voice) is None:
            # Loading takes seconds; it must not stall every other connection on this loop.
            await asyncio.get_running_loop().run_in_executor(None, engine.voice, choice.voice)
        stream = engine.open_stream(voice=choice.voice, speaker=choice.speaker, context_id=f"wyoming-{next(_ids)}")
        if text is not None:
            try:
                await stream.push(text)
                await stream.end()
            except VoxflowError:
                await stream.aclose()
                raise
        stopped = None if text is not None else asyncio.Event()
        self._stream, self._stopped = stream, stopped
        self._pump = asyncio.get_running_loop().create_task(
            self._speak(stream, stopped), name=f"voxflow-wyoming-{stream.context_id}"
        )

    async def _end_stream(self) -> None:
        if self._stream is None or self._stopped is None:
            # The stream never opened (its error was sent then); the client still waits for this.
            await self.write_event(synthesize_stopped())
            return
        with contextlib.suppress(StreamClosed):
            await self._stream.end()
        self._stopped.set()

    async def _speak(self, stream: SynthesisStream, stopped: asyncio.Event | None) -> None:
        metrics = self.state.metrics
        metrics.active_streams.inc()
        reason, first_sent, started, end = "cancelled", None, False, 0.0
        try:
            async for item in stream:
                if isinstance(item, AudioFrame):
                    if not started:
                        await self.write_event(audio_start(item))
                        started = True
                    await self.write_event(audio_chunk(item))
                    first_sent = first_sent or time.perf_counter()
                    metrics.frames_sent.inc()
                    end = item.pts + item.duration
                elif isinstance(item, StreamEnd):
                    reason = item.reason
                    if item.reason == "error":
                        metrics.errors.labels(item.code).inc()
                        await self.write_event(error_event(item.code, item.message))
            if started or stopped is None:
                await self.write_event(audio_stop(end))
            if stopped is not None:
                await stopped.wait()
                await self.write_event(synthesize_stopped())
        except ConnectionError:
            pass  # the reading side sees the same disconnect and ends the connection
        finally:
            await stream.aclose()
            metrics.active_streams.dec()
            metrics.stream_ended(stream.metrics, reason, first_sent)


@contextlib.asynccontextmanager
async def _serve(url: str, version: str, state: ServerState) -> AsyncIterator[None]:
    server = AsyncServer.from_uri(url)
    if not isinstance(server, (AsyncTcpServer, AsyncUnixServer)):
        raise ValueError(f"Wyoming URL must be tcp://HOST:PORT or unix://PATH, got {url!r}")
    live: set[asyncio.Task[None]] = set()  # connection handlers being served
    await server.start(partial(WyomingHandler, state, live, version))
    _LOGGER.info("Wyoming server listening on %s", url)
    try:
        yield
    finally:
        # Closes every connection; each handler then cancels its synthesis as on a disconnect.
        await server.stop()
        if live:
            await asyncio.wait(set(live), timeout=state.settings.server.grace_seconds)


def install(app: FastAPI, state: ServerState) -> None:
    url = state.settings.server.wyoming_url
    if url:
        state.services.append(partial(_serve, url, app.version))
