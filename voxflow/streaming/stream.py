"""One synthesis context: text fragments in, audio frames and word timestamps out.

The stream owns one task that drives the chunker and hands each piece of torch work (one
acoustic step, then one decoder block at a time) to the engine's worker threads, so the event
loop only moves text and frames and a cancel takes effect at the next block boundary.

With an audio cache, an utterance whose whole text is already queued when it starts (text
then a flush or the end, the way a transport sends a canned phrase) is cacheable. Its audio is
made to depend on its key alone by speaking it from a fresh context: a new acoustic state
(noise generator re-seeded with the stream's seed; no phoneme, duration-noise or latent
context) and a new decoder (no latent tail, no held audio, the fast first block again). After
it the context is made fresh once more, so what follows sounds the same whether it was
replayed or synthesized. The framer needs no reset: the utterance's end flushed it (nothing
pending, a new resampler), and a replay advances its frame counter, which numbers the
following frames and, as `emitted_seconds`, places the following words on the timeline.
An utterance whose text arrives while it is spoken (LLM tokens) is neither looked up nor
stored: its chunking, and so its audio, depends on when the text came.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any, AsyncIterator, Callable, Sequence, TypeVar

import torch

from ..errors import InvalidRequest, LimitExceeded, StreamClosed, VoxflowError
from ..voices.phonemizer import WORD_SEPARATOR, Phonemes, WordSpan
from ..voices.registry import VoiceHold
from ..voices.styles import Style
from ..voices.voice import Voice
from .acoustic import AcousticOptions, AcousticState, ChunkLatents, StepRequest, step_together
from .alignment import word_timestamps
from .audio_cache import AudioCache, CachedUtterance, CachedWord, CacheKey
from .chunker import FLUSH, ChunkerOptions, Cut, Flush, TextChunk, chunk_stream, discard
from .decoder_blocks import BlockDecoder, BlockOptions, Window
from .lookahead import can_settle, settle_point, unsettled_text, word_cuts
from .events import AudioFrame, StreamEnd, StreamEvent, WordTimestamp
from .framing import Framer
from .scheduler import DeadlineExecutor, Failed

_LOGGER = logging.getLogger(__name__)
# How soon a new stream's first audio is due, in the compute threads' earliest-deadline order:
# long enough that streams already playing keep their next block on time, short enough that a
# new listener hears the first words quickly.
FIRST_AUDIO_BUDGET = 0.2
T = TypeVar("T")


@dataclass(frozen=True)
class StreamOptions:
    sample_rate: int | None = None  # None: the voice's own rate
    frame_ms: int = 20
    max_text_chars: int = 100_000  # all text one context may receive
    input_queue: int = 1024  # fragments waiting for the chunker
    output_queue: int = 256  # events waiting for the consumer (~5 s of 20 ms frames)
    # Text of a sentence that goes on waits for more of it (context) while the listener has
    # audio left to hear, taking playback to start with the first frame. It is said once the
    # audio left drops to the margin: this floor, or twice what the stream's last say took
    # from submit to first frame (queueing behind other streams included), if that is more.
    hold_margin_s: float = 0.1
    max_held_chars: int = 400  # text waiting for its sentence to go on; past it, it is spoken
    # How much audio a say settles while its sentence goes on (the rest waits for context).
    settle_audio_s: float = 0.3
    # An utterance whose text trickles in (more than one piece) and that starts while the
    # compute threads are busy (more jobs waiting or running than there are threads) waits
    # for this many words (or its sentence's end, or a stall in the text) before its first
    # say, settles this much audio in it, and skips the small first block: a one-word first
    # clause ("Sure,") or a short first block would not cover the wait for the next job behind the
    # other streams. A longer text sent in one piece gathers as many words before its first say,
    # busy or not (they are already there).
    busy_start_words: int = 6
    busy_start_settle_s: float = 1.0
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
    # per acoustic step (phonemes + encoder + flow), the most recent ones
    acoustic_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    first_block_seconds: float | None = None  # decoding the stream's first block
    cache_hits: int = 0  # utterances replayed from the audio cache
    cache_misses: int = 0  # cacheable utterances that had to be synthesized


class _Say(enum.Enum):
    """How much of the held text to say now, and what follows it."""

    MORE = "more"  # the sentence goes on: hold back a lookahead
    PAUSE = "pause"  # the text stalled: say everything, keep the sentence's context
    SENTENCE = "sentence"  # the sentence ended: say everything and close it
    FINAL = "final"  # the utterance ended: close the sentence, release all audio


@dataclass(frozen=True)
class _Prepared:
    words: tuple[WordSpan, ...]  # settled words, spans over the settled ids
    durations: list[int]  # frames per settled phoneme id
    joined: torch.Tensor  # decoder input: previous latent tail + settled latents + right context
    blocks: list[tuple[int, int]]


@dataclass(frozen=True)
class _Planned:
    """A say whose acoustic step is ready to run, alone or batched with other streams' steps."""

    stream: SynthesisStream
    text: str
    phonemes: Phonemes
    step: StepRequest
    small_first: bool


class _End:
    pass


# The fewest phoneme ids (two per phoneme, ~0.5 s of speech) an utterance's first say settles
# while its sentence goes on and other streams share the compute threads. Fewer ("Your" of
# "Your order shipped", before the lookahead) left the listener so little audio that the next
# say, queued behind other streams' jobs, came too late: in the soak (benchmarks/soak.py) every
# underrun left fell in the first 0.25 s of a reply. Alone on the threads the next say runs at
# once, so a short first say stays there and keeps first audio early: applied to every first
# say, it took the fidelity benchmark's first audio at 20 tokens/s from p50 193 to 291 ms.
FIRST_SAY_IDS = 16

# Says of several streams queued together take their acoustic step in one batch when their
# encoder inputs (context + new ids, estimated from the text's length) fall under the same
# bound. Batched, eight steps of ~28 ids took 107 ms instead of 195 one after another, of ~94
# ids 262 instead of 368; at ~190 ids batching saved nothing, so longer steps run alone.
IDS_PER_CHAR = 2.3  # phoneme ids (a symbol and a pad each) per character of English text
BATCH_ID_BOUNDS = (48, 96, 144)


@dataclass
class _Recording:
    """A cacheable utterance being synthesized, kept for the cache until it completes."""

    key: CacheKey
    offset: float  # stream time where it starts
    words: list[CachedWord] = field(default_factory=list)
    frames: list[bytes] = field(default_factory=list)

    def add_words(self, words: list[WordTimestamp]) -> None:
        self.words += [CachedWord(w.word, round(w.start - self.offset, 4), round(w.end - self.offset, 4)) for w in words]


def _prepare_together(says: Sequence[tuple[SynthesisStream, str, _Say]]) -> list[Any]:
    """Prepare several streams' says (DeadlineExecutor batch function): each stream's own
    planning, one batched acoustic step for those that need one, each stream's decoder set-up.
    Each result is ((prepared, unsettled text), compute seconds: the batch's share), or Failed
    for a say whose own part failed; a failure in the shared step fails them all."""
    start = time.perf_counter()
    outcomes: list[Any] = []
    for stream, text, how in says:
        try:
            outcomes.append(stream._plan_step(text, how))
        except Exception as exc:
            outcomes.append(Failed(exc))
    planned = [(i, plan) for i, plan in enumerate(outcomes) if isinstance(plan, _Planned)]
    steps = step_together([plan.step for _, plan in planned]) if planned else []
    for (index, plan), latents in zip(planned, steps):
        try:
            outcomes[index] = plan.stream._after_step(plan, latents)
        except Exception as exc:
            outcomes[index] = Failed(exc)
    share = (time.perf_counter() - start) / len(says)
    return [outcome if isinstance(outcome, Failed) else (outcome, share) for outcome in outcomes]


def _timed(fn: Callable[..., T], *args: object) -> tuple[T, float]:
    # Timed on the compute thread itself, so queueing behind other streams is not counted.
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


_END = _End()


class SynthesisStream:
    """`info` is the voice's, known at once; `voice`, the loaded voice, is set by the stream's
    task before its first step (it waits there while the voice loads)."""

    voice: Voice

    def __init__(
        self,
        voice: VoiceHold,
        *,
        context_id: str,
        style: Style,
        speaker: str | int | None,
        seed: int,
        options: StreamOptions,
        executor: DeadlineExecutor,
        cache: AudioCache | None = None,
        live: set[SynthesisStream] | None = None,
    ) -> None:
        self.context_id = context_id
        self.info = voice.info
        self._hold = voice
        self.options = options
        self.metrics = StreamMetrics()
        self._executor = executor
        self._cache = cache
        self._style = style
        self._speaker_id = voice.info.speaker_id(speaker)
        self._seed = seed
        self._pending_key: CacheKey | None = None  # the utterance the chunker gets next is cacheable
        self._recording: _Recording | None = None
        self._framer = Framer(context_id, voice.info.sample_rate, options.sample_rate, options.frame_ms, style.volume)
        self._separator = voice.info.phoneme_id_map[WORD_SEPARATOR][0]
        self._timeline = 0.0  # stream time (s) where the next chunk's audio starts
        self._utterance_start = True
        self._sentence_start = True  # nothing of the sentence is settled: its phonemes open with BOS
        self._held_text: list[str] = []  # the sentence's text not yet settled, in pieces
        self._fresh = False  # text came since the last say
        self._last_cut = Cut.WORD
        self._spoke_in_utterance = False
        self._busy_start = False  # this utterance started with the compute threads busy
        self._trickling = False  # this utterance's text came in more than one piece
        self._utterance_pieces = 0  # text pieces of the current utterance read so far
        self._utterance_words = 0  # and their words
        self._long_whole_text = False  # this utterance is long text sent in one piece (_take)
        self._say_latency = 0.0  # seconds from the last say's start to its first audio
        self._text_chars = 0
        self._closed = False
        self._finished = False
        self._ended_early = False  # cancelled or failed, not done
        self._input: asyncio.Queue[str | Flush | _End] = asyncio.Queue(options.input_queue)
        self._output: asyncio.Queue[StreamEvent] = asyncio.Queue(options.output_queue)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"voxflow-stream-{context_id}")
        # Held until the task is over, however it ends: the registry never unloads a voice under it.
        self._task.add_done_callback(lambda _: voice.release())
        # The engine's streams whose task runs, this one included (see _shared_start).
        self._live = live if live is not None else set()
        self._live.add(self)
        self._task.add_done_callback(lambda _: self._live.discard(self))

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
        await self._put(text)

    async def flush(self) -> None:
        self._check_open()
        await self._put(FLUSH)

    async def end(self) -> None:
        """No more text: speak what is buffered, then finish with StreamEnd('done')."""
        self._check_open()
        self._closed = True
        await self._put(_END)

    async def _put(self, item: str | Flush | _End) -> None:
        """Wait for room in the input queue; a stream ended meanwhile (cancelled, dropped as a
        slow consumer) wakes the wait and refuses the item, so no caller waits on it forever."""
        await self._input.put(item)
        if self._ended_early:
            raise StreamClosed(f"context {self.context_id} was stopped")

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
        """End the stream early (cancel, error): drop what the reader has not taken yet, and
        the text not yet read, which frees whoever waits to push more."""
        while not self._output.empty():
            self._output.get_nowait()
        while not self._input.empty():
            self._input.get_nowait()
        self._finished = self._ended_early = True
        self._output.put_nowait(event)

    # -- the work ---------------------------------------------------------------------------

    async def _fragments(self) -> AsyncIterator[str | Flush]:
        boundary = True  # the chunker holds no text: at the start and right after a flush
        while not isinstance(item := await self._input.get(), _End):
            if not (boundary and self._cache is not None and isinstance(item, str)):
                yield self._counted(item)
                boundary = isinstance(item, Flush)
                continue
            fragments, closing = self._queued_utterance(item)
            key = self._cache_key("".join(fragments)) if closing is not None else None
            if key is not None and await self._replay(key):
                if isinstance(closing, _End):
                    return
                continue
            if key is not None:
                # The normalized text in one piece, so the audio stored under the key is its own.
                fragments, self._pending_key = [key.text], key
            for fragment in fragments:
                yield self._counted(fragment)
            if isinstance(closing, _End):
                return
            if closing is not None:
                yield self._counted(closing)
                self._pending_key = None  # taken by the utterance just spoken, unless it had nothing to say
            boundary = closing is not None

    def _counted(self, item: str | Flush) -> str | Flush:
        """Count the utterance's text pieces as the chunker reads them (a flush starts over)."""
        self._utterance_pieces = self._utterance_pieces + 1 if isinstance(item, str) else 0
        self._utterance_words = self._utterance_words + len(item.split()) if isinstance(item, str) else 0
        return item

    def _queued_utterance(self, first: str) -> tuple[list[str], Flush | _End | None]:
        """`first` and the text queued behind it, up to a flush or the end (None: not queued yet)."""
        fragments = [first]
        while True:
            try:
                item = self._input.get_nowait()
            except asyncio.QueueEmpty:
                return fragments, None
            if not isinstance(item, str):
                return fragments, item
            fragments.append(item)

    def _cache_key(self, text: str) -> CacheKey | None:
        """The key of `text` spoken from a fresh context, or None when it is not to be cached."""
        assert self._cache is not None
        try:
            version = self.info.version()
        except OSError:
            return None
        key = CacheKey(
            self.info.name, version, self._style, self._speaker_id, self._seed,
            text, self._framer.rate, self.options.frame_ms,
        )
        return key if 0 < len(key.text) <= self._cache.max_text_chars else None

    async def _replay(self, key: CacheKey) -> bool:
        """Speak the cached audio of `key`, if any, without the model; counts the hit or miss."""
        assert self._cache is not None
        cached = await self._cache.lookup(key)
        if cached is None:
            self.metrics.cache_misses += 1
            return False
        self.metrics.cache_hits += 1
        if self.metrics.first_chunk is None:
            self.metrics.first_chunk = time.perf_counter()
        offset, framer = self._timeline, self._framer
        for w in cached.words:
            await self._output.put(WordTimestamp(self.context_id, w.word, round(offset + w.start, 4), round(offset + w.end, 4)))
        for pcm in cached.frames():
            frame = AudioFrame(self.context_id, framer.seq, framer.emitted_seconds, framer.rate, pcm)
            framer.seq += 1
            await self._emit_all([frame])
        self._timeline = framer.emitted_seconds
        self._reset_context()
        return True

    def _store(self, recording: _Recording) -> None:
        """Hand a completed cacheable utterance to the cache; the context starts afresh, as after a replay."""
        self._recording = None
        if self._cache is not None and recording.frames:
            framer = self._framer
            utterance = CachedUtterance(framer.rate, framer.frame_samples, b"".join(recording.frames), tuple(recording.words))
            self._cache.put_later(recording.key, utterance)
        self._reset_context()

    def _reset_context(self) -> None:
        """A fresh acoustic state and decoder: where a cacheable utterance starts, and what it leaves."""
        voice = self.voice
        scales = self._style.scales(voice.info.defaults)
        self._acoustic = AcousticState(voice.model, scales, self._speaker_id, self._seed, self.options.acoustic)
        self._decoder = BlockDecoder(self._decode, voice.hop_length, voice.decoder_receptive_frames, self.options.blocks, voice.effect)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        # Speaker conditioning lives in the acoustic state, which computes it at its first step.
        return self.voice.decoder(latents, self._acoustic.g)

    async def voice_loaded(self) -> Voice:
        """The voice once it is loaded (at once when it was); raises what kept it from loading
        (AtCapacity, VoiceFileError), for a caller that must answer before any audio."""
        # Shielded: the load is shared with every stream that waits for this voice, and one
        # waiter's cancel must not cancel it for the others.
        return await asyncio.shield(asyncio.wrap_future(self._hold.voice))

    async def _load_voice(self) -> None:
        self.voice = voice = await self.voice_loaded()
        self._seconds_per_frame = voice.hop_length / voice.sample_rate
        self._reset_context()

    async def _run(self) -> None:
        try:
            await self._load_voice()
            await self._speak_chunks()
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

    async def _speak_chunks(self) -> None:
        """Take chunks as the chunker cuts them; say held text when the listener needs it.

        One `__anext__` of the chunk source stays outstanding while held text waits for its
        deadline (cancelling it would finish the generator), so it is cancelled, and the
        generator closed, on the way out.
        """
        chunks = chunk_stream(self._fragments(), self.options.chunker)
        next_chunk: asyncio.Future[TextChunk] | None = None
        try:
            while True:
                if next_chunk is None:
                    next_chunk = asyncio.ensure_future(anext(chunks))
                done, _ = await asyncio.wait((next_chunk,), timeout=self._hold_seconds())
                if not done:
                    # Chunks the chunker already cut from text it has come out in one step of
                    # the loop: let them decide first.
                    await asyncio.sleep(0)
                    if not next_chunk.done():
                        await self._say(_Say.PAUSE if self._last_cut == Cut.PAUSE else _Say.MORE)
                    continue
                finished, next_chunk = next_chunk, None
                try:
                    chunk = finished.result()
                except StopAsyncIteration:
                    return
                await self._take(chunk)
        finally:
            if next_chunk is not None:
                await discard(next_chunk)
            await chunks.aclose()

    def _hold_seconds(self) -> float | None:
        """How long held text may still wait for more (None: until the next chunk).

        Before the utterance's first audio the next chunk decides: it brings the words the
        held ones wait for, or the chunker's pause when the text stalls.
        """
        if not self._spoke_in_utterance or self._text_decides():
            return None
        # Words held for lookahead wait for the next words, not for the clock, unless the text
        # stalled: then all that is held is said when the listener needs it.
        paused = self._last_cut == Cut.PAUSE and (self._held_text or len(self._decoder.held))
        if not ((self._fresh and self._held_text) or paused):
            return None
        return max(0.0, self._playback_end() - self._hold_margin() - time.perf_counter())

    def _playback_end(self) -> float:
        """When a real-time listener will have heard every frame emitted so far."""
        m = self.metrics
        return 0.0 if m.first_audio is None else m.first_audio + m.audio_seconds

    async def _take(self, chunk: TextChunk) -> None:
        if self._utterance_start and self._pending_key is not None:
            self._reset_context()
            self._recording = _Recording(self._pending_key, self._timeline)
            self._pending_key = None
        self._utterance_start = False
        if self.metrics.first_chunk is None:
            self.metrics.first_chunk = time.perf_counter()
        self.metrics.chunks += 1
        if not self._spoke_in_utterance and not self._held_text:
            # Only for text that trickles in: text sent in one piece is said the same way
            # however busy the machine is (the audio cache and seeded replays rely on it).
            self._trickling = trickling = self._utterance_pieces > 1
            self._busy_start = trickling and self._executor.backlog() > self._executor.workers
            # Text sent in one piece (its end or flush queued behind it: all of it is known) of
            # more than busy_start_words words gathers them before its first say and settles
            # FIRST_SAY_IDS (~0.5 s of speech) in it, alone or not: beside other streams a
            # shorter first say ("I" of "I checked your calendar", 0.12 s) does not cover the
            # wait for the next, and deciding by the text alone keeps it cut the same however
            # busy the machine is. Its words are already there, so alone it costs a few ms of
            # first audio, and a short text (a flushed clause) keeps its small, fast first say.
            self._long_whole_text = (
                not trickling and self._text_decides() and self._utterance_words > self.options.busy_start_words
            )
        if chunk.text:
            self._held_text.append(chunk.text)
            self._fresh = True
        self._last_cut = chunk.cut
        if chunk.final:
            await self._say(_Say.FINAL)
        elif chunk.cut == Cut.SENTENCE:
            await self._say(_Say.SENTENCE)
        elif self._must_say_now():
            await self._say(_Say.PAUSE if chunk.cut == Cut.PAUSE else _Say.MORE)

    def _must_say_now(self) -> bool:
        if sum(map(len, self._held_text)) > self.options.max_held_chars:
            return True
        if not self._spoke_in_utterance:
            gather = self._busy_start or self._long_whole_text
            held_words = sum(len(piece.split()) for piece in self._held_text)
            return not gather or self._last_cut == Cut.PAUSE or held_words >= self.options.busy_start_words
        if self._text_decides():
            return False
        return self._playback_end() - self._hold_margin() <= time.perf_counter()

    def _text_decides(self) -> bool:
        """Text already queued, or a cacheable utterance (all of its text is known), comes next
        at once: it decides, not the clock, so text sent in one piece is said the same way
        however busy the machine is."""
        return bool(self._input.qsize()) or self._recording is not None

    def _hold_margin(self) -> float:
        return max(self.options.hold_margin_s, 2 * self._say_latency)

    async def _say(self, how: _Say) -> None:
        text = " ".join(self._held_text)
        self._held_text.clear()
        self._fresh = False
        if text:
            started = time.perf_counter()
            job = self._executor.submit_batch_by(self._deadline(), self._batch_key(text), _prepare_together, (self, text, how), widens=True)
            (prepared, unsettled), seconds = await self._result(job)
            self.metrics.acoustic_seconds.append(seconds)
            if unsettled:
                self._held_text.insert(0, unsettled)
            if prepared is not None:
                self._sentence_start = False
                await self._decode_prepared(prepared, started)
        if how in (_Say.SENTENCE, _Say.FINAL):
            self._acoustic.end_sentence()
            self._sentence_start = True
        if how in (_Say.PAUSE, _Say.FINAL):
            await self._emit_all(self._framer.push(self._decoder.release(pause=how == _Say.PAUSE)))
            await self._emit_all(self._framer.flush())
            self._timeline = self._framer.emitted_seconds
        if how == _Say.FINAL:
            self._utterance_start = True
            self._spoke_in_utterance = False
            if self._recording is not None:
                self._store(self._recording)

    def _plan_step(self, text: str, how: _Say) -> _Planned | tuple[None, str]:
        """Phonemes and settling rule of what is said now (on the compute thread), or, when
        there is nothing to step, the result at once.

        While the sentence goes on, the words in the lookahead are not settled: their text is
        returned, to be phonemized again with what follows it.
        """
        shared = self._shared_start()
        # Beside other streams an utterance's first say must leave the listener enough audio to
        # cover the wait for the next job behind their work. Its first block is the larger one
        # whatever the text: block sizes change the audio only by rounding (each block is decoded
        # with its full context). Text that trickles in also settles at least FIRST_SAY_IDS
        # first, and a long text sent in one piece always does (_take).
        first_say = not self._spoke_in_utterance
        settle_more = first_say and (shared if self._trickling else self._long_whole_text)
        closes = how in (_Say.SENTENCE, _Say.FINAL)
        phonemes = self.voice.phonemizer.phonemize(text, bos=self._sentence_start, eos=closes)
        if not phonemes.ids:
            return None, ""
        settle = None
        if how == _Say.MORE:
            acoustic = self.options.acoustic
            cuts = word_cuts(phonemes.ids, phonemes.words, self._separator)
            least = FIRST_SAY_IDS if settle_more else 0
            if not can_settle(cuts, len(phonemes.ids), lookahead_ids=2 * acoustic.lookahead_phonemes, least_ids=least):
                return None, text  # wait for more words
            settle = partial(
                settle_point,
                cuts,
                lookahead_ids=2 * acoustic.lookahead_phonemes,
                enough_frames=self._settle_seconds() / self._seconds_per_frame,
                most_held_ids=2 * max(acoustic.context_phonemes, acoustic.lookahead_phonemes),
                least_ids=least,
            )
        step = StepRequest(self._acoustic, phonemes.ids, settle)
        # Not to the bit on every CPU: on an AMD EPYC (AVX512-BF16, no AMX) the larger first
        # window moved up to 19 of 32,768 steps in a few hundred samples, where an Intel Xeon
        # with AMX gave the same bytes. Rendering the small first block and the next in one job
        # keeps the bytes but cost ~100 ms of p95 first audio with 16 streams starting at once,
        # so only max_batch = 1, which promises the same bytes however busy the machine is,
        # keeps the blocks to what the text decides.
        blocks_follow_load = shared and self._executor.max_batch > 1
        return _Planned(self, text, phonemes, step, small_first=not (self._busy_start or blocks_follow_load))

    def _after_step(self, planned: _Planned, latents: ChunkLatents) -> tuple[_Prepared | None, str]:
        """Decoder set-up for the settled part of a step; the unsettled text is returned."""
        text, phonemes = planned.text, planned.phonemes
        n = len(latents.ids)
        unsettled = unsettled_text(text, phonemes.words, n) if n < len(phonemes.ids) else ""
        if not n:
            return None, unsettled
        joined = self._decoder.begin_chunk(latents.z, latents.right)
        settled = tuple(w for w in phonemes.words if w.end <= n)
        blocks = self._decoder.plan(latents.z.shape[2], small_first=planned.small_first)
        return _Prepared(settled, latents.durations.tolist(), joined, blocks), unsettled

    def _batch_key(self, text: str) -> tuple[object, int] | None:
        """Which says may take their acoustic step in one batch: of the same model, and of
        similar, short length (padding a short step to a long one costs more than batching
        saves: docs/ARCHITECTURE.md). None: this one steps alone."""
        ids = len(self._acoustic.context) + IDS_PER_CHAR * len(text)
        size = next((bound for bound in BATCH_ID_BOUNDS if ids <= bound), None)
        return None if size is None else (self.voice.model, size)

    def _shared_start(self) -> bool:
        """Whether this say is the first of an utterance while other streams are live or their
        jobs are queued (this job counts itself).

        Any other stream counts, even with a thread free for each: counting only streams beyond
        the thread count cut two token streams' p95 first audio from ~400 to ~250 ms, but in
        the 8-stream soak, where a reply often starts beside one or two live streams and more
        start a moment later, it left 8 and 32 underruns against 2 and 5 (docs/BENCHMARKS.md,
        "Throughput", round 12)."""
        if self._spoke_in_utterance:
            return False
        return len(self._live) > 1 or self._executor.backlog() > 1

    def _settle_seconds(self) -> float:
        busy_first_say = self._busy_start and not self._spoke_in_utterance
        return self.options.busy_start_settle_s if busy_first_say else self.options.settle_audio_s

    async def _decode_prepared(self, prepared: _Prepared, started: float) -> None:
        self._spoke_in_utterance = True
        words = word_timestamps(self.context_id, prepared.words, prepared.durations, self._seconds_per_frame, self._timeline)
        if self._recording is not None:
            self._recording.add_words(words)
        for event in words:
            await self._output.put(event)
        self._timeline += sum(prepared.durations) * self._seconds_per_frame
        windows = [self._decoder.window(prepared.joined, start, end) for start, end in prepared.blocks]
        jobs: list[Future] = []
        try:
            for index, window in enumerate(windows):
                if index == len(jobs):
                    # Before the stream's first audio, when it will play is not known: the
                    # first block goes alone, and the rest once it is out.
                    jobs += self._queue_renders(windows[index:] if self.metrics.first_audio else windows[index : index + 1])
                audio, seconds = await self._result(jobs[index])
                if self.metrics.first_block_seconds is None:
                    self.metrics.first_block_seconds = seconds
                if index == 0:
                    self._say_latency = time.perf_counter() - started
                await self._emit_all(self._framer.push(self._decoder.stitch(window, audio)))
        finally:
            for job in jobs:
                job.cancel()

    def _queue_renders(self, windows: list[Window]) -> list[Future]:
        """Queue blocks at once, each due when its audio will play: on idle compute threads they
        render side by side (a lone stream uses every thread); under load their deadlines place
        them among the other streams' jobs."""
        due, jobs = self._deadline(), []
        for window in windows:
            jobs.append(self._executor.submit_by(due, _timed, self._decoder.render, window, widens=True))
            due += window.frames * self._seconds_per_frame
        return jobs

    def _fail(self, code: str, message: str) -> None:
        self._finish(StreamEnd(self.context_id, "error", code, message))

    def _deadline(self) -> float:
        """When a real-time listener needs the audio the next job will produce.

        Before the first audio: FIRST_AUDIO_BUDGET after the text arrived. After it: the
        play-out time of the next frame, taking playback to have started with the first frame.
        """
        m = self.metrics
        if m.first_audio is None:
            return (m.first_chunk or time.perf_counter()) + FIRST_AUDIO_BUDGET
        return self._playback_end()

    async def _result(self, job: Future) -> tuple[Any, float]:
        result, seconds = await asyncio.wrap_future(job)
        self.metrics.compute_seconds += seconds
        return result, seconds

    async def _emit_all(self, frames: list[AudioFrame]) -> None:
        for frame in frames:
            if self.metrics.first_audio is None:
                self.metrics.first_audio = time.perf_counter()
            self.metrics.audio_seconds += frame.duration
            if self._recording is not None:
                self._recording.frames.append(frame.pcm)
            await self._output.put(frame)
