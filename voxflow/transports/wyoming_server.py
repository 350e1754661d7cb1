"""The Wyoming server beside the HTTP app: the `wyoming` package's server and event types, one
handler per connection moving events between `wyoming_protocol` and a ContextSet.

Wyoming has no authentication, so a connection is admitted by its peer address alone, in the
`wyoming` pool; the listener must be reachable by trusted hosts only. Home Assistant can find it
by zeroconf when ServerConfig.zeroconf asks for that (zeroconf_announce.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from fastapi import FastAPI
from wyoming.event import Event
from wyoming.server import AsyncEventHandler, AsyncServer, AsyncTcpServer, AsyncUnixServer

from ..config import check_zeroconf
from ..errors import InvalidRequest, LimitExceeded, StreamClosed, VoxflowError
from ..streaming.events import AudioFrame, StreamEnd, StreamEvent
from .core.admission import is_loopback
from .core.contexts import ContextRequest, Disconnected
from .protocols.wyoming_protocol import (
    EndStream, FramingLost, OpenStream, PushText, Reply, Session, Speak, VoiceChoice,
    audio_chunk, audio_start, audio_stop, error_event, parse_event, parse_header, synthesize_stopped,
    voxflow_error_event,
)
from .zeroconf_announce import announce_wyoming

if TYPE_CHECKING:
    from .app import ServerState  # app imports this module to install it

_LOGGER = logging.getLogger(__name__)
_ids = itertools.count()
# The kernel's send buffer per connection, about 1.5 s of 22 kHz audio. Left to autotuning it
# grows to megabytes, which a client that stopped reading fills with minutes of audio before
# any write waits, so its synthesis would run on to the end instead of being dropped within
# send_timeout_seconds.
_SEND_BUFFER_BYTES = 64 * 1024


async def _read_line(reader: asyncio.StreamReader, max_bytes: int) -> bytes | None:
    """One line of at most `max_bytes` (before its newline), whatever the reader's own limit."""
    line = bytearray()
    while True:
        try:
            line += await reader.readuntil(b"\n")
            complete = True
        except asyncio.LimitOverrunError as exc:
            # The reader holds at most about twice its limit; take that much and look further.
            line += await reader.readexactly(exc.consumed)
            complete = False
        except asyncio.IncompleteReadError:
            return None  # the connection ended (a partial line is no event)
        if len(line) - (1 if complete else 0) > max_bytes:  # the newline does not count
            raise LimitExceeded(f"an event header is over the {max_bytes}-byte limit")
        if complete:
            return bytes(line)


async def read_event(reader: asyncio.StreamReader, max_bytes: int) -> Event | None:
    """The next event, or None once the connection has ended.

    Written here because the `wyoming` package's reader trusts the header: it waits for as many
    bytes as `data_length` declares (one header declaring 10^9 grows the server by whatever the
    client sends), crashes on a length that is not a number, and ends the connection silently
    on a header it cannot parse. Raises FramingLost or LimitExceeded (the connection cannot go
    on; the declared bytes are not read) and InvalidRequest (this event only).
    """
    line = await _read_line(reader, max_bytes)
    if line is None:
        return None
    header = parse_header(line, max_bytes)
    try:
        data = await reader.readexactly(header.data_length) if header.data_length else b""
        payload = await reader.readexactly(header.payload_length) if header.payload_length else None
    except asyncio.IncompleteReadError:
        return None
    return parse_event(header, data, payload)


@dataclass
class _Request:
    """One request's audio on the wire: a whole text, or a stream closed by synthesize-stopped."""

    context_id: str
    streaming: bool
    started: bool = False  # audio-start sent
    end: float = 0.0  # stream seconds where the audio sent so far ends
    ended: bool = False  # the engine stream's end has arrived
    stop_received: bool = False  # (a stream) synthesize-stop has arrived
    closing: bool = False  # its last event is being sent
    # Everything of it is sent, or the connection is gone: the next request may start.
    done: asyncio.Event = field(default_factory=asyncio.Event)


class WyomingHandler(AsyncEventHandler):
    """One client connection. Audio goes out through the connection's ContextSet, whose pump
    writes it while the connection keeps reading: text chunks arrive during synthesis, and a
    client that goes away is noticed (and its synthesis cancelled) at once. Requests on one
    connection are served one after the other."""

    def __init__(
        self, state: ServerState, handlers: set[asyncio.Task[None]], version: str,
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    ) -> None:
        super().__init__(reader, writer)
        self.state = state
        self._handlers = handlers
        self._session = Session(state.engine.voices.infos, state.settings.engine.voice, version)
        self._config = state.settings.server
        # A drain gives the contexts the grace period, then closes the connection.
        self.contexts = state.connection_contexts(self._deliver, after_drain=self.stop)
        self._identity = state.admission.anonymous(self._peer_address())
        self._request: _Request | None = None
        self._open = True  # false once the connection is closing: nothing more is written

    def _peer_address(self) -> str:
        peer = self.writer.get_extra_info("peername")
        # A Unix socket's peers are processes on this machine, as loopback ones are.
        return peer[0] if isinstance(peer, tuple) else "localhost"

    async def run(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._run_admitted()
        finally:
            self._handlers.discard(task)

    async def _run_admitted(self) -> None:
        try:
            ticket = self.state.admission.admit(self._identity, "wyoming")
        except VoxflowError as exc:  # draining, rate_limited, limit_exceeded
            with contextlib.suppress(Disconnected):
                await self._send_error(exc)
            await self._close()
            return
        with ticket:
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER_BYTES)
            try:
                async with self.state.serving(self.contexts):
                    try:
                        await self._serve_events()
                    finally:
                        self._end()
            except Disconnected:
                pass
            finally:
                await self._close()

    async def _serve_events(self) -> None:
        while self._open:
            try:
                event = await read_event(self.reader, self._config.max_message_bytes)
            except (FramingLost, LimitExceeded) as exc:
                await self._send_error(exc)
                return
            except InvalidRequest as exc:
                await self._send_error(exc)  # the framing held: the next event can be read
                continue
            except ConnectionError:
                return
            if event is None:
                return
            await self.handle_event(event)

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
                request = self._request
                if request is not None and request.streaming and not request.ended:
                    # A stream that failed meanwhile has sent its error already.
                    with contextlib.suppress(StreamClosed):
                        await self.contexts.push(request.context_id, action.text)
            elif isinstance(action, EndStream):
                await self._end_stream()
        except Disconnected:
            raise
        except VoxflowError as exc:
            await self._send_error(exc)
            for reply in self._session.after_error(event):
                await self.write_event(reply)
        return True

    async def write_event(self, event: Event) -> None:
        """Every write, bounded: a client that reads nothing for send_timeout is dropped."""
        if not self._open:
            raise Disconnected("the connection is closed")
        try:
            async with asyncio.timeout(self._config.send_timeout_seconds):
                await super().write_event(event)
        except (TimeoutError, OSError) as exc:
            self._end(abort=True)
            raise Disconnected("the client stopped reading or went away") from exc

    async def stop(self) -> None:
        """Ends the connection once the event in hand is answered (the server stops, or a drain
        is over): a request refused as `draining` still gets its error and audio-stop."""
        request = self._request
        if request is not None and request.context_id not in self.contexts:
            request.done.set()  # a drain past its grace cancelled it before its last events
        self.reader.feed_eof()

    def _end(self, *, abort: bool = False) -> None:
        """No more writes, so nothing waits for the current request. `abort` drops the
        connection with what it has not sent, and the synthesis feeding it."""
        self._open = False
        request = self._request
        if request is not None:
            request.done.set()
            if abort and request.context_id in self.contexts:
                self.contexts.cancel(request.context_id)
        if abort:
            self.writer.transport.abort()

    async def _close(self) -> None:
        """Closes once what is written has gone out, within send_timeout: a client that reads
        nothing would hold the socket open for ever."""
        self.writer.close()
        try:
            async with asyncio.timeout(self._config.send_timeout_seconds):
                await self.writer.wait_closed()
        except (TimeoutError, OSError):
            self.writer.transport.abort()

    async def _send_error(self, exc: VoxflowError) -> None:
        self.state.metrics.errors.labels(exc.code).inc()
        await self.write_event(voxflow_error_event(exc))

    async def _start(self, choice: VoiceChoice, text: str | None) -> None:
        """Open a stream for a whole text, or (text None) for a text stream."""
        previous = self._request
        if previous is not None:
            # Each request's audio follows the previous one's, never interleaved with it.
            await previous.done.wait()
        if not self._open:
            raise Disconnected("the connection is closed")
        self._request = None
        self.state.admission.check_new_work(self._identity)  # draining, rate_limited
        request = _Request(f"wyoming-{next(_ids)}", streaming=text is None)
        self.contexts.open(ContextRequest(request.context_id, voice=choice.voice, speaker=choice.speaker))
        self._request = request  # before the pump's first event
        if text is None:
            return
        try:
            await self.contexts.push(request.context_id, text)
            await self.contexts.end(request.context_id)
        except VoxflowError:
            # Its error event and audio-stop come from handle_event; the stream sends nothing.
            self._request = None
            self.contexts.cancel(request.context_id)
            raise

    async def _end_stream(self) -> None:
        request = self._request
        if request is None or not request.streaming:
            # The stream never opened (its error was sent then); the client still waits for this.
            await self.write_event(synthesize_stopped())
            return
        request.stop_received = True
        if not request.ended:
            with contextlib.suppress(StreamClosed):
                await self.contexts.end(request.context_id)
        await self._finish(request)

    async def _deliver(self, event: StreamEvent) -> None:
        """ContextSet's callback, bounded by send_timeout there."""
        request = self._request
        if request is None or event.context_id != request.context_id:
            return  # a request refused while its text was pushed
        if isinstance(event, AudioFrame):
            if not request.started:
                await self.write_event(audio_start(event))
                request.started = True
            await self.write_event(audio_chunk(event))
            request.end = event.pts + event.duration
        elif isinstance(event, StreamEnd):
            if event.code == "slow_consumer":
                # The client reads nothing, so nothing more can reach it: the connection goes.
                self._end(abort=True)
                return
            request.ended = True
            if event.reason == "error":
                await self.write_event(error_event(event.code, event.message))
            if request.started or not request.streaming:
                await self.write_event(audio_stop(request.end))
            await self._finish(request)

    async def _finish(self, request: _Request) -> None:
        """The request's last event, once its audio has ended and (a stream) its stop arrived;
        called by both, so it goes out once, after whichever comes last."""
        if not request.ended or (request.streaming and not request.stop_received) or request.closing:
            return
        request.closing = True
        if request.streaming:
            await self.write_event(synthesize_stopped())
        request.done.set()


def _warn_if_exposed(server: AsyncServer, url: str) -> None:
    if isinstance(server, AsyncTcpServer) and not is_loopback(server.host):
        _LOGGER.warning("Wyoming has no authentication: every host that can reach %s can use this server", url)


@contextlib.asynccontextmanager
async def _serve(url: str, version: str, state: ServerState) -> AsyncIterator[None]:
    server = AsyncServer.from_uri(url)
    if not isinstance(server, (AsyncTcpServer, AsyncUnixServer)):
        raise ValueError(f"Wyoming URL must be tcp://HOST:PORT or unix://PATH, got {url!r}")
    config = state.settings.server
    check_zeroconf(config)  # again: settings made in code have not been through load_settings
    _warn_if_exposed(server, url)
    handlers: set[asyncio.Task[None]] = set()  # connections being served, to end at shutdown
    await server.start(partial(WyomingHandler, state, handlers, version))
    _LOGGER.info("Wyoming server listening on %s", url)
    try:
        # Announced once it listens, so Home Assistant finds it answering; the goodbye goes out
        # before it stops, so none is sent to a server that has gone.
        if config.zeroconf and isinstance(server, AsyncTcpServer):  # check_zeroconf allows tcp:// only
            async with announce_wyoming(config, server.host, server.port):
                yield
        else:
            yield
    finally:
        # Ends every connection; each handler then cancels its synthesis as on a disconnect.
        await server.stop()
        if handlers:
            await asyncio.wait(set(handlers), timeout=state.settings.server.grace_seconds)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


def install(app: FastAPI, state: ServerState) -> None:
    url = state.settings.server.wyoming_url
    if url:
        state.services.append(partial(_serve, url, app.version))
