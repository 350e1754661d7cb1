"""Speech recognition plug-ins: the interface the agent's ASR node calls.

A recognizer opens one session per turn. The node feeds it the person's audio while they
speak, so a streaming recognizer is nearly done when the turn ends, and asks for the final
text once the turn is over; a batch recognizer (a remote /v1/audio/transcriptions server)
collects the audio and does its work in `finish`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..errors import VoxflowError


class RecognitionError(VoxflowError):
    code = "asr_error"


class RecognitionSession(ABC):
    @abstractmethod
    async def feed(self, pcm: bytes) -> None:
        """More of the turn's audio: 16 kHz mono PCM16 little-endian."""

    @abstractmethod
    async def finish(self) -> str:
        """The final transcript of everything fed (may be empty); the session is then closed."""

    @abstractmethod
    async def aclose(self) -> None:
        """Abandon the session (the turn was dropped); safe to call at any time, twice too."""


class SpeechRecognizer(ABC):
    @abstractmethod
    def open_session(self) -> RecognitionSession: ...

    async def warm_up(self) -> None:
        """Load what the first session would otherwise wait for (a local model)."""

    async def aclose(self) -> None:
        """Release what the recognizer holds (models, HTTP clients)."""
