"""One synthesis context: text fragments in, audio frames and word timestamps out.

The stream owns one task that drives the chunker and hands each piece of torch work (one
acoustic step, then one decoder block at a time) to the engine's worker threads, so the event
loop only moves text and frames and a cancel takes effect at the next block boundary.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import AsyncIterator, Callable, TypeVar

import torch

from ..errors import InvalidRequest, LimitExceeded, StreamClosed, VoxflowError
from ..voices.phonemizer import WordSpan
from ..voices.styles import Style
from ..voices.voice import Voice
from .acoustic import AcousticOptions, AcousticState
from .alignment import word_timestamps
from .chunker import FLUSH, ChunkerOptions, Flush, TextChunk, chunk_stream
from .decoder_blocks import BlockDecoder, BlockOptions
from .events import AudioFrame, StreamEnd, StreamEvent
from .framing import Framer

_LOGGER = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class StreamOptions:
    sample_rate: int | None = None  # None: the voice's own rate
    frame_ms: int = 20
    max_text_chars: int = 100_000  # all text one context may receive
    input_queue: int = 1024  # fragments waiting for the chunker
    output_queue: int = 256  # events waiting for the consumer (~5 s of 20 ms frames)
    chunker: ChunkerOptions = field(default_factory=ChunkerOptions)
    acoustic: AcousticOptions = field(default_factory=AcousticOptions)
    blocks: BlockOptions = field(default_factory=BlockOptions)


@dataclass
class StreamMetrics:
    """Monotonic timestamps (time.perf_counter) of the first occurrences, for latency figures."""

    first_text: float | None = None
    first_chunk: float | None = None
    first_audio: float | None = None
    audio_seconds: float = 0.0
    compute_seconds: float = 0.0
    chunks: int = 0
    acoustic_seconds: list[float] = field(default_factory=list)  # per chunk: phonemes + acoustic step
    first_block_seconds: float | None = None  # decoding the stream's first block


@dataclass(frozen=True)
class _Prepared:
    words: tuple[WordSpan, ...]
    durations: list[int]  # frames per phoneme id
    joined: torch.Tensor  # decoder input: previous chunk's latent tail + this chunk
    blocks: list[tuple[int, int]]


class _End:
    pass


def _timed(fn: Callable[..., T], *args: object) -> tuple[T, float]:
    # Timed on the compute thread itself, so queueing behind other streams is not counted.
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


_END = _End()


class SynthesisStream:
    def __init__(
        self,
        voice: Voice,
        *,
        context_id: str,
        style: Style,
        speaker: str | int | None,
        seed: int,
        options: StreamOptions,
        executor: Executor,
    ) -> None:
        self.context_id = context_id
        self.voice = voice
        self.options = options
        self.metrics = StreamMetrics()
        self._executor = executor
        self._acoustic = AcousticState(
            voice.model, style.scales(voice.info.defaults), voice.speaker_id(speaker), seed, options.acoustic
        )
        self._decoder = BlockDecoder(voice.model.dec, voice.hop_length, options.blocks)
        self._framer = Framer(context_id, voice.sample_rate, options.sample_rate, options.frame_ms, style.volume)
        self._seconds_per_frame = voice.hop_length / voice.sample_rate
        self._timeline = 0.0  # stream time (s) where the next chunk's audio starts
        self._utterance_start = True
        self._text_chars = 0
        self._closed = False
        self._finished = False
        self._input: asyncio.Queue[str | Flush | _End] = asyncio.Queue(options.input_queue)
        self._output: asyncio.Queue[StreamEvent] = asyncio.Queue(options.output_queue)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"voxflow-stream-{context_id}")

    # -- input side -------------------------------------------------------------------------

    async def push(self, text: str) -> None:
        if not isinstance(text, str):
            raise InvalidRequest(f"text must be a string, got {type(text).__name__}")
        self._check_open()
        if self._text_chars + len(text) > self.options.max_text_chars:
            raise LimitExceeded(f"context {self.context_id} would exceed {self.options.max_text_chars} characters of text")
        self._text_chars += len(text)
        if self.metrics.first_text is None:
            self.metrics.first_text = time.perf_counter()
        await self._input.put(text)

    async def flush(self) -> None:
        self._check_open()
        await self._input.put(FLUSH)

    async def end(self) -> None:
        """No more text: speak what is buffered, then finish with StreamEnd('done')."""
        self._check_open()
        self._closed = True
        await self._input.put(_END)

    def cancel(self) -> None:
        """Stop now: no audio or word event is delivered after this call, only StreamEnd('cancelled')."""
        if self._finished:
            return
        self._closed = True
        self._task.cancel()
        self._finish(StreamEnd(self.context_id, "cancelled"))

    async def aclose(self) -> None:
        self.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def _check_open(self) -> None:
        if self._closed:
            raise StreamClosed(f"context {self.context_id} is closed")

    # -- output side ------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[StreamEvent]:
        while True:
            event = await self._output.get()
            yield event
            if isinstance(event, StreamEnd):
                return

    @property
    def done(self) -> bool:
        return self._finished

    def _finish(self, event: StreamEnd) -> None:
        """End the stream early (cancel, error): drop what the reader has not taken yet."""
        while not self._output.empty():
            self._output.get_nowait()
        self._finished = True
        self._output.put_nowait(event)

    # -- the work ---------------------------------------------------------------------------

    async def _fragments(self) -> AsyncIterator[str | Flush]:
        while not isinstance(item := await self._input.get(), _End):
            yield item

    async def _run(self) -> None:
        try:
            async for chunk in chunk_stream(self._fragments(), self.options.chunker):
                await self._speak(chunk)
            await self._emit_all(self._framer.push(self._decoder.release()))
            await self._emit_all(self._framer.flush())
            # Waits for room like any event: a slow reader must not turn "done" into an error.
            await self._output.put(StreamEnd(self.context_id, "done"))
            self._finished = True
        except asyncio.CancelledError:
            raise
        except VoxflowError as exc:
            self._fail(exc.code, str(exc))
        except Exception as exc:  # the stream must end with an event, whatever broke
            _LOGGER.exception("synthesis failed in context %s", self.context_id)
            self._fail("internal_error", f"synthesis failed: {type(exc).__name__}")

    def _fail(self, code: str, message: str) -> None:
        self._finish(StreamEnd(self.context_id, "error", code, message))

    async def _compute(self, fn: Callable[..., T], *args: object) -> tuple[T, float]:
        """Run fn on the compute thread; returns its result and the seconds it took there."""
        result, seconds = await asyncio.get_running_loop().run_in_executor(self._executor, partial(_timed, fn, *args))
        self.metrics.compute_seconds += seconds
        return result, seconds

    def _prepare(self, text: str, bos: bool, eos: bool) -> _Prepared | None:
        """Phonemes, acoustic step and decoder set-up for one chunk (on the compute thread)."""
        phonemes = self.voice.phonemizer.phonemize(text, bos=bos, eos=eos)
        if not phonemes.ids:
            return None
        latents = self._acoustic.step(phonemes.ids)
        joined = self._decoder.begin_chunk(latents.z)
        return _Prepared(phonemes.words, latents.durations.tolist(), joined, self._decoder.plan(latents.z.shape[2]))

    async def _speak(self, chunk: TextChunk) -> None:
        if self.metrics.first_chunk is None:
            self.metrics.first_chunk = time.perf_counter()
        self.metrics.chunks += 1
        prepared, seconds = await self._compute(self._prepare, chunk.text, self._utterance_start, chunk.final)
        self.metrics.acoustic_seconds.append(seconds)
        self._utterance_start = chunk.final
        if prepared is not None:
            for event in word_timestamps(
                self.context_id, prepared.words, prepared.durations, self._seconds_per_frame, self._timeline
            ):
                await self._output.put(event)
            self._timeline += sum(prepared.durations) * self._seconds_per_frame
            for start, end in prepared.blocks:
                audio, seconds = await self._compute(self._decoder.decode_block, prepared.joined, start, end)
                if self.metrics.first_block_seconds is None:
                    self.metrics.first_block_seconds = seconds
                await self._emit_all(self._framer.push(audio))
        if chunk.final:
            self._acoustic.end_utterance()
            await self._emit_all(self._framer.push(self._decoder.release()))
            await self._emit_all(self._framer.flush())
            self._timeline = self._framer.emitted_seconds

    async def _emit_all(self, frames: list[AudioFrame]) -> None:
        for frame in frames:
            if self.metrics.first_audio is None:
                self.metrics.first_audio = time.perf_counter()
            self.metrics.audio_seconds += frame.duration
            await self._output.put(frame)
