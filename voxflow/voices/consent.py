"""Consent for matched voices: no profile is made without one of two records.

1. A spoken consent statement (`verify_spoken`), recorded by the person whose reference
   recordings are matched. It must say the documented sentence (`consent_statement`)

       I give permission for these recordings of my speech to be used to make a computer
       voice called NAME.

   and be spoken by the reference's speaker. Two checks, both with models that run here:
   - words: pocketsphinx (en-us, the model the package ships) transcribes the statement;
   - speaker: the statement's d-vector (`speaker_embedding.dvector_encoder`) against the
     d-vector of the whole reference (`reference_embedding`), cosine >= SPEAKER_THRESHOLD.
   Both always run; a refusal (ConsentRefused) names each that failed: the words not heard
   and what was heard, or the measured speaker score against the threshold.
2. An operator attestation (`attest`), for recordings whose speaker cannot record a statement
   (a licensed or public corpus): one line of text naming the source and its licence.

The record (`ConsentRecord`: the way, the statement's sha256 or the attestation, the scores,
the reference embedding, the date, the watermark id) is kept in the profile file and shown by
GET /v1/voices.

Wording. Plain, common English words that pocketsphinx's dictionary and language model know.
A first draft, "... my voice may be used to make the voxflow voice called NAME", came back as
"my boys" and "box full": "voxflow" is not in the dictionary, and "my voice" loses to "my
boys" in the language model. "These recordings of my speech" also ties the statement to the
reference it comes with.

Word check (WORD_MATCH, KEY_WORDS, `check_words`). The 18 words of the sentence other than the
name (FIXED_WORDS) are aligned in order with the transcript (longest common subsequence), a
word also matching one that differs only by an ending ("call" for "called", "i'd" for "i"),
and the statement passes when
- at least WORD_MATCH = 75 % of FIXED_WORDS (14 of 18) are heard in order,
- every KEY_WORD ("permission") is among them,
- no negation is heard ("not", "never", "no", "refuse", any "...n't", ...): "I do not give
  permission ..." holds every fixed word.
The name is spoken but not checked: pocketsphinx's dictionary lacks most names ("kestrel"
came back as "castro", "siobhan" as "chew on"), so requiring it would refuse people for their
voice's name. The record keeps the sentence with the name, the transcript and the audio's
sha256, so the recording can be reviewed.
Measured (benchmarks/consent_scores.py, benchmarks/results/consent-scores.json) with joe, the
synthetic voice, reading the statement for 4 names x 2 seeds x speeds 0.85 / 1 / 1.15: share of
fixed words heard, clean min 0.94 (median 1.00), with white noise at 30 dB SNR min 0.94, at 20 dB
min 0.89; 72 of 72 pass. Speech that is not the statement: 24 other joe sentences max 0.11,
43 real prompts by allison (en-US) max 0.22; none passes. Near misses: the negated statements
are refused by the negation rule, "... to be used for medical research only" (0.67) by the
share. The most missed words are "a" (25 of 72) and "give" (5, heard "get"); "voice" was heard
as "boys" twice, which is why it is not a key word. What the check cannot see: one content
word swapped for another ("a computer game called NAME") still passes; the sha256 and the
transcript in the record are there for a person to review such a case.

Speaker check (SPEAKER_THRESHOLD = 0.78). Measured with the same benchmark: each reference is
the d-vector of a whole `tests/recordings.py` reference (4 real speakers, 76-83 s each:
allison f en-US, carlo m it-IT, june f fr-CA, ivr_ru f ru-RU) or of 12 joe sentences (39 s);
each clip is one 3-8 s sentence, as a statement is (24 per speaker never in its reference,
120 in all).
- Clean. Same speaker (120): min 0.823 (allison), p5 >= 0.830 for every speaker, medians
  0.90-0.91. Different speakers (480 pairs, joe included): max 0.743 (an ivr_ru clip against
  allison's reference; both women), then 0.684 (allison vs ivr_ru); joe against a real
  reference at most 0.44, a real speaker against joe's at most 0.42.
  At 0.78: false accepts 0 / 480, false rejects 0 / 120. The threshold sits in the middle of
  the gap between 0.743 and 0.823 (about 0.04 from each); at 0.70 one different-speaker clip
  passes (0.2 %), at 0.65 16 (3.3 %), at 0.85 7 same-speaker clips (5.8 %) are refused.
- Noise lowers same-speaker scores (the references are clean) and does not raise
  different-speaker ones (max 0.696 at 30 dB, 0.686 at 20 dB). White noise at 30 dB SNR: false
  rejects 14 / 120 (11.7 %), at 20 dB 92 / 120 (77 %); false accepts 0 / 480 at both. So the
  statement must be recorded somewhere quiet, close to the microphone (the refusal says so):
  the threshold is chosen to refuse every different speaker measured with margin, not to
  accept noisy statements.
Limits: 4 real speakers and one synthetic are a small sample; speakers closer than these (same
sex, language and recording chain) will score higher against each other, so the check is one
safeguard among the watermark and the record, not proof of identity. The statement is in
English and three of the references are not: a cross-language same-speaker pair was not
measured (no such recordings here). Whether *matched* synthetic output (voxflow's voice
transformed toward a reference) passes is measured by benchmarks/voices.py with
`benchmarks.consent_scores.speaker_scores`.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from typing import Any

import numpy as np
import soxr

from ..errors import ConsentRefused, ConsentRequired, InvalidRequest, LimitExceeded

METHODS = ("spoken", "attested")

_STATEMENT = "I give permission for these recordings of my speech to be used to make a computer voice called {name}."

WORD_MATCH = 0.75  # share of FIXED_WORDS heard in order (14 of 18); see the module docstring
KEY_WORDS = ("permission",)  # each must be among them
SPEAKER_THRESHOLD = 0.78  # d-vector cosine, statement vs the whole reference; see the module docstring

MIN_STATEMENT_SECONDS = 1.5  # the sentence takes about 4 s at an ordinary pace
MAX_STATEMENT_SECONDS = 30.0  # bounds the recognition and embedding work one request can ask for
MAX_ATTESTATION_CHARS = 1000
MAX_WATERMARK_ID_CHARS = 200

_ASR_RATE = 16_000
_NEGATION_WORDS = frozenset(
    {"not", "no", "never", "nor", "neither", "nobody", "none", "refuse", "refused", "deny", "denied",
     "disagree", "withdraw", "revoke", "without", "cannot"}
)
# Bidirectional overrides and isolates reorder what a reader sees (a record shown in a
# terminal or a web page could read differently from what it holds).
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _words(text: str) -> list[str]:
    """Lower-case words, punctuation dropped; apostrophes kept, so "don't" is one word."""
    return re.findall(r"[a-z0-9']+", text.lower().replace("\u2019", "'"))


FIXED_WORDS: tuple[str, ...] = tuple(_words(_STATEMENT.replace("{name}", "")))


def spoken_name(voice_name: str) -> str:
    """The voice's name as it is read out: separators (`._-`) become spaces."""
    if not isinstance(voice_name, str) or not voice_name.strip():
        raise InvalidRequest("the voice name must be a non-empty string")
    return " ".join(re.split(r"[\s._-]+", voice_name.strip())).strip()


def consent_statement(voice_name: str) -> str:
    """The sentence a person reads to consent to a matched voice called `voice_name`."""
    return _STATEMENT.format(name=spoken_name(voice_name))


# --- the record ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ConsentRecord:
    """How consent to a matched voice was given; stored in its profile (`to_json`)."""

    method: str  # "spoken" or "attested"
    reference_embedding: list[float] = field(repr=False)  # d-vector of the whole reference
    created: str  # ISO-8601 UTC, e.g. 2026-12-05T13:42:24Z
    watermark_id: str  # the watermark the matched voice's output carries
    # spoken
    statement: str | None = None  # the sentence asked for, with the voice's name
    audio_sha256: str | None = None
    audio_sha256_of: str | None = None  # "file" (the bytes as uploaded) or "float32-samples"
    transcript: str | None = None  # what the recogniser heard
    word_score: float | None = None  # share of FIXED_WORDS heard in order
    speaker_score: float | None = None  # d-vector cosine, statement vs reference
    speaker_threshold: float | None = None  # the threshold it was checked against
    # attested
    attestation: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"method": self.method, "created": self.created, "watermark_id": self.watermark_id}
        if self.method == "spoken":
            data |= {
                "statement": self.statement,
                "audio_sha256": self.audio_sha256,
                "audio_sha256_of": self.audio_sha256_of,
                "transcript": self.transcript,
                "word_score": self.word_score,
                "speaker_score": self.speaker_score,
                "speaker_threshold": self.speaker_threshold,
            }
        else:
            data["attestation"] = self.attestation
        data["reference_embedding"] = list(self.reference_embedding)
        return data

    @classmethod
    def from_json(cls, data: Any) -> "ConsentRecord":
        """The inverse of `to_json`; raises ValueError (or TypeError, KeyError) on a malformed record."""
        if not isinstance(data, dict):
            raise TypeError(f"a consent record is a JSON object, got {type(data).__name__}")
        method = data["method"]
        if method not in METHODS:
            raise ValueError(f"consent method {method!r} is not one of {METHODS}")
        common = {
            "method": method,
            "reference_embedding": _embedding(data["reference_embedding"], ValueError),
            "created": _text(data, "created"),
            "watermark_id": _text(data, "watermark_id"),
        }
        if method == "attested":
            return cls(**common, attestation=_text(data, "attestation"))
        sha = _text(data, "audio_sha256")
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ValueError(f"audio_sha256 {sha!r} is not a sha256 hex digest")
        return cls(
            **common,
            statement=_text(data, "statement"),
            audio_sha256=sha,
            audio_sha256_of=_text(data, "audio_sha256_of"),
            transcript=str(data.get("transcript") or ""),
            word_score=_number(data, "word_score"),
            speaker_score=_number(data, "speaker_score"),
            speaker_threshold=_number(data, "speaker_threshold"),
        )


def _text(data: dict, key: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not value:
        raise ValueError(f"consent record field {key!r} must be a non-empty string, got {value!r}")
    return value


def _number(data: dict, key: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"consent record field {key!r} must be a finite number, got {value!r}")
    return float(value)


def _embedding(values: Any, error: type[Exception] = InvalidRequest) -> list[float]:
    try:
        vector = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise error(f"the reference embedding must be a list of numbers: {exc}") from None
    if vector.ndim != 1 or len(vector) == 0 or not np.all(np.isfinite(vector)) or not np.any(vector):
        raise error("the reference embedding must be a non-empty, non-zero vector of finite numbers")
    return [float(v) for v in vector]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _watermark_id(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_WATERMARK_ID_CHARS or not value.isprintable():
        raise InvalidRequest(f"the watermark id must be printable text of 1 to {MAX_WATERMARK_ID_CHARS} characters")
    return value


# --- attestation ---------------------------------------------------------------------------


def attest(text: str, reference_embedding: Sequence[float] | np.ndarray, watermark_id: str) -> ConsentRecord:
    """An operator's attestation that the reference may be matched (its source and licence).

    Raises ConsentRequired when the text is empty or only white space, and InvalidRequest when
    it is not a string, is longer than MAX_ATTESTATION_CHARS, holds a lone surrogate (it could
    not be stored as UTF-8), or a control, unassigned, private-use, line-separator or
    bidirectional-override character (one line of text, shown as it reads).
    """
    if not isinstance(text, str):
        raise InvalidRequest(f"the attestation must be text, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise ConsentRequired(
            "the attestation is empty: say where the reference recordings come from and under which licence "
            "they may be used to make a voice"
        )
    if len(text) > MAX_ATTESTATION_CHARS:
        raise InvalidRequest(f"the attestation is {len(text)} characters long; at most {MAX_ATTESTATION_CHARS} are kept")
    for i, char in enumerate(text):
        category = unicodedata.category(char)
        if category == "Cs":
            raise InvalidRequest(f"the attestation holds a lone surrogate (U+{ord(char):04X}) at character {i}: it is not valid text")
        if category in ("Cc", "Co", "Cn", "Zl", "Zp") or char in _BIDI_CONTROLS:
            raise InvalidRequest(f"the attestation holds a non-printable character (U+{ord(char):04X}) at character {i}")
    return ConsentRecord(
        method="attested",
        reference_embedding=_embedding(reference_embedding),
        created=_now(),
        watermark_id=_watermark_id(watermark_id),
        attestation=text,
    )


# --- spoken statement ----------------------------------------------------------------------


@dataclass(frozen=True)
class WordCheck:
    transcript: str
    heard: tuple[str, ...]  # FIXED_WORDS found in the transcript, in order
    missing: tuple[str, ...]  # FIXED_WORDS not found (positions kept: a word may repeat)
    negations: tuple[str, ...]  # negation words in the transcript

    @property
    def score(self) -> float:
        return len(self.heard) / len(FIXED_WORDS)

    @property
    def missing_keys(self) -> tuple[str, ...]:
        return tuple(k for k in KEY_WORDS if k not in self.heard)

    @property
    def passed(self) -> bool:
        return self.score >= WORD_MATCH and not self.missing_keys and not self.negations


def _is_negation(word: str) -> bool:
    return word in _NEGATION_WORDS or word.endswith("n't")


_ENDINGS = ("'d", "'s", "ed", "d", "s")


def _same_word(expected: str, heard: str) -> bool:
    """The same word, or one that differs only by an ending ("call" for "called", "i'd" for
    "i", "recording" for "recordings"): pocketsphinx often drops or adds one, and none of
    them changes what the statement says."""
    if expected == heard:
        return True
    short, long = sorted((expected, heard), key=len)
    return any(long == short + ending for ending in _ENDINGS)


def check_words(transcript: str, voice_name: str | None = None) -> WordCheck:
    """Align FIXED_WORDS with a transcript (longest common subsequence, in order).

    The words of `voice_name`, when given, are not counted as negations (a voice may be
    called "no-regrets")."""
    fixed, heard = FIXED_WORDS, _words(transcript)
    n, m = len(fixed), len(heard)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            table[i][j] = table[i + 1][j + 1] + 1 if _same_word(fixed[i], heard[j]) else max(table[i + 1][j], table[i][j + 1])
    found, missing, i, j = [], [], 0, 0
    while i < n:
        if j < m and _same_word(fixed[i], heard[j]):
            found.append(fixed[i])
            i, j = i + 1, j + 1
        elif j < m and table[i][j + 1] >= table[i + 1][j]:
            j += 1
        else:
            missing.append(fixed[i])
            i += 1
    name_words = set(_words(spoken_name(voice_name))) if voice_name is not None else set()
    negations = tuple(w for w in heard if _is_negation(w) and w not in name_words)
    return WordCheck(transcript, tuple(found), tuple(missing), negations)


@cache
def _recogniser() -> tuple[Any, threading.Lock]:
    from pocketsphinx import Decoder

    # The default search (with the fwdflat second pass): unlike the conversation agent's
    # streaming recogniser, this runs once per profile, and accuracy matters more than 30 ms.
    return Decoder(samprate=_ASR_RATE), threading.Lock()


def transcribe(audio: np.ndarray, rate: int) -> str:
    """pocketsphinx's transcript of float audio in [-1, 1] (lower case, no punctuation)."""
    audio = np.asarray(audio, dtype=np.float32)
    if rate != _ASR_RATE:
        audio = soxr.resample(audio, rate, _ASR_RATE)
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    decoder, lock = _recogniser()
    with lock:
        # Start from the model's initial cepstral mean, not the last statement's.
        decoder.set_cmn(decoder.config["cmninit"])
        decoder.start_utt()
        decoder.process_raw(pcm, False, True)
        decoder.end_utt()
        hyp = decoder.hyp()
    return hyp.hypstr if hyp is not None else ""


def reference_embedding(clips: Sequence[np.ndarray], rate: int) -> list[float]:
    """The d-vector of the whole reference (its clips joined), as the consent check compares it."""
    from .speaker_embedding import dvector_encoder

    if not clips:
        raise InvalidRequest("no reference audio")
    joined = np.concatenate([np.asarray(c, dtype=np.float32).ravel() for c in clips])
    return [float(v) for v in dvector_encoder().embed(joined, rate)]


def speaker_score(audio: np.ndarray, rate: int, reference: Sequence[float] | np.ndarray) -> float:
    """d-vector cosine similarity between one recording and a reference embedding."""
    from .speaker_embedding import dvector_encoder, similarity

    return similarity(dvector_encoder().embed(audio, rate), np.asarray(reference, dtype=np.float32))


def _statement_audio(audio: Any, rate: Any) -> np.ndarray:
    if isinstance(rate, bool) or not isinstance(rate, int) or not 8_000 <= rate <= 192_000:
        raise InvalidRequest(f"the statement's sample rate must be an integer from 8000 to 192000 Hz, got {rate!r}")
    audio = np.asarray(audio)
    if audio.ndim != 1 or not np.issubdtype(audio.dtype, np.floating):
        raise InvalidRequest(f"the statement must be mono float audio (1-D), got {audio.dtype} of shape {audio.shape}")
    audio = audio.astype(np.float32)
    if not np.all(np.isfinite(audio)):
        raise InvalidRequest("the statement's audio holds non-finite samples")
    seconds = len(audio) / rate
    if seconds > MAX_STATEMENT_SECONDS:
        raise LimitExceeded(f"the consent statement is {seconds:.1f} s long; at most {MAX_STATEMENT_SECONDS:.0f} s is checked")
    if seconds < MIN_STATEMENT_SECONDS:
        raise ConsentRefused(
            f"the consent statement is {seconds:.1f} s long, too short to hold the sentence (at least "
            f"{MIN_STATEMENT_SECONDS} s; it takes about 4 s to say)"
        )
    return audio


def verify_spoken(
    statement_audio: np.ndarray,
    rate: int,
    reference_embedding: Sequence[float] | np.ndarray,
    voice_name: str,
    watermark_id: str,
    *,
    file_bytes: bytes | None = None,
) -> ConsentRecord:
    """Check a recorded consent statement; the record of it, or ConsentRefused saying why.

    `statement_audio` is mono float audio in [-1, 1] at `rate`; `reference_embedding` the
    d-vector of the whole reference (`reference_embedding()`). `file_bytes`, when given, is
    the statement's file as uploaded: the record then keeps its sha256 (what `sha256sum FILE`
    prints), otherwise the sha256 of the float32 little-endian samples.
    Both checks run, and a refusal names every one that failed: the words that were not
    heard (with what was heard), or the speaker score against SPEAKER_THRESHOLD.
    """
    statement = consent_statement(voice_name)
    watermark_id = _watermark_id(watermark_id)
    reference = _embedding(reference_embedding)
    audio = _statement_audio(statement_audio, rate)

    words = check_words(transcribe(audio, rate), voice_name)
    score = speaker_score(audio, rate, reference)
    reasons = []
    if not words.passed:
        problems = []
        if words.score < WORD_MATCH:
            problems.append(
                f"{len(words.heard)} of the statement's {len(FIXED_WORDS)} words were heard in order "
                f"(at least {math.ceil(WORD_MATCH * len(FIXED_WORDS))} are needed); missing: {' '.join(words.missing)}"
            )
        if words.missing_keys:
            problems.append(f"the word {', '.join(repr(k) for k in words.missing_keys)} was not heard")
        if words.negations:
            problems.append(f"it holds a negation ({', '.join(repr(w) for w in words.negations)})")
        reasons.append(
            f"the recording does not say the consent statement: {'; '.join(problems)}. "
            f'Heard: "{words.transcript}". Expected: "{statement}"'
        )
    if score < SPEAKER_THRESHOLD:
        reasons.append(
            f"the statement's speaker does not match the reference recordings: speaker score {score:.3f} is "
            f"below the threshold {SPEAKER_THRESHOLD:.2f} (d-vector cosine similarity). If it is the same person, record "
            "the statement again somewhere quiet, close to the microphone: noise lowers the score"
        )
    if reasons:
        raise ConsentRefused("consent refused: " + " | ".join(reasons))

    if file_bytes is not None:
        sha, sha_of = hashlib.sha256(file_bytes).hexdigest(), "file"
    else:
        sha, sha_of = hashlib.sha256(audio.astype("<f4").tobytes()).hexdigest(), "float32-samples"
    return ConsentRecord(
        method="spoken",
        reference_embedding=reference,
        created=_now(),
        watermark_id=watermark_id,
        statement=statement,
        audio_sha256=sha,
        audio_sha256_of=sha_of,
        transcript=words.transcript,
        word_score=round(words.score, 4),
        speaker_score=round(score, 4),
        speaker_threshold=SPEAKER_THRESHOLD,
    )
