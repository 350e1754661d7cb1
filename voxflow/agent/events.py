"""What a conversation tells the outside world: one vocabulary for the events file, the native
WebSocket protocol and the WebRTC data channel (each only wraps it).

Every event has `type` and `t`, seconds on the agent's clock since the conversation started.
Turn numbers count the person's turns from 1; a reply has the number of the turn it answers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    type: ClassVar[str] = "speech_started"
    t: float
    turn: int
    speech_start: float  # where the speech began in the input audio (s)


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    type: ClassVar[str] = "speech_stopped"
    t: float
    turn: int
    speech_end: float  # where the speech ended in the input audio (s)
    forced: bool = False  # the turn reached max_turn_seconds


@dataclass(frozen=True, slots=True)
class TranscriptEvent:
    type: ClassVar[str] = "transcript"
    t: float
    turn: int
    text: str  # empty: nothing was recognised, and the turn gets no reply


@dataclass(frozen=True, slots=True)
class ReplyEvent:
    """The LLM finished writing (or failed: then error names why, text is what came)."""

    type: ClassVar[str] = "reply"
    t: float
    turn: int
    text: str
    error: str = ""


@dataclass(frozen=True, slots=True)
class BotStarted:
    type: ClassVar[str] = "bot_started"
    t: float
    turn: int


@dataclass(frozen=True, slots=True)
class BotStopped:
    """The reply's audio ended; spoken is what the person heard (all of it when done)."""

    type: ClassVar[str] = "bot_stopped"
    t: float
    turn: int
    reason: Literal["done", "interrupted"]
    spoken: str


@dataclass(frozen=True, slots=True)
class Interrupted:
    """The person spoke over reply `turn`; stop_ms is from that decision to the audio's end."""

    type: ClassVar[str] = "interrupted"
    t: float
    turn: int
    by_turn: int
    spoken: str
    stop_ms: float


@dataclass(frozen=True, slots=True)
class TurnMetrics:
    """One turn's latency, each part in milliseconds (None: that step did not happen).

    voice_to_voice_ms runs from the end of the person's speech to the reply's first audio; it
    is the sum of the four parts.
    """

    type: ClassVar[str] = "turn_metrics"
    t: float
    turn: int
    end_of_turn_ms: float  # silence waited before the turn was called over
    asr_ms: float | None  # turn over -> final transcript
    llm_first_token_ms: float | None  # transcript -> the LLM's first text
    tts_first_audio_ms: float | None  # first text -> first audio played
    voice_to_voice_ms: float | None


@dataclass(frozen=True, slots=True)
class AgentError:
    type: ClassVar[str] = "error"
    t: float
    code: str
    message: str
    turn: int | None = None


AgentEvent = (
    SpeechStarted | SpeechStopped | TranscriptEvent | ReplyEvent | BotStarted | BotStopped
    | Interrupted | TurnMetrics | AgentError
)
EVENT_TYPES: dict[str, type] = {
    cls.type: cls
    for cls in (SpeechStarted, SpeechStopped, TranscriptEvent, ReplyEvent, BotStarted, BotStopped, Interrupted, TurnMetrics, AgentError)
}


def event_to_dict(event: AgentEvent) -> dict[str, Any]:
    out: dict[str, Any] = {"type": event.type}
    for field in dataclasses.fields(event):
        value = getattr(event, field.name)
        out[field.name] = round(value, 4) if isinstance(value, float) else value
    return out


def event_from_dict(data: dict[str, Any]) -> AgentEvent:
    """The inverse of event_to_dict, for clients and tests; KeyError/TypeError on a bad one."""
    cls = EVENT_TYPES[data["type"]]
    return cls(**{k: v for k, v in data.items() if k != "type"})
