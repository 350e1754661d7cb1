"""Speech helpers for tests: offline recognition with pocketsphinx and word error rate."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable

import jiwer
import numpy as np
import soxr

from voxflow.streaming.events import AudioFrame

ASR_RATE = 16_000  # pocketsphinx's en-us acoustic model is trained on 16 kHz audio


@lru_cache(maxsize=1)
def _decoder():
    # Loading the model and language model takes a second or two; do it once per process.
    from pocketsphinx import Decoder

    return Decoder(samprate=ASR_RATE)


def transcribe(audio: np.ndarray, rate: int) -> str:
    """Recognise float audio in [-1, 1] at `rate` Hz; returns the lower-case hypothesis."""
    audio = np.asarray(audio, dtype=np.float32)
    if rate != ASR_RATE:
        audio = soxr.resample(audio, rate, ASR_RATE)
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    decoder = _decoder()
    decoder.start_utt()
    decoder.process_raw(pcm, full_utt=True)
    decoder.end_utt()
    hyp = decoder.hyp()
    return hyp.hypstr if hyp is not None else ""


def pcm_to_float(frames: Iterable[AudioFrame]) -> np.ndarray:
    """Join the PCM16 payloads of audio frames into one float32 signal in [-1, 1]."""
    pcm = b"".join(frame.pcm for frame in frames)
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def normalize_words(text: str) -> list[str]:
    """Lower-case words with punctuation dropped; apostrophes stay so "don't" is one word."""
    return re.findall(r"[a-z0-9']+", text.lower().replace("\u2019", "'"))


def word_error_rate(refs: list[str], hyps: list[str]) -> float:
    """Corpus WER: total word edits over total reference words (not a mean of per-line rates)."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    ref_words = [" ".join(normalize_words(ref)) for ref in refs]
    if not any(ref_words):
        raise ValueError("references contain no words")
    # jiwer counts a line without words as an error of its own; such lines add no words here.
    pairs = [(ref, " ".join(normalize_words(hyp))) for ref, hyp in zip(ref_words, hyps) if ref]
    return jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs]).wer
