"""Microphone audio for the agent's tests: engine-made utterances laid out on a timeline.

    call = compose(engine, [("silence", 1.0), ("say", "turn on the lights"), ("silence", 2.0)])
    call.speech_spans  # [(1.0, 2.1...)]: where the utterance is, in seconds
    pcm = to_pcm16(call.audio)

Everything is seeded, so a test sees the same audio on every run.
"""

from __future__ import annotations

import wave
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import soxr

ASR_RATE = 16_000  # what the agent's VAD and recognizer take

BURST_LEVEL = 0.1  # RMS of a ("noise", s) burst: as loud as the engine's speech
_FADE_S = 0.005  # bursts fade in and out this fast: abrupt, but without a click


@cache
def _voice(engine: Any, text: str) -> tuple[np.ndarray, int]:
    utterance = engine.synthesize(text)
    audio = np.asarray(utterance.audio, dtype=np.float32)
    # Trimmed to where the voice is audible (above -34 dB of its peak), so that a Call's
    # speech_spans are the speech and not the engine's quiet lead-in and tail; trimmed before
    # resampling, so that a call lays out the same at every rate.
    loud = np.flatnonzero(np.abs(audio) > 0.02 * np.abs(audio).max())
    return audio[loud[0]:loud[-1] + 1], utterance.sample_rate


@cache
def _speech(engine: Any, text: str, rate: int) -> np.ndarray:
    audio, voice_rate = _voice(engine, text)
    if voice_rate != rate:
        audio = soxr.resample(audio, voice_rate, rate)
    audio = audio.astype(np.float32)  # a copy either way, so the engine's array stays its own
    audio.setflags(write=False)  # shared by every caller through the cache
    return audio


def speech(engine: Any, text: str, rate: int = ASR_RATE) -> np.ndarray:
    """The engine saying `text`, float32 at `rate`, trimmed to the audible part (cached, read-only)."""
    return _speech(engine, text, rate)


def _pink(n: int, rate: int, level: float, seed: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, np.float32)
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    spectrum /= np.sqrt(np.maximum(np.fft.rfftfreq(n, 1 / rate), 50.0))
    audio = np.fft.irfft(spectrum, n)
    return (audio * (level / max(float(np.std(audio)), 1e-12))).astype(np.float32)


def noise(seconds: float, rate: int = ASR_RATE, *, level: float = 0.01, seed: int = 0) -> np.ndarray:
    """Pink-ish background noise (power falling as 1/f above 50 Hz) with RMS `level`, float32."""
    return _pink(round(seconds * rate), rate, level, seed)


def burst(seconds: float, rate: int = ASR_RATE, *, level: float = BURST_LEVEL, seed: int | list[int] = 0) -> np.ndarray:
    """A cough- or knock-like sound: 300-3000 Hz noise at RMS `level`, with 5 ms fades."""
    n = round(seconds * rate)
    if n == 0:
        return np.zeros(0, np.float32)
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / rate)
    spectrum[(freqs < 300) | (freqs > 3000)] = 0
    audio = np.fft.irfft(spectrum, n)
    audio *= level / max(float(np.std(audio)), 1e-12)
    fade = min(round(_FADE_S * rate), n // 2)
    ramp = np.sin(np.linspace(0, np.pi / 2, fade)) ** 2
    audio[:fade] *= ramp
    audio[n - fade:] *= ramp[::-1]
    return audio.astype(np.float32)


@dataclass
class Call:
    audio: np.ndarray  # float32 in [-1, 1]
    rate: int
    speech_spans: list[tuple[float, float]]  # (start, end) seconds of each ("say", text)

    @property
    def duration(self) -> float:
        return len(self.audio) / self.rate


Part = tuple[str, "float | str | np.ndarray"]


def compose(
    engine: Any, parts: list[Part], *, rate: int = ASR_RATE, noise_level: float = 0.003, seed: int = 0
) -> Call:
    """Lay `parts` end to end and mix seeded background noise over all of it.

    Parts: ("silence", seconds); ("say", text): the engine's speech (speech(engine, text, rate));
    ("noise", seconds): a burst() as loud as speech; ("audio", array): float samples at `rate`.
    noise_level is the background's RMS (0: none); engine may be None when nothing is said.
    """
    pieces: list[np.ndarray] = []
    spans: list[tuple[float, float]] = []
    at = 0
    for index, (kind, value) in enumerate(parts):
        if kind == "silence":
            piece = np.zeros(round(value * rate), np.float32)
        elif kind == "say":
            piece = speech(engine, value, rate)
            spans.append((at / rate, (at + len(piece)) / rate))
        elif kind == "noise":
            piece = burst(value, rate, seed=[seed, index])
        elif kind == "audio":
            piece = np.asarray(value, dtype=np.float32)
        else:
            raise ValueError(f"unknown part {kind!r}: use silence, say, noise or audio")
        pieces.append(piece)
        at += len(piece)
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    if noise_level > 0:
        audio = audio + _pink(at, rate, noise_level, seed)
    return Call(np.clip(audio, -1.0, 1.0).astype(np.float32), rate, spans)


def to_pcm16(audio: np.ndarray) -> bytes:
    """Float audio in [-1, 1] as mono little-endian PCM16 (clipped)."""
    return (np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0) * 32767).astype("<i2").tobytes()


def write_wav(path: str | Path, audio: np.ndarray, rate: int) -> None:
    """A mono 16-bit WAV file, for listening to what a test fed the agent."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(to_pcm16(audio))
