"""Float audio at the voice's rate -> fixed-size PCM16 frames at the output rate."""

from __future__ import annotations

import numpy as np
import soxr

from ..errors import InvalidRequest
from .events import AudioFrame

OUTPUT_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
FRAME_MS_CHOICES = (10, 20, 40, 60, 100)


class Framer:
    """Resamples with soxr's streaming resampler (state kept across pushes) and cuts frames.

    A partial frame waits for more audio; `flush` drains the resampler and pads the last frame
    with silence so that everything pushed so far goes out.
    """

    def __init__(self, context_id: str, source_rate: int, output_rate: int | None = None, frame_ms: int = 20, volume: float = 1.0) -> None:
        output_rate = output_rate or source_rate
        if output_rate not in OUTPUT_RATES and output_rate != source_rate:
            raise InvalidRequest(f"sample rate must be one of {OUTPUT_RATES}, got {output_rate}")
        if frame_ms not in FRAME_MS_CHOICES:
            raise InvalidRequest(f"frame_ms must be one of {FRAME_MS_CHOICES}, got {frame_ms}")
        self.context_id = context_id
        self.source_rate = source_rate
        self.rate = output_rate
        self.frame_samples = output_rate * frame_ms // 1000
        self.gain = np.float32(volume * 32767.0)
        self.seq = 0
        self._pending = np.zeros(0, dtype=np.int16)
        self._resampler = self._new_resampler()

    def _new_resampler(self) -> soxr.ResampleStream | None:
        if self.rate == self.source_rate:
            return None
        return soxr.ResampleStream(self.source_rate, self.rate, 1, dtype="float32", quality="HQ")

    @property
    def emitted_seconds(self) -> float:
        return self.seq * self.frame_samples / self.rate

    def push(self, audio: np.ndarray, last: bool = False) -> list[AudioFrame]:
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        if self._resampler is not None:
            audio = self._resampler.resample_chunk(audio, last=last)
        pcm = np.clip(audio * self.gain, -32767, 32767).astype(np.int16)
        pending = np.concatenate([self._pending, pcm]) if len(self._pending) else pcm
        n_frames = len(pending) // self.frame_samples
        frames = [self._frame(pending[i * self.frame_samples : (i + 1) * self.frame_samples]) for i in range(n_frames)]
        self._pending = pending[n_frames * self.frame_samples :]
        return frames

    def flush(self) -> list[AudioFrame]:
        frames = self.push(np.zeros(0, dtype=np.float32), last=True)
        if len(self._pending):
            padded = np.zeros(self.frame_samples, dtype=np.int16)
            padded[: len(self._pending)] = self._pending
            frames.append(self._frame(padded))
            self._pending = self._pending[:0]
        self._resampler = self._new_resampler()
        return frames

    def _frame(self, pcm: np.ndarray) -> AudioFrame:
        frame = AudioFrame(self.context_id, self.seq, self.emitted_seconds, self.rate, pcm.tobytes())
        self.seq += 1
        return frame
