"""ElevenLabs' HTTP text-to-speech API without a server: request parsing, the four bodies, the
alignment they carry, and the error shape, read back the way ElevenLabs' SDK and Pipecat read them."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import numpy as np
import pytest
from elevenlabs.core.unchecked_base_model import construct_type
from elevenlabs.types.audio_with_timestamps_response import AudioWithTimestampsResponse
from elevenlabs.types.streaming_audio_chunk_with_timestamps_response import StreamingAudioChunkWithTimestampsResponse
from hypothesis import given, settings
from hypothesis import strategies as st
from pipecat.services.elevenlabs.tts import ElevenLabsHttpTTSService
from pipecat.services.elevenlabs.tts_base import _strip_utterance_leading_spaces

from voxflow.errors import AtCapacity, LimitExceeded, VoxflowError
from voxflow.transports.core.admission import Draining
from voxflow.transports.core.auth import RateLimited, Unauthorized
from voxflow.transports.protocols.elevenlabs_http_protocol import (
    Aligner,
    AudioWriter,
    CharacterAlignment,
    ElevenLabsHttpError,
    TimestampedDocument,
    TimestampedLines,
    check_latency,
    check_text,
    error_payload,
    max_body_bytes,
    output_format,
    parse_body,
    resolve_voice,
    speech_request,
    style_for,
)
from voxflow.transports.protocols.elevenlabs_protocol import OUTPUT_FORMATS, VoiceSettings
from voxflow.voices.styles import Style

OWN = ("en_US-joe-medium", "en_GB-alba-medium")
DEFAULT = "en_US-joe-medium"
ALIASES = {"21m00Tcm4TlvDq8ikWCM": "en_GB-alba-medium", "gone": "en_US-missing-low"}
PCM_24K = OUTPUT_FORMATS["pcm_24000"]
FRAME = 480  # 20 ms at 24 kHz


def voice_for(name: str | None) -> str:
    if name in ALIASES:
        return ALIASES[name]
    return DEFAULT if name is None else name


def request(body: dict, query: dict[str, str] | None = None, voice_id: str = "21m00Tcm4TlvDq8ikWCM", max_chars: int = 1000):
    return speech_request(
        json.dumps(body).encode(), query or {}, voice_id, own_voices=OWN, voice_for=voice_for, max_text_chars=max_chars
    )


def refused(call, *args) -> ElevenLabsHttpError:
    with pytest.raises(ElevenLabsHttpError) as caught:
        call(*args)
    return caught.value


# -- the request --------------------------------------------------------------------------------


def test_a_body_as_the_sdk_sends_it():
    # ElevenLabs' SDK 2.78 (text_to_speech/raw_client.py) sends every field it was given,
    # Pipecat's ElevenLabsHttpTTSService adds previous_text, LiveKit apply_text_normalization.
    spoken = request(
        {
            "text": "Hello there.",
            "model_id": "eleven_flash_v2_5",
            "language_code": "en",
            "voice_settings": {"stability": 0.2, "similarity_boost": 0.8, "style": 0.5, "use_speaker_boost": True, "speed": 1.1},
            "pronunciation_dictionary_locators": [{"pronunciation_dictionary_id": "a", "version_id": "b"}],
            "seed": 4_294_967_295,
            "previous_text": "Earlier.",
            "next_text": None,
            "previous_request_ids": [],
            "apply_text_normalization": "auto",
            "apply_language_text_normalization": False,
            "use_pvc_as_ivc": False,
            "audio_effects": {"pan": 0},
        },
        {"output_format": "pcm_16000", "optimize_streaming_latency": "3", "enable_logging": "false"},
    )
    assert spoken.text == "Hello there."
    assert spoken.voice == "en_GB-alba-medium"
    assert spoken.seed == 4_294_967_295
    assert spoken.output_format is OUTPUT_FORMATS["pcm_16000"]
    assert spoken.style == VoiceSettings(stability=0.2, style=0.5, speed=1.1).to_style()


def test_everything_but_text_is_optional_and_null_means_absent():
    spoken = request({"text": "Hi.", "model_id": None, "voice_settings": None, "seed": None})
    assert spoken.output_format is OUTPUT_FORMATS["mp3_44100_128"]  # ElevenLabs' default
    assert spoken.seed is None
    assert spoken.style == Style(speed=1.0, expressiveness=1.0)


@pytest.mark.parametrize(
    ("raw", "param", "fragment"),
    [
        (b'{"model_id": "eleven_flash_v2_5"}', "text", "text: Field required"),
        (b'{"text": 12}', "text", "text: Input should be a valid string"),
        (b'{"text": "Hi", "seed": -1}', "seed", "seed: Input should be greater than or equal to 0"),
        (b'{"text": "Hi", "seed": 4294967296}', "seed", "seed: Input should be less than or equal to 4294967295"),
        (b'{"text": "Hi", "voice_settings": {"speed": "fast"}}', "voice_settings", "voice_settings.speed"),
        (b'{"text": "Hi", "voice_settings": {"stability": 1e999}}', "voice_settings", "voice_settings.stability"),
        (b'{"text": "Hi", "voice_settings": [0.5]}', "voice_settings", "voice_settings"),
        (b"not json", None, "Invalid JSON"),
        (b"[]", None, "Input should be an object"),
    ],
)
def test_bad_bodies_are_422_naming_the_field(raw, param, fragment):
    error = refused(parse_body, raw)
    assert (error.http_status, error.code, error.param) == (422, "invalid_parameters", param)
    assert fragment in str(error)


def test_text_must_have_something_to_say_and_fit_the_limit():
    assert check_text("Hi.", 3) == "Hi."
    for blank in ("", "  \n"):
        error = refused(check_text, blank, 10)
        assert (error.http_status, error.code, error.param, str(error)) == (422, "invalid_parameters", "text", "text must not be empty")
    error = refused(check_text, "Hello", 4)
    # ElevenLabs' own status and code for text over the limit.
    assert (error.http_status, error.code, error.param) == (400, "max_character_limit_exceeded", "text")
    assert str(error) == "this request's text has 5 characters and exceeds the limit of 4 characters"


def test_every_output_format_and_a_clear_refusal_of_others():
    for name, fmt in OUTPUT_FORMATS.items():
        assert output_format({"output_format": name}) is fmt
    assert output_format({}) is OUTPUT_FORMATS["mp3_44100_128"]
    error = refused(output_format, {"output_format": "flac_44100"})
    assert (error.http_status, error.code, error.param) == (422, "unsupported_output_format", "output_format")
    assert str(error).startswith("unsupported output_format 'flac_44100'; supported: pcm_8000, pcm_16000")
    assert "mp3_22050_32" in str(error) and "ulaw_8000" in str(error)


@pytest.mark.parametrize("value", ["0", "1", "2", "3", "4"])
def test_optimize_streaming_latency_levels_are_accepted(value):
    check_latency({"optimize_streaming_latency": value})


@pytest.mark.parametrize("value", ["5", "-1", "1.5", "max", "", "٣"])
def test_optimize_streaming_latency_outside_elevenlabs_levels_is_refused(value):
    error = refused(check_latency, {"optimize_streaming_latency": value})
    assert (error.http_status, error.param) == (422, "optimize_streaming_latency")
    assert "must be an integer from 0 to 4" in str(error)


def test_query_mistakes_are_reported_before_body_mistakes():
    error = refused(request, {}, {"output_format": "aiff"})
    assert error.param == "output_format"


def test_text_over_the_engine_limit_is_refused():
    error = refused(request, {"text": "a" * 11}, None, "x", 10)
    assert error.code == "max_character_limit_exceeded"


def test_voice_ids_resolve_to_aliases_own_voices_or_the_default():
    assert resolve_voice("21m00Tcm4TlvDq8ikWCM", OWN, voice_for) == "en_GB-alba-medium"
    assert resolve_voice("en_GB-alba-medium", OWN, voice_for) == "en_GB-alba-medium"
    assert resolve_voice("pNInz6obpgDQGcFmaJgB", OWN, voice_for) == DEFAULT
    assert resolve_voice("gone", OWN, voice_for) == DEFAULT  # an alias of a voice the server lacks


def test_voice_settings_map_as_on_the_websocket():
    assert style_for(None) == VoiceSettings().to_style()
    body = parse_body(b'{"text": "x", "voice_settings": {"stability": 1.0, "style": 1.0, "speed": 0.7, "similarity_boost": 1}}')
    assert style_for(body.voice_settings) == VoiceSettings(stability=1.0, style=1.0, speed=0.7).to_style()
    assert style_for(body.voice_settings) == Style(speed=0.7, expressiveness=1.5)


def test_the_body_limit_leaves_room_for_the_longest_text_escaped():
    text = "é" * 1000
    escaped = json.dumps({"text": text, "model_id": "eleven_multilingual_v2"}).encode()
    assert len(escaped) <= max_body_bytes(1000) < len(escaped) + 70 * 1024


# -- alignment ----------------------------------------------------------------------------------


def aligned(alignment: CharacterAlignment) -> list[tuple[str, float, float]]:
    return list(zip(alignment.characters, alignment.starts, alignment.ends))


def test_words_become_characters_with_a_space_spanning_each_gap():
    aligner = Aligner()
    aligner.add_word("Hi,", 0.1, 0.4)
    aligner.add_word("you", 0.5, 0.8)
    done = aligner.finish(1.0)
    assert "".join(done.characters) == "Hi, you"
    assert done.starts == pytest.approx((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7))
    # The space lasts from "Hi," to "you"; the last character lasts to the end of the audio.
    assert done.ends == pytest.approx((0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1.0))


def test_overlapping_words_are_kept_in_order_and_empty_words_skipped():
    aligner = Aligner()
    aligner.add_word("one", 0.0, 0.3)
    aligner.add_word("", 0.3, 0.3)
    aligner.add_word("two", 0.2, 0.25)
    done = aligner.finish(0.0)
    assert "".join(done.characters) == "one two"
    assert list(done.starts) == sorted(done.starts)
    assert all(end >= start for start, end in zip(done.starts, done.ends))
    assert done.ends[-1] == pytest.approx(0.3)  # audio shorter than the words: the word's end stays


def test_take_releases_started_characters_but_holds_the_last_one():
    aligner = Aligner()
    aligner.add_word("ab", 0.0, 0.2)
    assert aligner.take(0.05).characters == ("a",)
    assert aligner.take(5.0).characters == ()  # "b" may yet be lengthened to the audio's end
    aligner.add_word("cd", 0.3, 0.5)
    assert aligner.take(0.31).characters == ("b", " ", "c")
    assert aligner.finish(0.6) == CharacterAlignment(("d",), (0.4,), (0.6,))
    assert aligner.finish(0.7) == CharacterAlignment()


def test_alignment_json_is_elevenlabs_character_alignment_in_milliseconds():
    alignment = CharacterAlignment(("H", "i"), (0.02321, 0.1), (0.1, 0.26789))
    assert alignment.to_json() == {
        "characters": ["H", "i"],
        "character_start_times_seconds": [0.023, 0.1],
        "character_end_times_seconds": [0.1, 0.268],
    }


# -- bodies -------------------------------------------------------------------------------------


WORDS = [("Hello", 0.023, 0.267), ("there,", 0.31, 0.6), ("how", 0.84, 0.95), ("are", 0.98, 1.04), ("you?", 1.08, 1.6)]


def synthesize(writer, words=WORDS, seconds: float = 1.9, frame: int = FRAME) -> list[bytes]:
    """Drive a writer the way the engine's events come: each word before the audio it starts in."""
    rng = np.random.default_rng(1)
    pcm = (rng.standard_normal(round(seconds * 24000)) * 3000).astype("<i2").tobytes()
    pending, out = list(words), []
    for begin in range(0, len(pcm) // 2, frame):
        while pending and pending[0][1] < (begin + frame) / 24000:
            writer.add_word(*pending.pop(0))
        out.append(writer.add_audio(pcm[2 * begin : 2 * (begin + frame)]))
    for word in pending:
        writer.add_word(*word)
    out.append(writer.finish())
    return [piece for piece in out if piece]


def reference_pcm(seconds: float = 1.9) -> bytes:
    return b"".join(synthesize(AudioWriter(PCM_24K), seconds=seconds))


def test_audio_writer_sends_the_format_as_it_comes():
    pieces = synthesize(AudioWriter(PCM_24K))
    assert len(pieces) == 95  # one per 20 ms frame
    assert len(b"".join(pieces)) == 2 * round(1.9 * 24000)
    assert AudioWriter(PCM_24K).media_type == "audio/pcm"
    assert AudioWriter(OUTPUT_FORMATS["mp3_44100_128"]).media_type == "audio/mpeg"


def test_the_document_is_one_json_object_the_sdk_reads():
    pieces = synthesize(TimestampedDocument(PCM_24K), frame=333)  # odd sizes: base64 across pieces
    assert pieces[0].startswith(b'{"audio_base64":"') and len(pieces) > 10
    body = json.loads(b"".join(pieces))
    assert base64.b64decode(body["audio_base64"]) == reference_pcm()
    assert body["normalized_alignment"] == body["alignment"]
    alignment = body["alignment"]
    assert "".join(alignment["characters"]) == "Hello there, how are you?"
    assert alignment["character_start_times_seconds"][0] == 0.023
    assert alignment["character_end_times_seconds"][-1] == 1.9
    parsed = construct_type(type_=AudioWithTimestampsResponse, object_=body)
    assert parsed.alignment.characters == alignment["characters"]
    assert base64.b64decode(parsed.audio_base_64) == reference_pcm()


def test_a_document_without_speech_is_still_a_document():
    writer = TimestampedDocument(PCM_24K)
    assert json.loads(writer.finish()) == {
        "audio_base64": "",
        "alignment": {"characters": [], "character_start_times_seconds": [], "character_end_times_seconds": []},
        "normalized_alignment": {"characters": [], "character_start_times_seconds": [], "character_end_times_seconds": []},
    }


def lines_of(pieces: list[bytes]) -> list[dict]:
    assert all(piece.endswith(b"\n") and piece.count(b"\n") == 1 for piece in pieces)
    return [json.loads(piece) for piece in pieces]


def test_lines_carry_their_audio_and_the_characters_it_reaches_with_times_from_the_response_start():
    lines = lines_of(synthesize(TimestampedLines(PCM_24K)))
    assert b"".join(base64.b64decode(line["audio_base64"]) for line in lines) == reference_pcm()
    heard = 0.0
    for line in lines:
        heard += len(base64.b64decode(line["audio_base64"])) / 2 / 24000
        if line["alignment"] is None:
            assert line["normalized_alignment"] is None
            continue
        assert line["normalized_alignment"] == line["alignment"]
        assert all(start < heard + 1e-9 for start in line["alignment"]["character_start_times_seconds"])
    # Joined, the lines' alignments are the document's.
    joined = {key: [v for line in lines if line["alignment"] for v in line["alignment"][key]] for key in lines[-1]["alignment"]}
    assert joined == json.loads(b"".join(synthesize(TimestampedDocument(PCM_24K))))["alignment"]
    # The last line brings the held character, with no audio: PCM leaves nothing in the encoder.
    assert lines[-1] == {"audio_base64": "", "alignment": lines[-1]["alignment"], "normalized_alignment": lines[-1]["alignment"]}
    assert lines[-1]["alignment"]["characters"] == ["?"]
    parsed = [construct_type(type_=StreamingAudioChunkWithTimestampsResponse, object_=line) for line in lines]
    assert parsed[-1].alignment.character_end_times_seconds == [1.9]


def test_an_encoded_format_ends_with_the_encoders_tail_and_the_rest_of_the_characters():
    lines = lines_of(synthesize(TimestampedLines(OUTPUT_FORMATS["mp3_22050_32"])))
    assert lines[-1]["audio_base64"] and lines[-1]["alignment"]["characters"][-1] == "?"


def pipecat_http_word_times(lines: list[dict], clock: float = 0.0) -> tuple[list[tuple[str, float]], float]:
    """Word times as Pipecat 1.14's ElevenLabsHttpTTSService rebuilds them from one response, with
    its own calculate_word_times and leading-space strip (run_tts), and the duration by which it
    advances its clock for the next response of the turn."""
    service = SimpleNamespace(_cumulative_time=clock, _partial_word="", _partial_word_start_time=0.0)
    words, duration, started = [], 0.0, False
    keys = ("characters", "character_start_times_seconds", "character_end_times_seconds")
    for line in lines:
        if not line["alignment"]:
            continue
        alignment = _strip_utterance_leading_spaces(line["alignment"], keys, not started)
        started = True
        duration = max(duration, alignment["character_end_times_seconds"][-1])
        words += ElevenLabsHttpTTSService.calculate_word_times(service, alignment)
    if service._partial_word:
        words.append((service._partial_word, service._partial_word_start_time))
    return words, duration


def test_pipecat_rebuilds_each_word_at_its_start_and_the_turn_clock_at_the_audio_end():
    first, duration = pipecat_http_word_times(lines_of(synthesize(TimestampedLines(PCM_24K))))
    assert first == [(w, pytest.approx(round(start, 3))) for w, start, _ in WORDS]
    assert duration == 1.9
    # The next response of the turn continues on the clock where this one's audio ended.
    second, _ = pipecat_http_word_times(lines_of(synthesize(TimestampedLines(PCM_24K))), clock=duration)
    assert second[0] == ("Hello", pytest.approx(1.9 + 0.023))


@settings(max_examples=60, deadline=None)
@given(
    gaps=st.lists(st.tuples(st.floats(0, 0.4), st.floats(0.01, 0.6), st.text("abc,.?", min_size=1, max_size=8)), min_size=1, max_size=12),
    frame=st.integers(1, 2000),
)
def test_lines_and_document_agree_whatever_the_words_and_frames(gaps, frame):
    words, t = [], 0.05
    for gap, length, word in gaps:
        words.append((word, t + gap, t + gap + length))
        t += gap + length
    seconds = t + 0.2
    lines = lines_of(synthesize(TimestampedLines(PCM_24K), words, seconds, frame))
    document = json.loads(b"".join(synthesize(TimestampedDocument(PCM_24K), words, seconds, frame)))
    joined = [c for line in lines if line["alignment"] for c in line["alignment"]["characters"]]
    assert "".join(joined) == "".join(document["alignment"]["characters"]) == " ".join(w for w, _, _ in words)
    rebuilt, duration = pipecat_http_word_times(lines)
    assert [w for w, _ in rebuilt] == [w for w, _, _ in words]
    assert all(abs(a - start) <= 0.0011 for (_, a), (_, start, _) in zip(rebuilt, words))
    assert duration == pytest.approx(round(seconds * 24000) / 24000, abs=0.001)


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status", "code", "kind"),
    [
        (Unauthorized("missing or invalid API key"), 401, "invalid_api_key", "authentication_error"),
        (RateLimited("more than 5 requests per second"), 429, "rate_limit_exceeded", "rate_limit_error"),
        (AtCapacity("at most 8 http stream places per client"), 429, "concurrent_limit_exceeded", "rate_limit_error"),
        (Draining("the server is shutting down"), 503, "service_unavailable", "service_error"),
        (LimitExceeded("request body exceeds 10 bytes"), 413, "request_too_large", "validation_error"),
        (VoxflowError("the request body did not arrive within 5 s", code="request_timeout"), 408, "request_timeout", "timeout_error"),
    ],
)
def test_refusals_have_elevenlabs_status_and_code(exc, status, code, kind):
    assert error_payload(exc) == (status, {"detail": {"type": kind, "code": code, "status": code, "message": str(exc), "param": None}})


def test_request_errors_name_their_field():
    error = ElevenLabsHttpError("text must not be empty", param="text")
    assert error_payload(error) == (422, {"detail": {
        "type": "validation_error", "code": "invalid_parameters", "status": "invalid_parameters",
        "message": "text must not be empty", "param": "text",
    }})


def test_alignment_carries_the_written_text_and_normalized_alignment_the_spoken():
    words = [("Hello", 0.02, 0.4, "**Hello**"), ("there.", 0.45, 0.9, None)]
    document = json.loads(b"".join(synthesize(TimestampedDocument(PCM_24K), words=words, seconds=1.0)))
    assert "".join(document["alignment"]["characters"]) == "**Hello** there."
    assert "".join(document["normalized_alignment"]["characters"]) == "Hello there."
    # The same words at the same times: each word's first character starts where it was spoken.
    for alignment, first in ((document["alignment"], "*"), (document["normalized_alignment"], "H")):
        assert alignment["characters"][0] == first and alignment["character_start_times_seconds"][0] == 0.02
    lines = lines_of(synthesize(TimestampedLines(PCM_24K), words=words, seconds=1.0))
    joined = "".join(c for line in lines if line["alignment"] for c in line["alignment"]["characters"])
    assert joined == "**Hello** there."
