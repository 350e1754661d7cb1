"""The native streaming endpoint, `/v1/stream` (docs/protocol.md): socket <-> ContextSet and
the socket's conversation with the agent.

The protocol itself lives in native_protocol, its server side in native_dispatch (shared with
the WebRTC data channel), the contexts in ContextSet and conversations in conversations; this
module only admits connections and moves frames between the socket and the dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from fastapi import FastAPI, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from ..errors import VoxflowError
from ..streaming.events import AudioFrame, StreamEnd, StreamEvent
from .auth import check_key, presented_key
from .conversations import ConversationAudio
from .native_dispatch import Disconnected, NativeDispatch
from .native_protocol import Listen, ServerMessage, Word, pack_audio, serialize_server

if TYPE_CHECKING:
    from .app import ServerState  # app imports this module to install it

CLOSE_GOING_AWAY = 1001
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_UNAUTHORIZED = 4001
# A conversation's reply audio goes out this long before it is due: the client's jitter buffer.
REPLY_LEAD_SECONDS = 0.1


class _SocketSink:
    """The bot's reply as binary audio frames, each sent when the agent's playout hands it out.

    What was sent is the client's: on a barge-in there is nothing here to drop, and the
    `interrupted` event tells the client to drop what it still buffers of that reply.
    """

    def __init__(self, connection: _Connection, sample_rate: int) -> None:
        self._connection = connection
        self.sample_rate = sample_rate

    async def play(self, frame: AudioFrame, due: float) -> None:
        await self._connection.send_within(pack_audio(frame.context_id, frame.seq, frame.pts, frame.pcm))

    def stop(self, context_id: str) -> None:
        pass


class _Connection:
    def __init__(self, ws: WebSocket, state: ServerState) -> None:
        self.ws = ws
        self.state = state
        self.config = state.settings.server
        self._send_lock = asyncio.Lock()
        self._notices: set[asyncio.Task[None]] = set()
        # Once a server drain has let its contexts finish, the socket closes with 1001.
        self.contexts = state.connection_contexts(self.deliver, after_drain=self._drained)
        self.dispatch = NativeDispatch(state, self.contexts, self._reply, self._conversation_audio)

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
                await self._reply(self.dispatch.ready())
                await self._receive_loop(identity)
            finally:
                self.state.connections.discard(self.contexts)
                await self.dispatch.end_conversation()
                await self.contexts.close()
                for task in self._notices:
                    task.cancel()
                await asyncio.gather(*self._notices, return_exceptions=True)
        except Disconnected:
            pass

    async def _receive_loop(self, identity: str) -> None:
        while True:
            frame = await self.ws.receive()
            if frame["type"] == "websocket.disconnect":
                return
            text = frame.get("text")
            await self.dispatch.receive(text if text is not None else frame.get("bytes", b""), identity)

    async def deliver(self, event: StreamEvent) -> None:
        """ContextSet's callback; it bounds the time this may take (send_timeout)."""
        if isinstance(event, StreamEnd):
            await self._deliver_end(event)
        elif event.context_id not in self.dispatch.cancelled:
            if isinstance(event, AudioFrame):
                await self._send(pack_audio(event.context_id, event.seq, event.pts, event.pcm))
            else:
                await self._send(serialize_server(Word(event.context_id, event.word, event.start, event.end)))

    async def _deliver_end(self, event: StreamEnd) -> None:
        context = event.context_id
        messages = self.dispatch.end_messages(event)
        if event.code == "slow_consumer":
            # The socket is stalled, so this notice could not go out within ContextSet's bound
            # and would be lost, leaving the client waiting for the context forever. It waits
            # for the client to read again in a task the connection owns.
            notice = serialize_server(messages[0])
            task = asyncio.get_running_loop().create_task(self._send_quietly(notice), name=f"voxflow-notice-{context}")
            self._notices.add(task)
            task.add_done_callback(self._notices.discard)
        else:
            # One send, so no other context's frame comes between metrics and done.
            await self._send(*(serialize_server(msg) for msg in messages))

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
                raise Disconnected("the connection is closed") from exc

    async def _send_quietly(self, frame: str) -> None:
        with contextlib.suppress(Disconnected):
            await self._send(frame)

    async def _reply(self, msg: ServerMessage) -> None:
        await self.send_within(serialize_server(msg))

    async def send_within(self, *frames: str | bytes) -> None:
        """Frames from outside a context's pump (answers, a conversation's events and audio): a
        client that reads nothing for send_timeout is treated as gone, as a stalled context
        would be dropped. From the receive loop that ends the connection; from a conversation,
        the conversation."""
        try:
            async with asyncio.timeout(self.config.send_timeout_seconds):
                await self._send(*frames)
        except TimeoutError:
            raise Disconnected("the client stopped reading") from None

    def _conversation_audio(self, listen: Listen) -> ConversationAudio:
        return ConversationAudio(_SocketSink(self, listen.output_sample_rate), listen.sample_rate, REPLY_LEAD_SECONDS)

    async def _drained(self) -> None:
        # A conversation has no end of its own to wait for: it ends with the drain, before its
        # socket closes under it.
        await self.dispatch.end_conversation()
        await self.close(CLOSE_GOING_AWAY, "server shutting down")

    async def _refuse(self, exc: VoxflowError, close_code: int) -> None:
        await self.dispatch.error(None, exc)
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
