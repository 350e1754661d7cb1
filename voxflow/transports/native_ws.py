"""The native streaming endpoint, `/v1/stream` (docs/protocol.md): socket <-> ContextSet.

The protocol itself lives in native_protocol and the contexts in ContextSet; this module only
admits connections, turns frames into ContextSet calls and events into frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from fastapi import FastAPI, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from ..errors import VoxflowError
from ..streaming.events import AudioFrame, StreamEnd, StreamEvent
from .auth import check_key, presented_key
from .contexts import ContextRequest, ContextSet
from .native_protocol import (
    Cancel,
    Cancelled,
    Done,
    End,
    Error,
    Flush,
    Limits,
    Metrics,
    Ping,
    Pong,
    ProtocolError,
    Ready,
    ServerMessage,
    Start,
    Started,
    Text,
    Word,
    pack_audio,
    parse_client,
    serialize_server,
)

if TYPE_CHECKING:
    from .app import ServerState  # app imports this module to install it

_LOGGER = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_UNAUTHORIZED = 4001


class _Disconnected(VoxflowError):
    """The socket can no longer carry frames. A VoxflowError, so a pump ends quietly on it."""

    code = "disconnected"


class _Contexts(ContextSet):
    """Closes the socket with 1001 once a server drain has let its contexts finish."""

    def __init__(self, connection: _Connection, state: ServerState) -> None:
        super().__init__(
            state.engine,
            connection.deliver,
            max_contexts=state.settings.server.max_contexts_per_socket,
            send_timeout=state.settings.server.send_timeout_seconds,
            metrics=state.metrics,
        )
        self._connection = connection

    async def drain(self, timeout: float) -> None:
        await super().drain(timeout)
        await self._connection.close(CLOSE_GOING_AWAY, "server shutting down")


class _Connection:
    def __init__(self, ws: WebSocket, state: ServerState) -> None:
        self.ws = ws
        self.state = state
        self.config = state.settings.server
        self._send_lock = asyncio.Lock()
        self._cancelled: set[str] = set()  # contexts whose remaining audio must not go out
        self._notices: set[asyncio.Task[None]] = set()
        self.contexts = _Contexts(self, state)

    async def run(self) -> None:
        key = presented_key(self.ws.headers) or self.ws.query_params.get("api_key")
        # With keys the (checked) key is the identity; without, a client-chosen key must not
        # let it escape its address's rate limit.
        identity = key if self.config.api_keys else (self.ws.client.host if self.ws.client else "unknown")
        await self.ws.accept()
        try:
            try:
                check_key(self.config.api_keys, key)
                self.state.limiter.check(identity)
            except VoxflowError as exc:
                await self._refuse(exc, CLOSE_UNAUTHORIZED if exc.code == "unauthorized" else CLOSE_TRY_AGAIN_LATER)
                return
            if self.state.draining:
                await self._refuse(VoxflowError("the server is shutting down", code="draining"), CLOSE_GOING_AWAY)
                return
            # No await between the count and the add, so concurrent handshakes cannot overshoot.
            if len(self.state.connections) >= self.config.max_sockets:
                message = f"at most {self.config.max_sockets} connections; try again later"
                await self._refuse(VoxflowError(message, code="limit_exceeded"), CLOSE_TRY_AGAIN_LATER)
                return
            self.state.connections.add(self.contexts)
            try:
                await self._reply(self._ready())
                await self._receive_loop(identity)
            finally:
                self.state.connections.discard(self.contexts)
                await self.contexts.close()
                for task in self._notices:
                    task.cancel()
                await asyncio.gather(*self._notices, return_exceptions=True)
        except _Disconnected:
            pass

    def _ready(self) -> Ready:
        return Ready(
            voices=tuple(info.name for info in self.state.engine.voices.infos()),
            default_voice=self.state.settings.engine.voice,
            limits=Limits(
                max_contexts=self.config.max_contexts_per_socket,
                max_message_chars=self.config.max_message_chars,
                max_context_chars=self.state.engine.config.max_text_chars,
            ),
        )

    async def _receive_loop(self, identity: str) -> None:
        while True:
            frame = await self.ws.receive()
            if frame["type"] == "websocket.disconnect":
                return
            text = frame.get("text")
            if text is not None and len(text) > self.config.max_message_chars:
                await self._error(None, VoxflowError(
                    f"message of {len(text)} characters; at most {self.config.max_message_chars}", code="limit_exceeded"
                ))
                continue
            try:
                msg = parse_client(text if text is not None else frame.get("bytes", b""))
            except ProtocolError as exc:
                await self._error(exc.context, exc)
                continue
            try:
                await self._dispatch(msg, identity)
            except _Disconnected:
                raise
            except VoxflowError as exc:
                await self._error(getattr(msg, "context", None), exc)
            except Exception:  # one bad message must not take the other contexts down
                _LOGGER.exception("native stream: %s failed", msg.type)
                await self._error(getattr(msg, "context", None), VoxflowError("internal error", code="internal_error"))

    async def _dispatch(self, msg: Start | Text | Flush | End | Cancel | Ping, identity: str) -> None:
        match msg:
            case Start():
                await self._open(msg, identity)
            case Text(context=context, text=text):
                if context not in self.contexts:
                    await self._open(Start(context), identity)
                await self.contexts.push(context, text)
                # Queued together with the text, so a canned phrase reaches the stream whole
                # (which is what lets the audio cache answer it).
                if msg.end:
                    await self.contexts.end(context)
                elif msg.flush:
                    await self.contexts.flush(context)
            case Flush(context=context):
                await self.contexts.flush(context)
            case End(context=context):
                await self.contexts.end(context)
            case Cancel(context=context):
                # A stream that already finished ignores the cancel and still delivers its
                # queued audio and `done`; none of that may be held back then.
                finished = self.contexts.stream(context).done
                self.contexts.cancel(context)
                if not finished:
                    self._cancelled.add(context)
            case Ping(id=ping_id):
                await self._reply(Pong(ping_id))

    async def _open(self, msg: Start, identity: str) -> None:
        if self.state.draining:
            raise VoxflowError("the server is shutting down; no new contexts", code="draining")
        self.state.limiter.check(identity)
        stream = self.contexts.open(ContextRequest(
            msg.context,
            voice=self.state.voice_for(msg.voice),
            style=msg.resolved_style(),
            speaker=msg.speaker,
            seed=msg.seed,
            sample_rate=msg.sample_rate,
            frame_ms=msg.frame_ms,
        ))
        # Sent before the next message is read, hence before any event of this context.
        await self._reply(Started(
            msg.context,
            voice=stream.voice.info.name,
            sample_rate=msg.sample_rate or stream.voice.sample_rate,
            encoding=msg.encoding,
            frame_ms=msg.frame_ms,
        ))

    async def deliver(self, event: StreamEvent) -> None:
        """ContextSet's callback; it bounds the time this may take (send_timeout)."""
        if isinstance(event, StreamEnd):
            self._cancelled.discard(event.context_id)
            await self._deliver_end(event)
        elif event.context_id not in self._cancelled:
            if isinstance(event, AudioFrame):
                await self._send(pack_audio(event.context_id, event.seq, event.pts, event.pcm))
            else:
                await self._send(serialize_server(Word(event.context_id, event.word, event.start, event.end)))

    async def _deliver_end(self, event: StreamEnd) -> None:
        context = event.context_id
        if event.reason == "done":
            # One send, so no other context's frame comes between metrics and done.
            await self._send(serialize_server(self._metrics(context)), serialize_server(Done(context)))
        elif event.reason == "cancelled":
            await self._send(serialize_server(Cancelled(context)))
        elif event.code == "slow_consumer":
            # The socket is stalled, so this notice could not go out within ContextSet's bound
            # and would be lost, leaving the client waiting for the context forever. It waits
            # for the client to read again in a task the connection owns.
            notice = serialize_server(Error(context, event.code, event.message))
            task = asyncio.get_running_loop().create_task(self._send_quietly(notice), name=f"voxflow-notice-{context}")
            self._notices.add(task)
            task.add_done_callback(self._notices.discard)
        else:
            await self._send(serialize_server(Error(context, event.code, event.message)))

    def _metrics(self, context: str) -> Metrics:
        m = self.contexts.stream(context).metrics
        first_audio_ms = None
        if m.first_text is not None and m.first_audio is not None:
            first_audio_ms = round((m.first_audio - m.first_text) * 1000, 1)
        rtf = round(m.compute_seconds / m.audio_seconds, 4) if m.audio_seconds > 0 else None
        return Metrics(context, first_audio_ms, rtf, round(m.audio_seconds, 3))

    async def _send(self, *frames: str | bytes) -> None:
        """Frames go out whole and together: one lock per socket, shared by every context."""
        async with self._send_lock:
            try:
                for frame in frames:
                    if isinstance(frame, bytes):
                        await self.ws.send_bytes(frame)
                    else:
                        await self.ws.send_text(frame)
            except (WebSocketDisconnect, WebSocketDisconnected, OSError) as exc:
                raise _Disconnected("the connection is closed") from exc

    async def _send_quietly(self, frame: str) -> None:
        with contextlib.suppress(_Disconnected):
            await self._send(frame)

    async def _reply(self, msg: ServerMessage) -> None:
        """A control message from the receive loop: a client that reads nothing for
        send_timeout is treated as gone, as a stalled context would be dropped."""
        try:
            async with asyncio.timeout(self.config.send_timeout_seconds):
                await self._send(serialize_server(msg))
        except TimeoutError:
            raise _Disconnected("the client stopped reading") from None

    async def _error(self, context: str | None, exc: VoxflowError) -> None:
        self.state.metrics.errors.labels(exc.code).inc()
        await self._reply(Error(context, exc.code, str(exc)))

    async def _refuse(self, exc: VoxflowError, close_code: int) -> None:
        await self._error(None, exc)
        await self.close(close_code, exc.code)

    async def close(self, code: int, reason: str) -> None:
        # Bounded: a client that reads nothing holds up even the close frame, and a drain must
        # end; past the bound, the server's own shutdown drops the transport.
        with contextlib.suppress(TimeoutError, WebSocketDisconnect, WebSocketDisconnected, OSError):
            async with asyncio.timeout(self.config.send_timeout_seconds), self._send_lock:
                await self.ws.close(code, reason)


def install(app: FastAPI, state: ServerState) -> None:
    @app.websocket("/v1/stream")
    async def native_stream(ws: WebSocket) -> None:
        await _Connection(ws, state).run()
