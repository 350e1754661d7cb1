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

from ..errors import VoxflowError
from ..streaming.events import AudioFrame, StreamEnd, StreamEvent
from .conversations import ConversationAudio
from .core.contexts import Disconnected
from .core.websocket import CLOSE_GOING_AWAY, SocketCarrier
from .native_dispatch import NativeDispatch
from .protocols.native_protocol import Error, Listen, ServerMessage, Word, pack_audio, serialize_server

if TYPE_CHECKING:
    from .app import ServerState  # app imports this module to install it

# A conversation's reply audio goes out this long before it is due: the client's jitter buffer.
REPLY_LEAD_SECONDS = 0.1


class _SocketSink:
    """The bot's reply as binary audio frames, each sent when the agent's playout hands it out.

    What was sent is the client's: on a barge-in there is nothing here to drop, and the
    `interrupted` event tells the client to drop what it still buffers of that reply.
    """

    def __init__(self, socket: SocketCarrier, sample_rate: int) -> None:
        self._socket = socket
        self.sample_rate = sample_rate

    async def play(self, frame: AudioFrame, due: float) -> None:
        await self._socket.send_within(pack_audio(frame.context_id, frame.seq, frame.pts, frame.pcm))

    def stop(self, context_id: str) -> None:
        pass


class _Connection:
    def __init__(self, ws: WebSocket, state: ServerState) -> None:
        self.socket = SocketCarrier(ws, state.settings.server.send_timeout_seconds)
        self.state = state
        self._notices: set[asyncio.Task[None]] = set()
        # Once a server drain has let its contexts finish, the socket closes with 1001.
        self.contexts = state.connection_contexts(self.deliver, after_drain=self._drained)
        self.dispatch = NativeDispatch(state, self.contexts, self._reply, self._conversation_audio)

    async def run(self) -> None:
        await self.socket.ws.accept()
        try:
            identity, ticket = self.socket.admit(self.state.admission, self.socket.presented_key("api_key"))
        except VoxflowError as exc:
            self.state.metrics.errors.labels(exc.code).inc()
            await self.socket.refuse(serialize_server(Error(None, exc.code, str(exc))), exc)
            return
        with ticket, contextlib.suppress(Disconnected):
            try:
                async with self.state.serving(self.contexts):
                    try:
                        await self._reply(self.dispatch.ready())
                        while (data := await self.socket.receive()) is not None:
                            await self.dispatch.receive(data, identity)
                    finally:
                        await self.dispatch.end_conversation()
            finally:  # after the contexts: their ends may still have queued a notice
                for task in self._notices:
                    task.cancel()
                await asyncio.gather(*self._notices, return_exceptions=True)

    async def deliver(self, event: StreamEvent) -> None:
        """ContextSet's callback; it bounds the time this may take (send_timeout)."""
        if isinstance(event, StreamEnd):
            await self._deliver_end(event)
        elif event.context_id not in self.dispatch.cancelled:
            if isinstance(event, AudioFrame):
                await self.socket.send(pack_audio(event.context_id, event.seq, event.pts, event.pcm))
            else:
                await self.socket.send(serialize_server(Word(event.context_id, event.word, event.start, event.end)))

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
            await self.socket.send(*(serialize_server(msg) for msg in messages))

    async def _send_quietly(self, frame: str) -> None:
        with contextlib.suppress(Disconnected):
            await self.socket.send(frame)

    async def _reply(self, msg: ServerMessage) -> None:
        """Answers and a conversation's events: a client that reads nothing for send_timeout is
        treated as gone, as a stalled context would be dropped. From the receive loop that ends
        the connection; from a conversation, the conversation."""
        await self.socket.send_within(serialize_server(msg))

    def _conversation_audio(self, listen: Listen) -> ConversationAudio:
        return ConversationAudio(_SocketSink(self.socket, listen.output_sample_rate), listen.sample_rate, REPLY_LEAD_SECONDS)

    async def _drained(self) -> None:
        # A conversation has no end of its own to wait for: it ends with the drain, before its
        # socket closes under it.
        await self.dispatch.end_conversation()
        await self.socket.close(CLOSE_GOING_AWAY, "server shutting down")


def install(app: FastAPI, state: ServerState) -> None:
    @app.websocket("/v1/stream")
    async def native_stream(ws: WebSocket) -> None:
        await _Connection(ws, state).run()
