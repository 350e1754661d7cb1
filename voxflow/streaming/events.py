"""The one frame type and event vocabulary that flows from the engine to every transport."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class AudioFrame:
    """A fixed-size block of mono little-endian PCM16 audio.

    pts is the frame's start on the stream's timeline in seconds; seq counts frames from 0.
    """

    context_id: str
    seq: int
    pts: float
    sample_rate: int
    pcm: bytes

    @property
    def samples(self) -> int:
        return len(self.pcm) // 2

    @property
    def duration(self) -> float:
        return self.samples / self.sample_rate


@dataclass(frozen=True, slots=True)
class WordTimestamp:
    """When a word is spoken, on the same timeline as AudioFrame.pts (seconds)."""

    context_id: str
    word: str
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """Always the last event of a stream. reason 'error' carries code and message."""

    context_id: str
    reason: Literal["done", "cancelled", "error"]
    code: str = ""
    message: str = ""


StreamEvent = AudioFrame | WordTimestamp | StreamEnd
