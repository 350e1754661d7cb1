"""Making a matched-voice profile from reference recordings (`voxflow voices match`).

The steps, cheapest refusal first: read the recordings (bounded), measure their speech (at
least MIN_SPEECH_S), embed the reference once, check consent (a spoken statement by the same
speaker, or an operator's attestation), then have the base voice read TUNING_SENTENCES and tune
the transform against reference sentences held out of its analysis (matching.tune).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..audio_file import read_audio
from ..errors import ConsentRequired, InvalidRequest, LimitExceeded
from .matching import TuningGrid, resample, split_reference, tune
from .profile import MatchProfile
from .speaker_embedding import dvector_encoder

ANALYSIS_RATE = 16_000  # the speaker encoders' rate; references are often 16 kHz recordings
MIN_SPEECH_S = 60.0
MAX_REFERENCE_S = 20 * 60.0  # per profile: analysis cost and memory stay bounded
MAX_FILES = 500
# What the base voice reads while the transform is tuned: ~15 s of ordinary sentences.
TUNING_SENTENCES = (
    "I would like to book a table for two tonight, please.",
    "The weather will be sunny in the morning and cloudy later on.",
    "Could you remind me to call my mother at six?",
    "Thanks for waiting, your order is on its way.",
    "Turn left at the next corner and keep going for two miles.",
    "Our store opens at nine and closes at six on weekdays.",
)


@dataclass(frozen=True)
class ConsentInput:
    """Exactly one of the two ways: a recorded statement file, or an attestation text."""

    statement: Path | None = None
    attestation: str | None = None


def speech_seconds(audio: np.ndarray, rate: int = ANALYSIS_RATE) -> float:
    """Seconds of speech in 16 kHz audio: 30 ms frames that WebRTC's VAD calls speech."""
    import webrtcvad

    vad = webrtcvad.Vad(2)
    frame = rate * 30 // 1000
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    frames = len(pcm) // frame
    voiced = sum(vad.is_speech(pcm[i * frame : (i + 1) * frame].tobytes(), rate) for i in range(frames))
    return voiced * 0.03


def read_reference(paths: Sequence[Path]) -> list[np.ndarray]:
    if not paths:
        raise InvalidRequest("give at least one reference recording")
    if len(paths) > MAX_FILES:
        raise LimitExceeded(f"at most {MAX_FILES} reference files")
    clips, seconds = [], 0.0
    for path in paths:
        audio, rate = read_audio(path, max_seconds=MAX_REFERENCE_S)
        seconds += len(audio) / rate
        if seconds > MAX_REFERENCE_S:
            raise LimitExceeded(f"the reference recordings are longer than {MAX_REFERENCE_S / 60:g} minutes in all")
        clips.append(resample(audio, rate, ANALYSIS_RATE))
    return clips


def make_profile(
    name: str,
    base_voice: str,
    reference: Sequence[Path],
    consent: ConsentInput,
    speak: Callable[[str], tuple[np.ndarray, int]],
    grid: TuningGrid = TuningGrid(),
) -> MatchProfile:
    """`speak(text)` renders text in the base voice: (float audio, rate)."""
    from . import consent as consent_check
    from .watermark import WATERMARK_ID

    if (consent.statement is None) == (consent.attestation is None):
        raise ConsentRequired(
            "a matched voice needs consent: a recorded statement (--consent FILE, reading: "
            f"{consent_check.consent_statement(name)!r}) or an operator attestation (--attest \"source and licence\")"
        )
    clips = read_reference(reference)
    joined = np.concatenate(clips)
    speech = speech_seconds(joined)
    if speech < MIN_SPEECH_S:
        raise InvalidRequest(f"the reference holds {speech:.0f} s of speech; at least {MIN_SPEECH_S:g} s are needed")
    encoder = dvector_encoder()
    embedding = encoder.embed(joined, ANALYSIS_RATE)
    if consent.statement is not None:
        audio, rate = read_audio(consent.statement, max_seconds=consent_check.MAX_STATEMENT_SECONDS)
        record = consent_check.verify_spoken(audio, rate, embedding, name, WATERMARK_ID, file_bytes=consent.statement.read_bytes())
    else:
        record = consent_check.attest(consent.attestation or "", embedding, WATERMARK_ID)

    spoken = [speak(text) for text in TUNING_SENTENCES]
    base_rate = spoken[0][1]
    base_speech = np.concatenate([audio for audio, _ in spoken])
    analysis, held_out = split_reference(clips)
    result = tune(analysis, held_out, ANALYSIS_RATE, base_speech, base_rate, encoder.embed, grid)
    return MatchProfile(
        name=name,
        base_voice=base_voice,
        params=result.params,
        consent=record,
        encoder=encoder.name,
        base_similarity=round(result.base_similarity, 4),
        similarity=round(result.similarity, 4),
        reference_seconds=round(speech, 1),
    )
