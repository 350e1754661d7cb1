"""Consent for matched voices (voxflow/voices/consent.py), with the real recogniser and encoder.

No real recording says the consent statement, so the spoken statements here are voxflow's own
voice (joe) reading it, checked against a reference of other joe sentences: synthetic, but one
speaker. Another speaker is a real one (allison, tests/recordings.py).
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from recordings import RATE, SPEAKERS, load
from voxflow.errors import ConsentRefused, ConsentRequired, InvalidRequest, LimitExceeded
from voxflow.voices import consent
from voxflow.voices.consent import ConsentRecord

WATERMARK_ID = "perth-implicit-test"
NAME = "kestrel"  # not in pocketsphinx's dictionary: the name is spoken but not checked
JOE_REFERENCE = (
    "The library keeps its old maps in a cool room on the second floor.",
    "After the storm the fishermen mended their nets on the quay.",
    "My grandmother wrote long letters to her sister every winter.",
    "The bus was late again, so we walked the last mile through the park.",
    "A small cafe by the station serves the best soup in town.",
)


@pytest.fixture(scope="module")
def joe_reference(engine) -> list[float]:
    spoken = [engine.synthesize(text, seed=100 + i) for i, text in enumerate(JOE_REFERENCE)]
    assert sum(u.duration for u in spoken) >= 10.0
    return consent.reference_embedding([u.audio for u in spoken], spoken[0].sample_rate)


@pytest.fixture(scope="module")
def allison_reference() -> list[float]:
    return consent.reference_embedding([load(p) for p in SPEAKERS["allison"].reference()], RATE)


@pytest.fixture(scope="module")
def joe_statement(engine):
    return engine.synthesize(consent.consent_statement(NAME), seed=1)


def say(engine, text: str, seed: int = 3):
    u = engine.synthesize(text, seed=seed)
    return u.audio, u.sample_rate


def test_statement_names_the_voice_in_plain_words():
    text = consent.consent_statement("bob_2-matched")
    assert text == "I give permission for these recordings of my speech to be used to make a computer voice called bob 2 matched."
    assert consent.FIXED_WORDS[:3] == ("i", "give", "permission") and "bob" not in consent.FIXED_WORDS
    assert set(consent.KEY_WORDS) <= set(consent.FIXED_WORDS)
    with pytest.raises(InvalidRequest):
        consent.consent_statement("  ")


def test_the_same_voice_reading_the_statement_passes(joe_statement, joe_reference):
    audio, rate = joe_statement.audio, joe_statement.sample_rate
    record = consent.verify_spoken(audio, rate, joe_reference, NAME, WATERMARK_ID)

    assert record.method == "spoken"
    assert record.statement == consent.consent_statement(NAME)
    assert record.word_score >= consent.WORD_MATCH
    assert "permission" in record.transcript
    assert consent.SPEAKER_THRESHOLD <= record.speaker_score <= 1.0
    assert record.speaker_threshold == consent.SPEAKER_THRESHOLD
    assert record.audio_sha256 == hashlib.sha256(audio.astype("<f4").tobytes()).hexdigest()
    assert record.audio_sha256_of == "float32-samples"
    assert record.reference_embedding == pytest.approx(joe_reference)
    assert record.watermark_id == WATERMARK_ID
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record.created)
    assert record.attestation is None


def test_the_record_keeps_the_uploaded_files_sha256(joe_statement, joe_reference):
    file_bytes = b"RIFF....WAVE" + joe_statement.audio.tobytes()
    record = consent.verify_spoken(
        joe_statement.audio, joe_statement.sample_rate, joe_reference, NAME, WATERMARK_ID, file_bytes=file_bytes
    )
    assert record.audio_sha256 == hashlib.sha256(file_bytes).hexdigest()
    assert record.audio_sha256_of == "file"


def test_a_spoken_record_round_trips_through_json(joe_statement, joe_reference):
    record = consent.verify_spoken(joe_statement.audio, joe_statement.sample_rate, joe_reference, NAME, WATERMARK_ID)
    data = json.loads(json.dumps(record.to_json()))
    assert data["method"] == "spoken" and data["audio_sha256"] == record.audio_sha256 and "attestation" not in data
    assert ConsentRecord.from_json(data) == record


def test_other_words_are_refused_naming_the_missing_words(engine, joe_reference):
    audio, rate = say(engine, "Please leave a message after the tone and we will call you back.")
    with pytest.raises(ConsentRefused) as caught:
        consent.verify_spoken(audio, rate, joe_reference, NAME, WATERMARK_ID)
    message = caught.value.message
    assert caught.value.code == "consent_refused"
    assert "does not say the consent statement" in message
    assert re.search(r"missing: .*permission.*recordings.*computer", message)
    assert consent.consent_statement(NAME) in message  # what to say instead
    assert "speaker" not in message  # the same voice: only the words are wrong


def test_a_negated_statement_is_refused(engine, joe_reference):
    audio, rate = say(engine, "I do not give permission for these recordings of my speech to be used to make a computer voice called kestrel.")
    with pytest.raises(ConsentRefused, match=r"negation \('not'\)"):
        consent.verify_spoken(audio, rate, joe_reference, NAME, WATERMARK_ID)


def test_another_speakers_statement_is_refused_with_its_score(joe_statement, allison_reference):
    with pytest.raises(ConsentRefused) as caught:
        consent.verify_spoken(joe_statement.audio, joe_statement.sample_rate, allison_reference, NAME, WATERMARK_ID)
    message = caught.value.message
    score = float(re.search(r"speaker score (\d\.\d+) is below the threshold (\d\.\d+)", message).group(1))
    assert score < consent.SPEAKER_THRESHOLD - 0.1  # a male synthetic voice against a real woman's
    assert f"{consent.SPEAKER_THRESHOLD:.2f}" in message
    assert "does not say" not in message  # the words were right


def test_a_real_speakers_clip_does_not_match_joes_reference(joe_reference):
    clip = load(SPEAKERS["allison"].held_out()[0])
    assert consent.speaker_score(clip, RATE, joe_reference) < consent.SPEAKER_THRESHOLD


def test_the_word_check_tolerates_what_pocketsphinx_mishears():
    # Transcripts pocketsphinx gave for joe reading the statement (benchmarks/consent_scores.py).
    for heard in (
        "i'd give permission for these recordings of my speech to be used to make the computer voice call castro",
        "i get permission for these recordings of my speech to be used to make a computer voice called chew on",
        "i'd give permission for these reports of my speech to be used to make a few voice call bob to",
    ):
        assert consent.check_words(heard).passed, heard
    for heard in (
        "i give permission for these recordings of my speech to be used for medical or search only",
        "i never give permission for these recordings of my speech to be used to make a computer voice called anna",
        "i give for these recordings of my speech to be used to make a computer voice called anna",  # no "permission"
        "",
    ):
        assert not consent.check_words(heard).passed, heard


def test_a_negation_in_the_voice_name_is_not_a_refusal():
    heard = "i give permission for these recordings of my speech to be used to make a computer voice called no regrets"
    assert consent.check_words(heard, "no-regrets").passed
    assert not consent.check_words(heard).passed
    assert not consent.check_words("i do not " + heard[2:], "no-regrets").passed


def test_the_statement_is_still_heard_over_noise(joe_statement):
    rng = np.random.default_rng(0)
    audio = joe_statement.audio
    noise = rng.standard_normal(len(audio)).astype(np.float32) * np.sqrt(np.mean(audio**2) / 10**3)  # 30 dB SNR
    assert consent.check_words(consent.transcribe(audio + noise, joe_statement.sample_rate)).passed


def test_statement_audio_is_bounded(joe_reference):
    with pytest.raises(ConsentRefused, match="too short"):
        consent.verify_spoken(np.zeros(16_000, np.float32), 16_000, joe_reference, NAME, WATERMARK_ID)
    with pytest.raises(LimitExceeded):
        consent.verify_spoken(np.zeros(31 * 16_000, np.float32), 16_000, joe_reference, NAME, WATERMARK_ID)
    with pytest.raises(InvalidRequest):
        consent.verify_spoken(np.full(3 * 16_000, np.nan, np.float32), 16_000, joe_reference, NAME, WATERMARK_ID)
    with pytest.raises(InvalidRequest):
        consent.verify_spoken(np.zeros((2, 3 * 16_000), np.float32), 16_000, joe_reference, NAME, WATERMARK_ID)
    with pytest.raises(InvalidRequest):
        consent.verify_spoken(np.zeros(3 * 16_000, np.float32), 16_000, [0.0, 0.0], NAME, WATERMARK_ID)


def test_an_attestation_round_trips_through_json():
    embedding = [0.6, -0.8, 0.0]
    record = consent.attest("  LibriVox reading by J. Doe, public domain (librivox.org/some-book)  ", np.array(embedding), WATERMARK_ID)
    assert record.method == "attested"
    assert record.attestation == "LibriVox reading by J. Doe, public domain (librivox.org/some-book)"
    assert record.audio_sha256 is None and record.speaker_score is None
    data = json.loads(json.dumps(record.to_json()))
    assert data == {
        "method": "attested",
        "created": record.created,
        "watermark_id": WATERMARK_ID,
        "attestation": record.attestation,
        "reference_embedding": embedding,
    }
    assert ConsentRecord.from_json(data) == record


def test_unicode_attestations_are_kept():
    text = "Corpus «Voix de Québec», licence CC BY 4.0; \u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"  # ZWNJ is Persian spelling, not a control
    assert consent.attest(text, [1.0, 0.0], WATERMARK_ID).attestation == text


@pytest.mark.parametrize(
    ("text", "error", "says"),
    [
        ("", ConsentRequired, "empty"),
        (" \t\n ", ConsentRequired, "empty"),
        ("x" * (consent.MAX_ATTESTATION_CHARS + 1), InvalidRequest, "at most 1000"),
        ("licensed corpus \ud800", InvalidRequest, "lone surrogate"),
        ("licensed\x00corpus", InvalidRequest, "non-printable"),
        ("licensed corpus\nsecond line", InvalidRequest, "non-printable"),
        ("licence \u202eesnecil on\u202c", InvalidRequest, "non-printable"),
        (b"licensed corpus", InvalidRequest, "must be text"),
        (None, InvalidRequest, "must be text"),
    ],
)
def test_bad_attestations_are_refused(text, error, says):
    with pytest.raises(error, match=says):
        consent.attest(text, [1.0, 0.0], WATERMARK_ID)


def test_attestation_needs_an_embedding_and_a_watermark_id():
    with pytest.raises(InvalidRequest):
        consent.attest("licensed corpus", [], WATERMARK_ID)
    with pytest.raises(InvalidRequest):
        consent.attest("licensed corpus", [float("nan"), 1.0], WATERMARK_ID)
    with pytest.raises(InvalidRequest):
        consent.attest("licensed corpus", [1.0], "")


def test_malformed_records_are_refused():
    good = consent.attest("licensed corpus", [1.0, 0.0], WATERMARK_ID).to_json()
    with pytest.raises(ValueError, match="method"):
        ConsentRecord.from_json({**good, "method": "verbal"})
    with pytest.raises(KeyError):
        ConsentRecord.from_json({k: v for k, v in good.items() if k != "reference_embedding"})
    with pytest.raises(ValueError):
        ConsentRecord.from_json({**good, "reference_embedding": ["a"]})
    with pytest.raises(ValueError):
        ConsentRecord.from_json({**good, "attestation": ""})
    spoken = {**good, "method": "spoken", "statement": "s", "audio_sha256": "00" * 32, "audio_sha256_of": "file",
              "transcript": "t", "word_score": 1.0, "speaker_score": 0.9, "speaker_threshold": 0.78}
    assert ConsentRecord.from_json(spoken).audio_sha256 == "00" * 32
    with pytest.raises(ValueError, match="sha256"):
        ConsentRecord.from_json({**spoken, "audio_sha256": "not a digest"})
    with pytest.raises(ValueError):
        ConsentRecord.from_json({**spoken, "speaker_score": float("nan")})
    with pytest.raises(TypeError):
        ConsentRecord.from_json([good])
