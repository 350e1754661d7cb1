"""The frames that flow between the agent's nodes, in the order the graph passes them.

Data frames travel through bounded queues, one node to the next. The one system frame,
Interruption, does not queue: the graph hands it to every node on the reply side at once,
after dropping whatever data those nodes still had waiting (graph.py).

Times are seconds on the agent's clock (graph.Clock): 0 is when the conversation started.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..streaming.events import AudioFrame, StreamEnd, WordTimestamp

VAD_RATE = 16_000  # webrtcvad and pocketsphinx both take 16 kHz mono PCM16


@dataclass(frozen=True, slots=True)
class InputAudio:
    """Microphone audio as it arrived: mono little-endian PCM16 at any supported rate."""

    pcm: bytes
    sample_rate: int


@dataclass(frozen=True, slots=True)
class VoiceFrame:
    """One VAD frame of 16 kHz audio; start is its place in the input audio (seconds)."""

    pcm: bytes
    start: float
    duration: float
    speech: bool

    @property
    def end(self) -> float:
        return self.start + self.duration


@dataclass(frozen=True, slots=True)
class UserStartedSpeaking:
    """The turn detector is sure the person speaks (after speech_start_ms of speech).

    speech_start is where the speech began in the input audio, decided_at when it was decided.
    """

    turn: int
    speech_start: float
    decided_at: float


@dataclass(frozen=True, slots=True)
class UserAudio:
    """The person's audio during a turn (16 kHz PCM16), pre-roll included, in order."""

    turn: int
    pcm: bytes


@dataclass(frozen=True, slots=True)
class UserStoppedSpeaking:
    """The turn is over: turn_end_ms of silence after speech_end (input audio seconds).

    decided_at is when it was decided, on the agent's clock; forced is true when the turn hit
    max_turn_seconds instead.
    """

    turn: int
    speech_end: float
    decided_at: float
    forced: bool = False


@dataclass(frozen=True, slots=True)
class Transcript:
    turn: int
    text: str


@dataclass(frozen=True, slots=True)
class ReplyText:
    """A piece of the reply as the LLM writes it."""

    turn: int
    text: str


@dataclass(frozen=True, slots=True)
class ReplyEnd:
    """The LLM is done with this reply (error: it failed; what it wrote is still spoken)."""

    turn: int
    error: str = ""


@dataclass(frozen=True, slots=True)
class Interruption:
    """The person spoke over the reply: drop it, stop its audio, keep what was heard."""

    turn: int  # the new turn that interrupts
    decided_at: float


# The engine's own events carry the bot's speech from the TTS node to the output node.
BotSpeech = AudioFrame | WordTimestamp | StreamEnd

DataFrame = (
    InputAudio | VoiceFrame | UserStartedSpeaking | UserAudio | UserStoppedSpeaking
    | Transcript | ReplyText | ReplyEnd | AudioFrame | WordTimestamp | StreamEnd
)
