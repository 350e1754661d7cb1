"""The reply side of the graph: the LLM, the voice, the output. Everything here is dropped at
once when the person interrupts (graph.Graph.interrupt)."""

from __future__ import annotations

import asyncio
import contextlib

from ..streaming.engine import Engine
from ..streaming.events import AudioFrame, StreamEnd, WordTimestamp
from ..streaming.stream import StreamOptions, SynthesisStream
from ..voices.styles import Style
from .conversation import Conversation
from .events import AgentError, BotStarted, BotStopped, Interrupted, ReplyEvent
from .frames import BotSpeech, Interruption, ReplyEnd, ReplyText, Transcript
from .graph import Node
from .llm import LanguageModel, LanguageModelError
from .playout import Playout, ReplyDone
from .turn_metrics import TurnTimer


def reply_context(turn: int) -> str:
    """The synthesis context (and the transports' context id) of the reply to `turn`."""
    return f"reply-{turn}"


def reply_turn(context_id: str) -> int:
    return int(context_id.removeprefix("reply-"))


class LlmNode(Node):
    interruptible = True
    name = "llm"

    def __init__(self, llm: LanguageModel, conversation: Conversation, timer: TurnTimer, max_reply_chars: int) -> None:
        super().__init__()
        self.llm = llm
        self.conversation = conversation
        self.timer = timer
        self.max_reply_chars = max_reply_chars

    async def process(self, frame: Transcript) -> None:
        turn = frame.turn
        self.conversation.add_user(frame.text)
        if self.conversation.active_reply != turn:  # the person spoke again while it was transcribed
            return
        written: list[str] = []
        room = self.max_reply_chars
        error = ""
        try:
            # Closed on every way out, so a reply cut short releases the model's stream now.
            async with contextlib.aclosing(self.llm.stream(self.conversation.messages())) as pieces:
                async for piece in pieces:
                    if not piece:
                        continue
                    if not written:
                        self.timer.first_text(turn, self.now())
                    piece = piece[:room]
                    room -= len(piece)
                    written.append(piece)
                    await self.emit(ReplyText(turn, piece))
                    if room <= 0:
                        break
        except LanguageModelError as exc:
            error = exc.code
            self.report(AgentError(self.now(), exc.code, str(exc), turn))
        text = "".join(written)
        self.conversation.reply_written(turn, text)
        self.report(ReplyEvent(self.now(), turn, text, error))
        await self.emit(ReplyEnd(turn, error))


class TtsNode(Node):
    """One synthesis stream per reply, fed as the LLM writes; its events go to the output."""

    interruptible = True
    name = "tts"

    def __init__(self, engine: Engine, *, voice: str | None, style: Style, sample_rate: int, frame_ms: int) -> None:
        super().__init__()
        self.engine = engine
        self.voice = voice
        self.style = style
        self.options = StreamOptions(sample_rate=sample_rate, frame_ms=frame_ms, max_text_chars=engine.config.max_text_chars)
        self._stream: SynthesisStream | None = None
        self._pump: asyncio.Task[None] | None = None
        # Streams and pumps dropped by an interruption, until they have finished unwinding:
        # still owned here, so aclose waits for them.
        self._unwinding: set[asyncio.Task[None]] = set()

    async def process(self, frame: ReplyText | ReplyEnd) -> None:
        stream = self._open(frame.turn)
        if isinstance(frame, ReplyText):
            await stream.push(frame.text)
            return
        await stream.end()
        if self._pump is not None:
            try:
                await self._pump  # the next reply waits until this one's audio is all with the output
            except asyncio.CancelledError:
                # An interruption or closing: the stream stays held, so that interrupt() or
                # aclose() cancels it; its synthesis may be far from done.
                raise
            except Exception:
                self._drop()
                raise
        self._stream = self._pump = None

    def _open(self, turn: int) -> SynthesisStream:
        # A reply with no text still gets a (silent) stream: its end tells the output the
        # reply is over.
        if self._stream is None:
            self._stream = self.engine.open_stream(
                voice=self.voice, style=self.style, context_id=reply_context(turn), options=self.options, cached=False
            )
            self._pump = asyncio.get_running_loop().create_task(self._forward(self._stream), name=f"voxflow-agent-tts-{turn}")
        return self._stream

    async def _forward(self, stream: SynthesisStream) -> None:
        async for event in stream:
            await self.emit(event)

    def interrupt(self, frame: Interruption) -> None:
        self._drop()

    def _drop(self) -> None:
        dropped: list[asyncio.Task[None]] = []
        if self._stream is not None:
            self._stream.cancel()  # no audio after this call; its task ends at the next await
            dropped.append(asyncio.get_running_loop().create_task(self._stream.aclose(), name=f"voxflow-agent-tts-drop-{self._stream.context_id}"))
        if self._pump is not None:
            self._pump.cancel()
            dropped.append(self._pump)
        self._stream = self._pump = None
        for task in dropped:
            if not task.done():
                self._unwinding.add(task)
                task.add_done_callback(self._unwinding.discard)

    async def aclose(self) -> None:
        self._drop()
        await asyncio.gather(*self._unwinding, return_exceptions=True)


class OutputNode(Node):
    """Hands the bot's audio to the playout and keeps each reply's words, so that a barge-in
    knows what was heard."""

    interruptible = True
    name = "output"

    def __init__(self, conversation: Conversation, timer: TurnTimer) -> None:
        super().__init__()
        self.conversation = conversation
        self.timer = timer
        self.playout: Playout | None = None  # set by the agent once the sink is known
        self._words: dict[str, list[WordTimestamp]] = {}

    async def process(self, frame: BotSpeech) -> None:
        playout = self._playout
        if isinstance(frame, AudioFrame):
            await playout.put(frame)
        elif isinstance(frame, WordTimestamp):
            self._words.setdefault(frame.context_id, []).append(frame)
        else:
            assert isinstance(frame, StreamEnd)
            if frame.reason == "error":
                self.report(AgentError(self.now(), frame.code, frame.message, reply_turn(frame.context_id)))
            await playout.put(ReplyDone(frame.context_id))

    def started(self, context_id: str, due: float) -> None:
        """The playout handed out the reply's first frame, heard from `due`."""
        turn = reply_turn(context_id)
        self.report(BotStarted(due, turn))
        self.timer.first_audio(turn, due)

    def done(self, context_id: str) -> None:
        """The reply was heard to its end."""
        turn = reply_turn(context_id)
        words = self._words.pop(context_id, [])
        now = self.now()
        if context_id in self._playout.first_due:
            self.report(BotStopped(now, turn, "done", " ".join(w.word for w in words)))
        else:
            self.timer.no_reply(turn, now)
        self._playout.forget(context_id)
        self.conversation.reply_heard(turn)

    def interrupt(self, frame: Interruption) -> None:
        turn = self.conversation.active_reply
        if turn is None:
            return
        context = reply_context(turn)
        stops_at = self._playout.clear(context)
        heard = self._playout.heard_seconds(context)
        # A word counts as said once half of it was heard.
        spoken = " ".join(w.word for w in self._words.pop(context, []) if (w.start + w.end) / 2 <= heard)
        now = self.now()
        if context in self._playout.first_due:
            self.report(BotStopped(now, turn, "interrupted", spoken))
        else:
            self.timer.no_reply(turn, now)
        self._playout.forget(context)
        self.report(Interrupted(now, turn, frame.turn, spoken, round((stops_at - frame.decided_at) * 1000, 1)))
        self.conversation.reply_cut(turn, spoken)

    @property
    def _playout(self) -> Playout:
        assert self.playout is not None, "the agent attaches the playout before the graph runs"
        return self.playout
