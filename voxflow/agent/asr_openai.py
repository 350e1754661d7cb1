"""Recognition by an OpenAI-compatible /v1/audio/transcriptions server (OpenAI, whisper servers).

Such a server takes a whole file, so a session only collects the turn's audio (at most
`max_seconds` of it; the rest is ignored) and uploads it as a WAV file in `finish`.
"""

from __future__ import annotations

import asyncio
import os

import openai

from ..config import AgentConfig
from ..errors import InvalidRequest
from ..wav import wav_file
from .asr import RecognitionError, RecognitionSession, SpeechRecognizer

RATE = 16_000


class OpenAITranscriber(SpeechRecognizer):
    def __init__(
        self,
        *,
        base_url: str | None,
        model: str = "whisper-1",
        api_key: str | None = None,
        timeout: float = 15.0,
        max_seconds: float = 60.0,
    ) -> None:
        if timeout <= 0 or max_seconds <= 0:
            raise InvalidRequest("timeout and max_seconds must be positive")
        self._model = model
        self._timeout = timeout
        self._max_bytes = int(max_seconds * RATE) * 2
        self._where = base_url or "the OpenAI API"
        # No retries: the person is waiting for an answer, and a retry after a timeout
        # would double the wait.
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)

    @classmethod
    def from_config(cls, config: AgentConfig) -> OpenAITranscriber:
        base_url = config.asr_base_url or None
        # Local whisper servers usually ignore the key, but the client insists on one.
        api_key = config.asr_api_key or os.environ.get("OPENAI_API_KEY") or ("not-needed" if base_url else None)
        if api_key is None:
            raise RecognitionError(
                "asr='openai' needs asr_base_url (a local server) or an API key (asr_api_key or OPENAI_API_KEY)",
                code="asr_not_configured",
            )
        return cls(base_url=base_url, model=config.asr_model, api_key=api_key)

    def open_session(self) -> RecognitionSession:
        return _Session(self, self._max_bytes)

    async def transcribe(self, pcm: bytes) -> str:
        """The transcript of 16 kHz mono PCM16 audio."""
        upload = ("turn.wav", wav_file(pcm, RATE), "audio/wav")
        try:
            # The client's timeout bounds each phase of the request; this bounds the whole of
            # it, so a server that trickles its answer cannot hold the turn either.
            async with asyncio.timeout(self._timeout):
                result = await self._client.audio.transcriptions.create(model=self._model, file=upload)
        except (TimeoutError, openai.APITimeoutError) as exc:
            raise RecognitionError(f"{self._where} did not transcribe within {self._timeout:g} s") from exc
        except openai.APIStatusError as exc:
            raise RecognitionError(f"{self._where} refused the transcription (HTTP {exc.status_code}): {exc.message}") from exc
        except openai.APIConnectionError as exc:
            raise RecognitionError(f"cannot reach {self._where}: {exc}") from exc
        except openai.OpenAIError as exc:
            raise RecognitionError(f"transcription by {self._where} failed: {exc}") from exc
        return result.text.strip()

    async def aclose(self) -> None:
        await self._client.close()


class _Session(RecognitionSession):
    def __init__(self, transcriber: OpenAITranscriber, max_bytes: int) -> None:
        self._transcriber = transcriber
        self._room = max_bytes
        self._audio = bytearray()
        self._closed = False

    async def feed(self, pcm: bytes) -> None:
        if self._closed:
            raise RecognitionError("the recognition session is closed")
        accepted = pcm[: self._room]
        self._room -= len(accepted)
        self._audio += accepted

    async def finish(self) -> str:
        if self._closed:
            raise RecognitionError("the recognition session is closed")
        self._closed = True
        audio = bytes(self._audio[: len(self._audio) - len(self._audio) % 2])
        self._audio.clear()
        if not audio:
            return ""
        return await self._transcriber.transcribe(audio)

    async def aclose(self) -> None:
        self._closed = True
        self._audio.clear()
