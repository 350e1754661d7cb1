"""Voice activity: microphone PCM16 in, 16 kHz VAD frames with webrtcvad's decision out.

A pure state machine (no I/O, no event loop): the agent's VAD node wraps it. The turn rules
that read these frames are in turns.py.
"""

from __future__ import annotations

import numpy as np
import soxr
import webrtcvad

from ..errors import InvalidRequest
from .frames import VAD_RATE, VoiceFrame

INPUT_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
FRAME_MS = (10, 20, 30)  # the only frame sizes webrtcvad accepts


def hangover_ms(aggressiveness: int) -> int:
    """How long webrtcvad keeps saying "speech" after a short sound has stopped.

    Its hang-over (kOverHangMax1 in webrtc's vad_core.c) is 6, 3 or 2 frames of 10, 20 or
    30 ms at aggressiveness 2 and 3, and 8, 4 or 3 at 0 and 1. After a sound longer than six
    frames it grows (to 90-100 ms, and 140-150 ms at 0 and 1).
    """
    return 60 if aggressiveness >= 2 else 90


class InvalidAudio(InvalidRequest):
    code = "invalid_audio"


class VoiceActivity:
    """Splits a PCM16 stream into VAD frames of `frame_ms` at 16 kHz and classifies each.

    Input at another rate goes through one streaming soxr resampler for the whole stream,
    so chunk edges leave no clicks. soxr holds back its filter's latency (30 ms of output from
    22.05 to 48 kHz, 95 ms from 8 kHz) until later input pushes it out, and compensates it,
    so a frame's `start` is where its audio was in the input. The resampler runs in float32: its
    int16 mode rounds differently depending on how the input was chunked, float32 gives the
    same frames for any chunking.

    Apart from soxr's fixed-size state, at most one partial frame is held between calls.
    """

    def __init__(self, sample_rate: int, *, aggressiveness: int = 2, frame_ms: int = 30) -> None:
        if sample_rate not in INPUT_RATES:
            raise InvalidAudio(f"unsupported sample rate {sample_rate!r}: use one of {', '.join(map(str, INPUT_RATES))} Hz")
        if not isinstance(aggressiveness, int) or aggressiveness not in (0, 1, 2, 3):
            raise InvalidAudio(f"VAD aggressiveness must be 0, 1, 2 or 3, got {aggressiveness!r}")
        if not isinstance(frame_ms, int) or frame_ms not in FRAME_MS:
            raise InvalidAudio(f"VAD frame must be 10, 20 or 30 ms, got {frame_ms!r}")
        self.sample_rate = sample_rate
        self.frame_ms = frame_ms
        self._vad = webrtcvad.Vad(aggressiveness)
        self._resampler = None if sample_rate == VAD_RATE else soxr.ResampleStream(sample_rate, VAD_RATE, 1, dtype="float32")
        self._frame_samples = VAD_RATE * frame_ms // 1000
        self._frame_bytes = 2 * self._frame_samples
        self._duration = frame_ms / 1000
        self._pending = b""  # the start of the next frame, always shorter than one frame
        self._frames_out = 0

    def process(self, pcm: bytes) -> list[VoiceFrame]:
        """The whole frames that `pcm` (mono PCM16 LE at sample_rate, any length) completes.

        Cost is linear in the chunk (one resampling pass, one webrtcvad call per frame); the
        transports bound message sizes, so no limit is enforced here.
        """
        if len(pcm) % 2:
            raise InvalidAudio(f"PCM16 audio must be whole 2-byte samples, got {len(pcm)} bytes")
        if self._resampler is not None and pcm:
            x = np.frombuffer(pcm, dtype="<i2").astype(np.float32) * np.float32(1 / 32768)
            y = self._resampler.resample_chunk(x) * np.float32(32768)
            pcm = np.clip(np.rint(y), -32768, 32767).astype("<i2").tobytes()
        data = self._pending + pcm if self._pending else bytes(pcm)
        size = self._frame_bytes
        whole = len(data) - len(data) % size
        self._pending = data[whole:]
        is_speech = self._vad.is_speech
        duration = self._duration
        index = self._frames_out
        samples, rate = self._frame_samples, VAD_RATE
        frames = []
        for offset in range(0, whole, size):
            chunk = data[offset:offset + size]
            # From the integer sample count, so an hour in, starts are still exact multiples.
            frames.append(VoiceFrame(chunk, index * samples / rate, duration, is_speech(chunk, rate)))
            index += 1
        self._frames_out = index
        return frames
