"""A LiveKit Agents TTS plugin that speaks voxflow's own protocol, with aligned transcripts.

    from voxflow.integrations import livekit as voxflow

    session = AgentSession(stt=..., llm=..., tts=voxflow.TTS(url="ws://127.0.0.1:8765/v1/stream", style="calm"))

`TTS` keeps one WebSocket (voxflow.client.AsyncVoxflowClient) for all its streams. `stream()`
opens one voxflow context per stream (LiveKit's agent makes one stream per reply, a segment
each) and pushes the LLM's tokens as they come; `synthesize()` speaks a whole text the same
way. Each frame carries, as timed transcripts, the words the server timed in it: seconds from
the start of the segment's audio, which is the context's own timeline. Closing a stream
(LiveKit does when the user barges in) cancels its context; the server stops at its next
decoder block. Errors are LiveKit's: a lost connection is a retryable APIConnectionError (the
client reconnects in the background), a refused key or unknown voice an APIStatusError that
is not retried.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import replace

from ..client import DEFAULT_URL, AsyncVoxflowClient, Audio, Context, Error, StyleSpec, Word
from ..errors import VoxflowError
from . import SpeechOptions, missing_extra

try:
    from livekit.agents import APIConnectionError, APIConnectOptions, APIError, APIStatusError, APITimeoutError, tts
    from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, NotGivenOr, TimedString
    from livekit.agents.utils import aio, is_given, shortuuid
except ImportError as exc:
    raise missing_extra("livekit", exc) from exc

__all__ = ["TTS", "ChunkedStream", "SynthesizeStream"]

# LiveKit retries by status: 4xx other than 408 and 429 is final.
_STATUS = {
    "unauthorized": 401,
    "invalid_request": 400,
    "unknown_voice": 404,
    "slow_consumer": 408,
    "rate_limited": 429,
    "limit_exceeded": 429,
    "draining": 503,
}
_CONNECTION_CODES = ("connection_failed", "connection_lost")


class TTS(tts.TTS):
    """LiveKit TTS over voxflow's native WebSocket protocol (see the module docstring).

    Args:
        url: The server's `/v1/stream` endpoint.
        api_key: The server's API key, if it has keys.
        voice: A voice (or alias) on the server; None for its default.
        style: A style preset name (neutral, happy, sad, serious, calm) or a StyleSpec.
        speed: 0.5-2.0, replacing the style's own speed.
        sample_rate: Of the audio frames; one of voxflow's rates.
        seed: The synthesis noise seed; None for the server's.
    """

    def __init__(
        self,
        *,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        voice: str | None = None,
        style: str | StyleSpec | None = None,
        speed: float | None = None,
        sample_rate: int = 24000,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=True, aligned_transcript=True),
            sample_rate=sample_rate,
            num_channels=1,
        )
        self._options = SpeechOptions(voice=voice, style=style, speed=speed, sample_rate=sample_rate, seed=seed)
        self._client = AsyncVoxflowClient(url, api_key)
        self._streams: weakref.WeakSet[ChunkedStream | SynthesizeStream] = weakref.WeakSet()
        self._prewarm: asyncio.Task[None] | None = None

    @property
    def model(self) -> str:
        return "voxflow"

    @property
    def provider(self) -> str:
        return "voxflow"

    def update_options(
        self,
        *,
        voice: NotGivenOr[str | None] = NOT_GIVEN,
        style: NotGivenOr[str | StyleSpec | None] = NOT_GIVEN,
        speed: NotGivenOr[float | None] = NOT_GIVEN,
    ) -> None:
        """Change the voice or style of the streams opened from now on."""
        given = {name: value for name, value in (("voice", voice), ("style", style), ("speed", speed)) if is_given(value)}
        self._options = replace(self._options, **given)

    def synthesize(self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> ChunkedStream:
        stream = ChunkedStream(tts=self, input_text=text, conn_options=conn_options)
        self._streams.add(stream)
        return stream

    def stream(self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> SynthesizeStream:
        stream = SynthesizeStream(tts=self, conn_options=conn_options)
        self._streams.add(stream)
        return stream

    def prewarm(self) -> None:
        """Connect now, in the background, so the first reply does not wait for the handshake."""
        if self._prewarm is None:
            self._prewarm = asyncio.create_task(self._warm(), name="voxflow-livekit-prewarm")

    async def aclose(self) -> None:
        if self._prewarm is not None:
            await aio.cancel_and_wait(self._prewarm)
            self._prewarm = None
        for stream in list(self._streams):
            await stream.aclose()
        await self._client.aclose()

    async def _warm(self) -> None:
        try:
            await self._client.connect()
        except VoxflowError:
            pass  # the first stream tries again and reports the failure


class ChunkedStream(tts.ChunkedStream):
    """`TTS.synthesize()`: one context for the whole text."""

    def __init__(self, *, tts: TTS, input_text: str, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._tts: TTS = tts
        self._options = tts._options

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        context = self._options.context(self._tts._client, shortuuid())
        output_emitter.initialize(
            request_id=context.id, sample_rate=self._tts.sample_rate, num_channels=1, mime_type="audio/pcm"
        )
        try:
            await _start(context, self._conn_options.timeout)
            context.push(self._input_text)
            context.end()
            await _play(context, output_emitter)
        finally:
            context.detach()


class SynthesizeStream(tts.SynthesizeStream):
    """`TTS.stream()`: one context, one segment; text is spoken as it is pushed."""

    def __init__(self, *, tts: TTS, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, conn_options=conn_options)
        self._tts: TTS = tts
        self._options = tts._options

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        context = self._options.context(self._tts._client, shortuuid())
        output_emitter.initialize(
            request_id=context.id, sample_rate=self._tts.sample_rate, num_channels=1, mime_type="audio/pcm", stream=True
        )
        output_emitter.start_segment(segment_id=context.id)
        try:
            await _start(context, self._conn_options.timeout)
            forward = asyncio.create_task(self._forward(context), name="voxflow-livekit-input")
            try:
                await _play(context, output_emitter)
            finally:
                await aio.cancel_and_wait(forward)
        finally:
            context.detach()
        output_emitter.end_segment()

    async def _forward(self, context: Context) -> None:
        pushed = False
        async for data in self._input_ch:
            if isinstance(data, str):
                context.push(data)
                pushed = True
                self._mark_started()
            elif pushed:
                break  # the segment's end; LiveKit sends one segment per stream
        context.end()


async def _start(context: Context, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            await context.start()
    except TimeoutError as exc:
        raise APITimeoutError(f"voxflow did not answer within {timeout} s") from exc
    except VoxflowError as exc:
        raise _api_error(exc.code, str(exc)) from exc


async def _play(context: Context, output_emitter: tts.AudioEmitter) -> None:
    async for event in context:
        if isinstance(event, Audio):
            output_emitter.push(event.pcm)
        elif isinstance(event, Word):
            # The space joins the words into the transcript LiveKit rebuilds from them.
            output_emitter.push_timed_transcript(TimedString(f"{event.word} ", start_time=event.start, end_time=event.end))
        elif isinstance(event, Error):
            raise _api_error(event.code, event.message)


def _api_error(code: str, message: str) -> APIError:
    if code in _CONNECTION_CODES:
        return APIConnectionError(f"voxflow [{code}]: {message}")
    return APIStatusError(f"voxflow [{code}]: {message}", status_code=_STATUS.get(code, 500), body={"code": code})
