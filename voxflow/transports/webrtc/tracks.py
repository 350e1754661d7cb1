"""A WebRTC session's audio: the paced outbound track and the microphone reader.

Outbound, every context of the session feeds one FIFO of 20 ms frames at 48 kHz, played in
the order the frames arrive (two contexts speaking at once interleave frame by frame; a client
that wants them one after another starts the second once the first is `done`). The track
sends silence whenever the FIFO is empty, so the RTP stream never stops.

Inbound, the browser's microphone is resampled to 16 kHz mono and kept in a bounded buffer
that drops its oldest frames when no one reads it.
"""

from __future__ import annotations

import asyncio
import collections
import fractions
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import av
import numpy as np
import soxr
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

SAMPLE_RATE = 48_000
FRAME_MS = 20
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000
FRAME_SECONDS = FRAME_MS / 1000
_SILENCE = bytes(2 * FRAME_SAMPLES)
_TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
MAX_LAG_FRAMES = 3  # a late consumer gets at most this many frames back to back

MICROPHONE_RATE = 16_000


class PlayoutQueue:
    """The session's outbound FIFO: (context, 20 ms PCM) pairs, at most max_frames of them.

    Producers wait for room (which is what holds a context's synthesis back to real time);
    the track takes one frame per 20 ms.
    """

    def __init__(self, max_frames: int) -> None:
        self.max_frames = max_frames
        self._frames: collections.deque[tuple[str, bytes]] = collections.deque()
        self._room = asyncio.Event()

    def __len__(self) -> int:
        return len(self._frames)

    async def wait_for_room(self) -> None:
        while len(self._frames) >= self.max_frames:
            self._room.clear()
            await self._room.wait()

    def append(self, context: str, pcm: bytes) -> None:
        """One frame; the caller has waited for room (no await between that and this)."""
        self._frames.append((context, pcm))

    def pop(self) -> bytes | None:
        if not self._frames:
            return None
        _, pcm = self._frames.popleft()
        self._room.set()
        return pcm

    def discard(self, context: str) -> int:
        """Drop every queued frame of `context`; returns how many there were."""
        kept = collections.deque(item for item in self._frames if item[0] != context)
        dropped = len(self._frames) - len(kept)
        self._frames = kept
        if dropped:
            self._room.set()
        return dropped


@dataclass
class Pacer:
    """Real-time schedule of frame n at start + n * period; the clock is the caller's."""

    period: float
    max_lag_frames: int
    start: float | None = None
    index: int = 0

    def next(self, now: float) -> tuple[int, float]:
        """(index of the next frame, seconds to wait until it is due). A consumer that fell
        more than max_lag_frames behind skips ahead instead of getting a burst; the skipped
        indices leave a gap in the timestamps, as real time passed."""
        if self.start is None:
            self.start = now
        behind = int((now - self.start) / self.period) - self.index
        if behind > self.max_lag_frames:
            self.index += behind - self.max_lag_frames
        index = self.index
        self.index += 1
        return index, max(0.0, self.start + index * self.period - now)


class PlayoutTrack(MediaStreamTrack):
    """The session's one outbound audio track: 20 ms, 48 kHz mono s16 frames in real time."""

    kind = "audio"

    def __init__(self, queue: PlayoutQueue) -> None:
        super().__init__()
        self.queue = queue
        self._pacer = Pacer(FRAME_SECONDS, MAX_LAG_FRAMES)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        index, wait = self._pacer.next(loop.time())
        if wait:
            await asyncio.sleep(wait)
        # Taken when due, not before the sleep, so a cancel during the wait still applies.
        pcm = self.queue.pop() or _SILENCE
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(pcm)
        frame.sample_rate = SAMPLE_RATE
        frame.pts = index * FRAME_SAMPLES
        frame.time_base = _TIME_BASE
        return frame


@dataclass(frozen=True)
class MicrophoneFrame:
    """Microphone audio: 16 kHz mono PCM16 little-endian; pts in seconds of audio received."""

    pcm: bytes
    sample_rate: int
    pts: float


class Downsampler:
    """Any PyAV audio frame (packed or planar, int16 or float, any rate and channels) -> 16 kHz
    mono PCM16, through a streaming resampler so block edges leave no clicks."""

    def __init__(self, out_rate: int = MICROPHONE_RATE) -> None:
        self.out_rate = out_rate
        self._rate: int | None = None
        self._stream: soxr.ResampleStream | None = None

    def process(self, frame: av.AudioFrame) -> bytes:
        data = frame.to_ndarray()
        channels = len(frame.layout.channels)
        samples = data.reshape(channels, -1) if frame.format.is_planar else data.reshape(-1, channels).T
        mono = samples.astype(np.float32).mean(axis=0)
        if np.issubdtype(data.dtype, np.integer):
            mono /= 32768.0
        if frame.sample_rate != self._rate:  # a new rate starts a new stream
            self._rate = frame.sample_rate
            self._stream = soxr.ResampleStream(frame.sample_rate, self.out_rate, 1, dtype="float32")
        out = self._stream.resample_chunk(mono)
        return (np.clip(out, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class Microphone:
    """The latest microphone audio, for one reader at a time; when nobody reads, the oldest
    frames are dropped past max_frames (a listener wants what is said now, not a backlog)."""

    def __init__(self, max_frames: int) -> None:
        self._frames: collections.deque[MicrophoneFrame] = collections.deque(maxlen=max_frames)
        self._arrived = asyncio.Event()
        self._samples = 0
        self._closed = False

    def put(self, pcm: bytes) -> None:
        if not pcm:  # the resampler's start-up delay
            return
        self._frames.append(MicrophoneFrame(pcm, MICROPHONE_RATE, self._samples / MICROPHONE_RATE))
        self._samples += len(pcm) // 2
        self._arrived.set()

    def clear(self) -> None:
        """Forget the audio nobody has read yet (a new reader starts from now)."""
        self._frames.clear()

    def close(self) -> None:
        self._closed = True
        self._arrived.set()

    async def frames(self) -> AsyncIterator[MicrophoneFrame]:
        """Frames as they arrive; ends when the session closes."""
        while True:
            while self._frames:
                yield self._frames.popleft()
            if self._closed:
                return
            self._arrived.clear()
            await self._arrived.wait()


async def read_track(track: MediaStreamTrack, microphone: Microphone | None, on_frame: Callable[[], None]) -> None:
    """Reads a remote track until it ends, feeding `microphone` when given.

    Every remote track is read, used or not: aiortc queues received frames without bound.
    """
    downsampler = Downsampler() if microphone is not None else None
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        on_frame()
        if downsampler is not None and isinstance(frame, av.AudioFrame):
            microphone.put(downsampler.process(frame))
