"""Conversations with the agent, for every carrier alike: admission, the shared recognizer and LLM, events out and into /metrics, clean ends."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..agent.agent import Agent
from ..agent.asr import SpeechRecognizer
from ..agent.events import AgentEvent
from ..agent.llm import LanguageModel, language_model_from_config
from ..agent.playout import AudioSink
from ..agent.recognizers import recognizer_from_config
from ..errors import VoxflowError
from ..streaming.events import AudioFrame
from .core.admission import Identity, Ticket
from .core.auth import RateLimiter
from .core.metrics import ServerMetrics

if TYPE_CHECKING:
    from .app import ServerState

_LOGGER = logging.getLogger(__name__)

SendEvent = Callable[[AgentEvent], Awaitable[None]]


@dataclass(frozen=True)
class ConversationAudio:
    """What a carrier gives a conversation: where the bot's audio goes and how the person's comes.

    microphone: audio the carrier receives on its own (a WebRTC track), read by the conversation;
    None when the carrier hands each piece to `feed` (binary WebSocket frames).
    """

    sink: AudioSink
    input_rate: int
    lead: float  # how early the sink gets each frame (the carrier's jitter buffer)
    microphone: AsyncIterator[bytes] | None = None


class _Outlet:
    """The carrier's sink as the agent's playout sees it: a carrier that can no longer take
    audio (any VoxflowError, e.g. Disconnected) ends the conversation instead of killing the
    playout task under a live agent."""

    def __init__(self, sink: AudioSink, metrics: ServerMetrics, lost: Callable[[], object]) -> None:
        self.sink = sink
        self.sample_rate = sink.sample_rate
        self._metrics = metrics
        self._lost = lost

    async def play(self, frame: AudioFrame, due: float) -> None:
        try:
            await self.sink.play(frame, due)
        except VoxflowError:
            self._lost()
        else:
            self._metrics.frames_sent.inc()

    def stop(self, context_id: str) -> None:
        self.sink.stop(context_id)


class LiveConversation:
    """One agent on one connection. Made by `open_conversation`; `start` once the client has
    been told; `aclose` (or a carrier that is gone) ends it, and its tasks with it."""

    def __init__(
        self, state: ServerState, audio: ConversationAudio, voice: str, style: str | None, send: SendEvent, ticket: Ticket
    ) -> None:
        config = state.settings.agent
        config = dataclasses.replace(config, tts_voice=voice, tts_style=config.tts_style if style is None else style)
        self.voice = voice
        self.input_rate = audio.input_rate
        self.sample_rate = audio.sink.sample_rate
        self.fed_by_carrier = audio.microphone is None
        self._state = state
        self._send = send
        self._ticket = ticket
        self._real_time = RateLimiter(1.0, unit="seconds of audio")
        self._microphone = audio.microphone
        self.agent = Agent(
            state.engine, config, _Outlet(audio.sink, state.metrics, self.begin_close), input_rate=audio.input_rate,
            recognizer=state.recognizer, llm=state.llm, lead=audio.lead,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: asyncio.Task[None] | None = None

    @property
    def closed(self) -> bool:
        return self._closing is not None

    def start(self) -> None:
        self._spawn(self._forward(), "events")
        if self._microphone is not None:
            self._spawn(self._listen(self._microphone), "microphone")

    async def feed(self, pcm: bytes) -> None:
        """Microphone audio from the carrier (mono PCM16 LE at input_rate); raises InvalidAudio,
        or RateLimited for audio that runs more than two seconds ahead of real time: speech
        recognition on a faster stream would take the compute other clients are due."""
        self._real_time.check("microphone", cost=len(pcm) / 2 / self.input_rate)
        await self.agent.feed(pcm)

    async def _forward(self) -> None:
        try:
            async for event in self.agent.events():
                self._state.metrics.agent_event(event)
                await self._send(event)
        except VoxflowError:  # the carrier cannot take it (gone, or not reading)
            self.begin_close()
        except Exception:  # a bug must end the conversation visibly, not leave it deaf
            _LOGGER.exception("a conversation's events could not be forwarded")
            self.begin_close()

    async def _listen(self, microphone: AsyncIterator[bytes]) -> None:
        async with contextlib.aclosing(microphone):
            async for pcm in microphone:
                await self.agent.feed(pcm)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coro, name=f"voxflow-conversation-{name}"))

    def begin_close(self) -> asyncio.Task[None]:
        """Starts ending the conversation (once), from any task or callback."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close(), name="voxflow-conversation-close")
        return self._closing

    async def aclose(self) -> None:
        # Shielded: a carrier cancelled while it waits (its handler torn down) must not leave
        # the agent half closed.
        await asyncio.shield(self.begin_close())

    async def _close(self) -> None:
        try:
            for task in self._tasks:  # nothing feeds or forwards from here on
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.agent.aclose()
        finally:
            # Counted until its resources are released, so admission never overshoots.
            self._ticket.release()
            self._state.conversations.discard(self)
            self._state.metrics.agent_conversations.set(len(self._state.conversations))


def open_conversation(
    state: ServerState, identity: Identity, audio: ConversationAudio, *, voice: str | None, style: str | None, send: SendEvent
) -> LiveConversation:
    """A new conversation, admitted in the conversation pool; raises VoxflowError when refused.

    voice is a name or alias as the client gave it (None: the agent's configured voice).
    """
    ticket = state.admission.admit(identity, "conversation")
    try:
        voice_name = state.voice_for(voice or state.settings.agent.tts_voice or None)
        conversation = LiveConversation(state, audio, voice_name, style, send, ticket)
    except BaseException:
        ticket.release()
        raise
    state.conversations.add(conversation)
    state.metrics.agent_conversations.set(len(state.conversations))
    return conversation


@contextlib.asynccontextmanager
async def agent_plugins(state: ServerState) -> AsyncIterator[None]:
    """The recognizer and LLM every conversation shares, ready (warm) before the server says so;
    at exit the conversations still open end first, then the plug-ins close."""
    config = state.settings.agent
    recognizer = state.recognizer = recognizer_from_config(config)
    try:
        llm = state.llm = language_model_from_config(config)
        try:
            await recognizer.warm_up()
            yield
        finally:
            await asyncio.gather(*(c.aclose() for c in list(state.conversations)), return_exceptions=True)
            await _close_quietly(llm)
    finally:
        await _close_quietly(recognizer)


async def _close_quietly(plugin: SpeechRecognizer | LanguageModel) -> None:
    try:
        await plugin.aclose()
    except Exception:
        _LOGGER.exception("closing %s failed", type(plugin).__name__)
