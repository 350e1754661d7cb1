"""The engine: voices, worker threads, streams, and whole-text synthesis.

It knows nothing of transports; they open streams and translate the events.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch

from ..config import EngineConfig
from ..errors import InvalidRequest, LimitExceeded
from ..voices.phonemizer import Phonemes
from ..voices.registry import LoadLimits, VoiceRegistry
from ..voices.styles import Style
from ..voices.vits.noise import Noise
from ..voices.voice import Voice
from .alignment import word_timestamps
from .audio_cache import AudioCache
from .chunker import ChunkerOptions, TextChunker
from .decoder_blocks import BlockDecoder, BlockOptions
from .scheduler import DeadlineExecutor, Widening
from .events import WordTimestamp
from .stream import StreamOptions, SynthesisStream


# Whole-text synthesis cuts only at sentence ends, or at the size cap inside run-on text.
WHOLE_TEXT_SPLIT = ChunkerOptions(first_chunk_words=10**9, later_chunk_words=10**9, clause_cuts=False, max_words=60, max_chars=400)
# Sentences up to ~4 s decode in one piece; longer ones are split (exactly, with context),
# which bounds the decoder's working memory (~450 MB more at 1024 frames, ~50 MB at 256).
WHOLE_TEXT_BLOCKS = BlockOptions(first_block_frames=256, block_frames=(256,))
T = TypeVar("T")


@dataclass(frozen=True)
class Utterance:
    """A whole rendering: float audio in [-1, 1] at the voice's rate and its word timings."""

    audio: np.ndarray
    sample_rate: int
    words: list[WordTimestamp]

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


class Engine:
    """Owns the compute threads. Every torch call, voice loading included, runs on them.

    Keeping torch off every other thread is a speed matter, not only a loop-latency one: each
    Python thread that runs torch ops gets its own OpenMP team, and once there are more team
    threads than cores libgomp throttles its spinning for all of them, which doubled the time
    of every op here. So the layout keeps workers x threads at the core count: one worker
    using every core for a single job, or one single-threaded worker per core when many streams
    run at once (`concurrent`, what a server expects; see EngineConfig.layout). Jobs run
    earliest-deadline-first (scheduler.py).
    """

    def __init__(self, config: EngineConfig = EngineConfig(), cache: AudioCache | None = None, *, concurrent: bool = False) -> None:
        self.config = config
        # Streams opened from then on use it; may be set later (the server attaches its own).
        self.cache = cache
        self.voices = VoiceRegistry(
            config.voice_dirs, config.device, config.half, config.decoder_precision, config.flow_precision,
            default=config.voice, limits=LoadLimits(config.max_loaded_voices, config.max_loaded_voice_mb * 2**20),
        )
        if config.max_batch < 1:
            raise InvalidRequest(f"max_batch must be at least 1, got {config.max_batch}")
        workers, threads = config.layout(concurrent)
        self._live: set[SynthesisStream] = set()  # streams whose task has not ended
        # A lone stream's jobs take every core when the others are idle. With more streams live
        # they stay narrow: jobs come and go, and a wide one held the other workers idle while
        # new jobs waited (the 8-stream soak underran more: docs/BENCHMARKS.md, "Throughput",
        # round 14). A job on every core rounds differently from the same job on one worker's
        # threads, so max_batch 1, which promises the same bytes however busy the machine is,
        # keeps every job narrow.
        widening = (
            Widening(torch.set_num_threads, threads, workers * threads, lambda: len(self._live) <= 1)
            if config.max_batch > 1
            else None
        )
        self._executor = DeadlineExecutor(
            workers,
            thread_name_prefix="voxflow-synth",
            initializer=torch.set_num_threads,
            initargs=(threads,),
            max_batch=config.max_batch,
            widening=widening,
        )
        self._ids = itertools.count()

    def voice(self, name: str | None = None) -> Voice:
        """The named (or default) voice, loaded on a compute thread if it is not (blocking: for
        scripts and tests; a stream loads its voice without blocking the loop)."""
        with self.voices.hold(name, self._executor.submit) as hold:
            return hold.voice.result()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking job (adding or removing a voice: files and a trial load) on a compute
        thread, awaited without blocking the loop."""
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    def open_stream(
        self,
        *,
        voice: str | None = None,
        style: Style = Style(),
        speaker: str | int | None = None,
        seed: int | None = None,
        context_id: str | None = None,
        options: StreamOptions | None = None,
        cached: bool = True,
    ) -> SynthesisStream:
        """Start a synthesis context; must be called with an event loop running. Never blocks:
        a voice that is not loaded yet loads on a compute thread while the stream waits for it.

        cached=False keeps the stream away from the audio cache (it always runs the model).
        """
        options = options or StreamOptions(max_text_chars=self.config.max_text_chars)
        hold = self.voices.hold(voice, self._executor.submit)
        try:
            return SynthesisStream(
                hold,
                context_id=context_id or f"ctx-{next(self._ids)}",
                style=style,
                speaker=speaker,
                seed=self.config.seed if seed is None else seed,
                options=options,
                executor=self._executor,
                cache=self.cache if cached else None,
                live=self._live,
            )
        except BaseException:
            hold.release()
            raise

    async def warm_up(self, voice: str | None = None) -> None:
        """Load a voice and run it once so the first real request pays no first-call costs."""
        stream = self.open_stream(voice=voice, cached=False)
        await stream.push("Warming up the voice.")
        await stream.end()
        async for _ in stream:
            pass

    def synthesize(
        self,
        text: str,
        *,
        voice: str | None = None,
        style: Style = Style(),
        speaker: str | int | None = None,
        seed: int | None = None,
    ) -> Utterance:
        """Whole-text synthesis, one sentence at a time, the way Piper renders it (blocking)."""
        if not isinstance(text, str):
            raise InvalidRequest(f"text must be a string, got {type(text).__name__}")
        if len(text) > self.config.max_text_chars:
            raise LimitExceeded(f"text exceeds {self.config.max_text_chars} characters")
        with self.voices.hold(voice, self._executor.submit) as hold:
            # Waited for here, not on the compute thread: a lone worker cannot wait for its own load.
            v = hold.voice.result()
            return self._executor.submit(self._synthesize, text, v, style, speaker, seed).result()

    @torch.inference_mode()
    def _synthesize(self, text: str, v: Voice, style: Style, speaker: str | int | None, seed: int | None) -> Utterance:
        scales = style.scales(v.info.defaults)
        noise = Noise(self.config.seed if seed is None else seed, v.device, v.dtype)
        sid = v.info.speaker_id(speaker)
        g = v.model.speaker(sid)  # the decoder's conditioning, the same for every block
        seconds_per_frame = v.hop_length / v.sample_rate
        pieces: list[np.ndarray] = []
        words: list[WordTimestamp] = []
        offset = 0.0
        for sentence in self._sentences(v, text):
            ids = torch.as_tensor([sentence.ids], dtype=torch.long, device=v.device)
            z, durations = v.model.infer_latents(ids, scales, sid, noise)
            words += word_timestamps("", sentence.words, durations.tolist(), seconds_per_frame, offset)
            decoder = BlockDecoder(
                lambda latents: v.decoder(latents, g), v.hop_length, v.decoder_receptive_frames, WHOLE_TEXT_BLOCKS, v.effect
            )
            joined = decoder.begin_chunk(z)
            pieces += [decoder.decode_block(joined, start, end) for start, end in decoder.plan(z.shape[2])]
            pieces.append(decoder.release())
            offset += z.shape[2] * seconds_per_frame
        audio = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        return Utterance(np.clip(audio * style.volume, -1.0, 1.0), v.sample_rate, words)

    def _sentences(self, v: Voice, text: str) -> Iterator[Phonemes]:
        """Sentences as Piper would render them, but never longer than the chunker's cap.

        The encoder's attention grows with the square of a sentence's length, so a long text
        without punctuation must not reach the model in one piece.
        """
        chunker = TextChunker(replace(WHOLE_TEXT_SPLIT, max_buffer_chars=max(len(text), 1)))
        for piece in chunker.push(text) + chunker.end():
            if piece.text:
                yield from v.phonemizer.phonemize_sentences(piece.text)

    def remove_voice(self, name: str) -> None:
        """Remove a voice's files (VoiceRegistry.remove) and its audio cache entries (blocking)."""
        self.voices.remove(name)
        if self.cache is not None:
            self.cache.forget_voice(name)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def __aenter__(self) -> "Engine":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)
