"""One conversation: the graph assembled from AgentConfig, fed microphone audio, playing the
bot's replies into a sink, and telling what happens as events.

    mic -> VadNode -> TurnNode -> AsrNode -> LlmNode -> TtsNode -> OutputNode -> Playout -> sink
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from ..config import AgentConfig
from ..streaming.engine import Engine
from ..voices.styles import resolve_style
from .asr import SpeechRecognizer
from .conversation import Conversation
from .events import AgentEvent
from .frames import InputAudio
from .graph import Clock, Graph
from .listening import AsrNode, TurnNode, VadNode
from .llm import LanguageModel, language_model_from_config
from .playout import AudioSink, Playout
from .recognizers import recognizer_from_config
from .speaking import LlmNode, OutputNode, TtsNode
from .turn_metrics import TurnTimer
from .turns import TurnOptions, TurnTracker
from .vad import InvalidAudio, VoiceActivity

MAX_CHUNK_SECONDS = 1.0  # the most audio one feed() takes
MAX_EVENTS = 1024  # events waiting for a reader; past it the oldest are dropped
OUTPUT_FRAME_MS = 20


class Agent:
    """Create with an event loop running; `aclose` (or `async with`) ends it.

    recognizer / llm given here belong to the caller (a server shares one recognizer and its
    decoder pool between conversations); those made from the config belong to the agent.
    lead is how early the playout hands audio to the sink (see playout.Playout).
    """

    def __init__(
        self,
        engine: Engine,
        config: AgentConfig,
        sink: AudioSink,
        *,
        input_rate: int,
        recognizer: SpeechRecognizer | None = None,
        llm: LanguageModel | None = None,
        lead: float = 0.0,
    ) -> None:
        self.input_rate = input_rate
        self.clock = Clock()
        self.events_dropped = 0
        self._events: asyncio.Queue[AgentEvent | None] = asyncio.Queue()
        self._closed = False
        activity = VoiceActivity(input_rate, aggressiveness=config.vad_aggressiveness, frame_ms=config.vad_frame_ms)
        self.tracker = TurnTracker(TurnOptions.from_config(config))
        style = resolve_style(config.tts_style or None)
        voice = config.tts_voice or None
        engine.voices.info(voice)  # an unknown voice fails here, not at the first reply
        self._owned: list[SpeechRecognizer | LanguageModel] = []
        if recognizer is None:
            recognizer = recognizer_from_config(config)
            self._owned.append(recognizer)
        if llm is None:
            llm = language_model_from_config(config)
            self._owned.append(llm)
        self.conversation = Conversation(config.system_prompt, config.max_history_messages)
        timer = TurnTimer(self._report)
        output = OutputNode(self.conversation, timer)
        self.playout = Playout(sink, self.clock, output.started, output.done, frame_seconds=OUTPUT_FRAME_MS / 1000, lead=lead)
        output.playout = self.playout
        self.graph = Graph(
            [
                VadNode(activity),
                TurnNode(self.tracker, self.conversation, timer),
                AsrNode(recognizer, self.conversation, timer),
                LlmNode(llm, self.conversation, timer, config.max_reply_chars),
                TtsNode(engine, voice=voice, style=style, sample_rate=sink.sample_rate, frame_ms=OUTPUT_FRAME_MS),
                output,
            ],
            self.clock,
            self._report,
        )
        self.graph.start()
        self._playout_task = asyncio.get_running_loop().create_task(self.playout.run(), name="voxflow-agent-playout")

    async def feed(self, pcm: bytes) -> None:
        """Microphone audio: mono PCM16 little-endian at input_rate, any whole number of
        samples up to MAX_CHUNK_SECONDS. Waits while the graph is behind."""
        if not isinstance(pcm, (bytes, bytearray, memoryview)):
            raise InvalidAudio(f"audio must be bytes, got {type(pcm).__name__}")
        if len(pcm) % 2:
            raise InvalidAudio(f"audio is 16-bit samples: {len(pcm)} bytes is not a whole number of them")
        limit = int(MAX_CHUNK_SECONDS * self.input_rate) * 2
        if len(pcm) > limit:
            raise InvalidAudio(f"{len(pcm)} bytes of audio in one piece; at most {limit} ({MAX_CHUNK_SECONDS:g} s)")
        if self._closed:
            return
        await self.graph.put(InputAudio(bytes(pcm), self.input_rate))

    @property
    def quiet(self) -> bool:
        """Nobody speaks and nothing is on its way: no turn open, no reply pending or playing."""
        return (
            not self.tracker.in_turn
            and self.conversation.active_reply is None
            and all(node.inbox.empty() for node in self.graph.nodes)
        )

    @property
    def events_waiting(self) -> int:
        """Events reported but not yet taken by the reader."""
        return self._events.qsize()

    async def events(self) -> AsyncIterator[AgentEvent]:
        """Every event in order, until the agent is closed."""
        while (event := await self._events.get()) is not None:
            yield event

    def _report(self, event: AgentEvent) -> None:
        if self._closed:
            return
        if self._events.qsize() >= MAX_EVENTS:  # a reader that stopped must not grow memory
            self._events.get_nowait()
            self.events_dropped += 1
        self._events.put_nowait(event)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._playout_task.cancel()
        await asyncio.gather(self._playout_task, return_exceptions=True)
        await self.graph.aclose()
        for plugin in self._owned:
            with contextlib.suppress(Exception):
                await plugin.aclose()
        self._events.put_nowait(None)

    async def __aenter__(self) -> Agent:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
