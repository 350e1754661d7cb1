"""A Pipecat TTS service that speaks voxflow's own protocol, word timestamps included.

    from voxflow.integrations.pipecat import VoxflowTTSService

    tts = VoxflowTTSService(
        url="ws://127.0.0.1:8765/v1/stream",
        settings=VoxflowTTSService.Settings(voice="en_US-joe-medium", style="calm", speed=1.1),
    )
    pipeline = Pipeline([transport.input(), stt, user_aggregator, llm, tts, transport.output(), ...])

The service keeps one WebSocket (voxflow.client.AsyncVoxflowClient) and opens one voxflow
context per Pipecat turn context: an LLM reply or a TTSSpeakFrame is one utterance, its tokens
pushed as they come and its context ended when the turn completes, so several utterances (a
reply still speaking, the next one already synthesizing) share the socket. Audio arrives at
the pipeline's output rate, which must be one of voxflow's (8000, 16000, 22050, 24000, 32000,
44100, 48000). The server's word events become TTSTextFrames timed against the audio, so the
context aggregator keeps only what was heard. An interruption cancels every interruptible
context at once; the server stops at its next decoder block. Uninterruptible speech
(`TTSSpeakFrame(interruptible=False)`) carries on.

Tokens are streamed (TextAggregationMode.TOKEN) by default: voxflow chunks text itself and
holds back the end of a clause until the next words settle its prosody, so sentence
aggregation would only add latency. With TextAggregationMode.SENTENCE each sentence is
flushed as it is sent.

Settings (`VoxflowTTSService.Settings`, updatable with TTSUpdateSettingsFrame): `voice`,
`style` (a preset name or a voxflow.client.StyleSpec) and `speed`. A context keeps the
settings it was opened with; a change applies from the next utterance.

A dropped connection ends the contexts in flight with an error (their audio so far has
played) and the client reconnects in the background; the rest of the turn opens a new
context. The WebSocket's own pings keep an idle connection open.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from ..client import DEFAULT_URL, AsyncVoxflowClient, Audio, Context, Error, StyleSpec, Word
from ..errors import VoxflowError
from . import SpeechOptions, missing_extra

try:
    from pipecat.frames.frames import (
        CancelFrame,
        EndFrame,
        Frame,
        InterruptionFrame,
        StartFrame,
        TTSAudioRawFrame,
        TTSStoppedFrame,
    )
    from pipecat.processors.frame_processor import FrameDirection
    from pipecat.services.settings import TTSSettings
    from pipecat.services.tts_service import TextAggregationMode, TTSService
    from pipecat.utils.errors import ErrorCategory
    from pipecat.utils.types import NOT_GIVEN, NotGiven
except ImportError as exc:
    raise missing_extra("pipecat", exc) from exc

__all__ = ["VoxflowTTSService", "VoxflowTTSSettings"]

# Pipecat decides from the category whether an error leaves the service unusable: a wrong key
# or voice will not fix itself, a lost connection or a busy server may.
_CATEGORIES = {
    "unauthorized": ErrorCategory.AUTHENTICATION,
    "invalid_request": ErrorCategory.INVALID_REQUEST,
    "unknown_voice": ErrorCategory.INVALID_REQUEST,
    "connection_failed": ErrorCategory.CONNECTIVITY,
    "connection_lost": ErrorCategory.CONNECTIVITY,
    "rate_limited": ErrorCategory.RATE_LIMIT,
    "internal_error": ErrorCategory.SERVER,
}


@dataclass
class VoxflowTTSSettings(TTSSettings):
    """VoxflowTTSService's runtime-updatable settings.

    Parameters:
        style: A style preset name (neutral, happy, sad, serious, calm) or a StyleSpec.
        speed: 0.5-2.0, replacing the style's own speed.
    """

    style: str | StyleSpec | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    speed: float | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)


@dataclass
class _Utterance:
    """A voxflow context and the task that feeds its events into Pipecat's audio context."""

    context: Context
    player: asyncio.Task[None]


class VoxflowTTSService(TTSService):
    """Pipecat TTS over voxflow's native WebSocket protocol (see the module docstring).

    Args:
        url: The server's `/v1/stream` endpoint.
        api_key: The server's API key, if it has keys.
        seed: The synthesis noise seed; None for the server's.
        settings: Voice, style and speed (`VoxflowTTSService.Settings`).
        text_aggregation_mode: TOKEN (default) streams LLM tokens as they come.
        **kwargs: Passed on to Pipecat's TTSService.
    """

    Settings = VoxflowTTSSettings
    _settings: VoxflowTTSSettings

    def __init__(
        self,
        *,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        seed: int | None = None,
        settings: VoxflowTTSSettings | None = None,
        text_aggregation_mode: TextAggregationMode = TextAggregationMode.TOKEN,
        **kwargs: Any,
    ) -> None:
        current = self.Settings(model=None, voice=None, language=None, style=None, speed=None)
        if settings is not None:
            current.apply_update(settings)
        # The sentences of a reply share one context: without a space between them, the last
        # word of one would run into the first of the next ("you.The").
        kwargs.setdefault("append_trailing_space", True)
        # Pipecat ends an audio context that has had no audio for this long, for providers that
        # never say they are done. voxflow always does (done, cancelled, or an error, a lost
        # connection included), and at Pipecat's 3 s a server slowed down by load would have the
        # rest of an utterance dropped.
        kwargs.setdefault("stop_frame_timeout_s", 30.0)
        super().__init__(
            text_aggregation_mode=text_aggregation_mode,
            # Words come timed from the server, so the base builds TTSTextFrames from them.
            push_text_frames=False,
            push_start_frame=True,
            settings=current,
            **kwargs,
        )
        self._seed = seed
        self._client = AsyncVoxflowClient(url, api_key)
        self._utterances: dict[str, _Utterance] = {}
        # Contexts that could not open (no connection, say): the rest of their turn is dropped
        # rather than have every token wait out the client's connection retries again.
        self._unopened: set[str] = set()
        self._connecting: asyncio.Task[None] | None = None

    def can_generate_metrics(self) -> bool:
        return True

    @property
    def supports_processing_metrics(self) -> bool:
        # run_tts only queues text; the audio comes later, from the context's task.
        return False

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        try:
            self._options()
        except VoxflowError as exc:
            await self._report(exc.code, str(exc), exc)
            return
        # In the background: a server slow to answer must not hold up the pipeline's start,
        # and the first utterance waits for this connection rather than opening another.
        self._connecting = self.create_task(self._connect(), name="voxflow-connect")

    async def stop(self, frame: EndFrame) -> None:
        await super().stop(frame)
        await self._close()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._close()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._close()

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        if context_id not in self._unopened:
            try:
                utterance = self._utterances.get(context_id) or await self._open(context_id)
                utterance.context.push(text)
                if not self._is_streaming_tokens:
                    utterance.context.flush()
                await self.start_tts_usage_metrics(text)
            except VoxflowError as exc:
                self._unopened.add(context_id)
                await self._report(exc.code, str(exc), exc)
        yield None

    async def on_turn_context_completed(self) -> None:
        context_id = self._turn_context_id
        await super().on_turn_context_completed()
        if context_id is None:
            return
        self._unopened.discard(context_id)
        if (utterance := self._utterances.get(context_id)) is not None:
            # Ended here rather than in flush_audio, which the base skips for a turn whose audio
            # context timed out: the voxflow context would wait for more text forever.
            utterance.context.end()
        else:
            # Nothing was synthesized (no connection, or the service is unusable): the audio
            # context the base opened for the turn would wait out stop_frame_timeout_s.
            await self._finish_audio(context_id)

    async def _handle_interruption(self, frame: InterruptionFrame, direction: FrameDirection) -> None:
        # Cancelled before the base drops the audio contexts: audio a context's task delivered
        # in between would make the base open the turn's audio context again.
        kept = {context_id for context_id, context in self._tts_contexts.items() if not context.interruptible}
        for context_id in self._utterances.keys() - kept:
            await self._cancel(context_id)
        self._unopened &= kept
        await super()._handle_interruption(frame, direction)

    def _options(self) -> SpeechOptions:
        return SpeechOptions(
            voice=self._settings.voice,
            style=self._settings.style,
            speed=self._settings.speed,
            sample_rate=self.sample_rate,
            seed=self._seed,
        )

    async def _open(self, context_id: str) -> _Utterance:
        context = await self._options().context(self._client, context_id).start()
        utterance = _Utterance(context, self.create_task(self._play(context), name=f"voxflow-{context_id}"))
        self._utterances[context_id] = utterance
        return utterance

    async def _play(self, context: Context) -> None:
        async for event in context:
            if isinstance(event, Audio):
                frame = TTSAudioRawFrame(event.pcm, event.sample_rate, 1, context_id=context.id)
                await self.append_to_audio_context(context.id, frame)
            elif isinstance(event, Word):
                await self.add_word_timestamps([(event.word, event.start)], context.id)
            elif isinstance(event, Error):
                await self._report(event.code, event.message)
                if context.id == self._turn_context_id:
                    # The server has forgotten this context: the rest of the turn opens a new one,
                    # with a new id, so its audio cannot land in an audio context still playing.
                    self._turn_context_id = None
                    self._turn_context_id = self.create_context_id()
        self._utterances.pop(context.id, None)
        await self._finish_audio(context.id)

    async def _finish_audio(self, context_id: str) -> None:
        if self.audio_context_available(context_id):
            await self.append_to_audio_context(context_id, TTSStoppedFrame(context_id=context_id))
            await self.remove_audio_context(context_id)

    async def _cancel(self, context_id: str) -> None:
        utterance = self._utterances.pop(context_id, None)
        if utterance is not None:
            utterance.context.detach()
            await self.cancel_task(utterance.player)

    async def _connect(self) -> None:
        try:
            await self._client.connect()
        except VoxflowError as exc:
            await self._report(exc.code, str(exc), exc)

    async def _close(self) -> None:
        if self._connecting is not None:
            await self.cancel_task(self._connecting)
            self._connecting = None
        for context_id in list(self._utterances):
            await self._cancel(context_id)
        await self._client.aclose()

    async def _report(self, code: str, message: str, exception: Exception | None = None) -> None:
        await self.push_error(f"voxflow [{code}]: {message}", exception=exception, category=_CATEGORIES.get(code))
