"""The hearing side of the graph: voice activity, turns, speech recognition."""

from __future__ import annotations

from .asr import RecognitionError, RecognitionSession, SpeechRecognizer
from .conversation import Conversation
from .events import AgentError, SpeechStarted, SpeechStopped, TranscriptEvent
from .frames import (
    InputAudio,
    Interruption,
    Transcript,
    UserAudio,
    UserStartedSpeaking,
    UserStoppedSpeaking,
    VoiceFrame,
)
from .graph import Node
from .turn_metrics import TurnTimer
from .turns import TurnTracker
from .vad import VoiceActivity


class VadNode(Node):
    name = "vad"

    def __init__(self, activity: VoiceActivity) -> None:
        super().__init__()
        self.activity = activity

    async def process(self, frame: InputAudio) -> None:
        for voice in self.activity.process(frame.pcm):
            await self.emit(voice)


class TurnNode(Node):
    """Turns from voice frames; a turn that starts while a reply is pending is a barge-in."""

    name = "turns"

    def __init__(self, tracker: TurnTracker, conversation: Conversation, timer: TurnTimer) -> None:
        super().__init__()
        self.tracker = tracker
        self.conversation = conversation
        self.timer = timer

    async def process(self, frame: VoiceFrame) -> None:
        for out in self.tracker.process(frame, self.now()):
            if isinstance(out, UserStartedSpeaking):
                self.report(SpeechStarted(out.decided_at, out.turn, out.speech_start))
                if self.conversation.active_reply is not None:
                    self._graph.interrupt(Interruption(out.turn, out.decided_at))
            elif isinstance(out, UserStoppedSpeaking):
                self.report(SpeechStopped(out.decided_at, out.turn, out.speech_end, out.forced))
                self.timer.turn_over(out.turn, out.decided_at, waited=frame.end - out.speech_end)
                # From here a reply is pending: speech now interrupts it, even before it sounds.
                self.conversation.begin_reply(out.turn)
            await self.emit(out)


class AsrNode(Node):
    """One recognition session per turn, fed while the person speaks."""

    name = "asr"

    def __init__(self, recognizer: SpeechRecognizer, conversation: Conversation, timer: TurnTimer) -> None:
        super().__init__()
        self.recognizer = recognizer
        self.conversation = conversation
        self.timer = timer
        self._session: RecognitionSession | None = None

    async def process(self, frame: UserStartedSpeaking | UserAudio | UserStoppedSpeaking) -> None:
        if isinstance(frame, UserStartedSpeaking):
            await self._abandon()
            self._session = self.recognizer.open_session()
        elif isinstance(frame, UserAudio):
            if self._session is not None:
                await self._session.feed(frame.pcm)
        elif self._session is not None:
            session, self._session = self._session, None
            try:
                text = (await session.finish()).strip()
            except RecognitionError as exc:
                self.report(AgentError(self.now(), exc.code, str(exc), frame.turn))
                text = ""
            now = self.now()
            self.report(TranscriptEvent(now, frame.turn, text))
            self.timer.transcribed(frame.turn, now)
            if text:
                await self.emit(Transcript(frame.turn, text))
            else:  # nothing to answer: the turn is over without a reply
                self.conversation.reply_cut(frame.turn, "")
                self.timer.no_reply(frame.turn, now)

    async def _abandon(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.aclose()

    async def aclose(self) -> None:
        await self._abandon()
