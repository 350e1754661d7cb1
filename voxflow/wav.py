"""Mono PCM16 wrapped as a WAV file, for the payloads that want a whole file (Hermes, ASR uploads)."""

from __future__ import annotations

import io
import wave


def wav_file(pcm: bytes, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm)
    return buffer.getvalue()
