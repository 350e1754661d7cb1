"""The native protocol's server side, whatever carries its messages (a WebSocket, a WebRTC
data channel): client frames -> ContextSet calls and the connection's conversation, with errors
answered as `error` messages.

A carrier supplies `reply` (one server message out, raising Disconnected once it cannot), its
own `deliver` for the ContextSet, which uses `cancelled` and `end_messages` from here, and
`conversation_audio`, the audio side of a conversation on that carrier; it calls
`end_conversation` when the connection goes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Awaitable, Callable

from ..agent.events import AgentEvent
from ..errors import VoxflowError
from ..streaming.events import StreamEnd
from .core.admission import Identity
from .core.contexts import ContextRequest, ContextSet, Disconnected
from .conversations import ConversationAudio, LiveConversation, open_conversation
from .protocols.native_protocol import (
    AGENT_FRAME_MS,
    AgentMessage,
    Cancel,
    Cancelled,
    ClientMessage,
    Done,
    End,
    Error,
    Flush,
    Limits,
    Listen,
    Listening,
    Metrics,
    MicrophoneAudio,
    Ping,
    Pong,
    ProtocolError,
    Ready,
    ServerMessage,
    Start,
    Started,
    StopListening,
    Text,
    parse_client,
)

if TYPE_CHECKING:
    from .app import ServerState

_LOGGER = logging.getLogger(__name__)

Reply = Callable[[ServerMessage], Awaitable[None]]
AudioFor = Callable[[Listen], ConversationAudio]


class NativeDispatch:
    """One connection's protocol state: its contexts and the contexts whose audio is withheld.

    sample_rate / frame_ms, when given, fix every context's output format (a carrier with an
    audio path of its own); `started` reports what is actually produced.
    """

    def __init__(
        self,
        state: ServerState,
        contexts: ContextSet,
        reply: Reply,
        conversation_audio: AudioFor,
        *,
        sample_rate: int | None = None,
        frame_ms: int | None = None,
    ) -> None:
        self.state = state
        self.contexts = contexts
        self.reply = reply
        self.conversation_audio = conversation_audio
        self.sample_rate = sample_rate
        self.frame_ms = frame_ms
        self.cancelled: set[str] = set()  # contexts whose remaining audio must not go out
        self._conversation: LiveConversation | None = None

    def ready(self) -> Ready:
        config = self.state.settings.server
        return Ready(
            voices=tuple(info.name for info in self.state.engine.voices.infos()),
            default_voice=self.state.settings.engine.voice,
            limits=Limits(
                max_contexts=self.contexts.max_contexts,
                max_message_chars=config.max_message_chars,
                max_context_chars=self.state.engine.config.max_text_chars,
            ),
        )

    async def receive(self, data: str | bytes, identity: Identity) -> None:
        """One client frame; whatever is wrong with it is answered with `error`, not raised."""
        limit = self.state.settings.server.max_message_chars
        if isinstance(data, str) and len(data) > limit:
            await self.error(None, VoxflowError(f"message of {len(data)} characters; at most {limit}", code="limit_exceeded"))
            return
        conversation = self.conversation
        audio_rate = conversation.input_rate if conversation is not None and conversation.fed_by_carrier else None
        try:
            msg = parse_client(data, audio_rate=audio_rate)
        except ProtocolError as exc:
            await self.error(exc.context, exc)
            return
        try:
            await self.handle(msg, identity)
        except Disconnected:
            raise
        except VoxflowError as exc:
            await self.error(getattr(msg, "context", None), exc)
        except Exception:  # one bad message must not take the other contexts down
            _LOGGER.exception("native protocol: %s failed", msg.type)
            await self.error(getattr(msg, "context", None), VoxflowError("internal error", code="internal_error"))

    async def handle(self, msg: ClientMessage, identity: Identity) -> None:
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
                    self.cancelled.add(context)
            case Ping(id=ping_id):
                await self.reply(Pong(ping_id))
            case MicrophoneAudio(pcm=pcm):
                # Parsed as audio only while a conversation was open, and no await since.
                assert self._conversation is not None
                await self._conversation.feed(pcm)
            case Listen():
                await self._listen(msg, identity)
            case StopListening():
                if self.conversation is None:
                    raise VoxflowError("no conversation is open on this connection", code="not_listening")
                await self.end_conversation()

    @property
    def conversation(self) -> LiveConversation | None:
        """The connection's conversation, while it is open."""
        if self._conversation is not None and self._conversation.closed:
            self._conversation = None
        return self._conversation

    async def _listen(self, msg: Listen, identity: Identity) -> None:
        if self.conversation is not None:
            raise VoxflowError("a conversation is already open on this connection; send stop_listening first", code="already_listening")
        conversation = open_conversation(
            self.state, identity, self.conversation_audio(msg), voice=msg.voice, style=msg.style, send=self._send_event
        )
        self._conversation = conversation
        try:
            await self.reply(Listening(conversation.input_rate, conversation.sample_rate, AGENT_FRAME_MS, conversation.voice))
        except BaseException:
            await self.end_conversation()
            raise
        # Only now: no event of the conversation may overtake `listening`.
        conversation.start()

    async def _send_event(self, event: AgentEvent) -> None:
        await self.reply(AgentMessage(event))

    async def end_conversation(self) -> None:
        """Ends the connection's conversation, if one is open; nothing of it is sent after this."""
        conversation, self._conversation = self._conversation, None
        if conversation is not None:
            await conversation.aclose()

    async def _open(self, msg: Start, identity: Identity) -> None:
        self.state.admission.check_new_work(identity)
        sample_rate = self.sample_rate or msg.sample_rate
        frame_ms = self.frame_ms or msg.frame_ms
        stream = self.contexts.open(ContextRequest(
            msg.context,
            voice=self.state.voice_for(msg.voice),
            style=msg.resolved_style(),
            speaker=msg.speaker,
            seed=msg.seed,
            sample_rate=sample_rate,
            frame_ms=frame_ms,
        ))
        # Sent before the next message is read, hence before any event of this context.
        await self.reply(Started(
            msg.context,
            voice=stream.info.name,
            sample_rate=sample_rate or stream.info.sample_rate,
            encoding=msg.encoding,
            frame_ms=frame_ms,
        ))

    def end_messages(self, event: StreamEnd) -> tuple[ServerMessage, ...]:
        """What a context's end becomes; a carrier sends them together (nothing between
        metrics and done). Clears the context's withheld mark, as its id may be reused."""
        self.cancelled.discard(event.context_id)
        context = event.context_id
        if event.reason == "done":
            return self.metrics(context), Done(context)
        if event.reason == "cancelled":
            return (Cancelled(context),)
        return (Error(context, event.code, event.message),)

    def metrics(self, context: str) -> Metrics:
        m = self.contexts.stream(context).metrics
        first_audio_ms = None
        if m.first_text is not None and m.first_audio is not None:
            first_audio_ms = round((m.first_audio - m.first_text) * 1000, 1)
        rtf = round(m.compute_seconds / m.audio_seconds, 4) if m.audio_seconds > 0 else None
        return Metrics(context, first_audio_ms, rtf, round(m.audio_seconds, 3))

    async def error(self, context: str | None, exc: VoxflowError) -> None:
        self.state.metrics.errors.labels(exc.code).inc()
        await self.reply(Error(context, exc.code, str(exc)))
