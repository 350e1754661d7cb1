"""The OpenAI speech API's pure parts: validation, voice/speed/instructions mapping, encoders, events."""

from __future__ import annotations

import base64
import io
import json
import wave

import av
import numpy as np
import pytest
import soundfile

from voxflow.errors import LimitExceeded, VoxflowError
from voxflow.transports.core.auth import Unauthorized
from voxflow.transports.protocols.openai_protocol import (
    MAX_INPUT_CHARS,
    OPENAI_VOICES,
    SAMPLE_RATE,
    SpeechBody,
    SpeechParamError,
    audio_delta,
    audio_done,
    audio_format,
    check_input,
    check_speed,
    error_payload,
    parse_body,
    preset_in,
    resolve_voice,
    speech_request,
    style_for,
    voice_name,
    wants_sse,
)
from voxflow.transports.protocols.audio_encoding import streaming_wav_header
from voxflow.voices.styles import PRESETS, Style

OWN = ("en_US-joe-medium", "en_GB-alba-medium")
DEFAULT = "en_US-joe-medium"


def voice_for(aliases: dict[str, str] | None = None):
    """The same contract as ServerState.voice_for: aliases, then own names, None -> default."""
    aliases = aliases or {}

    def resolve(name: str | None) -> str:
        if name in aliases:
            return aliases[name]
        return name or DEFAULT

    return resolve


def tone(seconds: float, rate: int = SAMPLE_RATE) -> list[bytes]:
    """20 ms frames of a 440 Hz tone as s16le, the way the engine delivers audio."""
    t = np.arange(int(seconds * rate)) / rate
    pcm = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes()
    step = rate // 50 * 2
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


# -- body parsing ---------------------------------------------------------------------------


def test_body_defaults_follow_openai():
    body = parse_body(b'{"model": "tts-1", "input": "Hi", "voice": "alloy"}')
    assert (body.response_format, body.speed, body.stream_format, body.instructions) == ("mp3", 1.0, "audio", None)


def test_body_accepts_a_voice_object_and_ignores_unknown_fields():
    body = parse_body(b'{"input": "Hi", "voice": {"id": "nova"}, "user": "someone"}')
    assert body.voice == {"id": "nova"}


@pytest.mark.parametrize(
    ("raw", "param", "text"),
    [
        (b'{"voice": "alloy"}', "input", "input: Field required"),
        (b'{"input": 5, "voice": "alloy"}', "input", "input"),
        (b'{"input": "hi", "speed": "fast"}', "speed", "speed"),
        (b"{", None, "Invalid JSON"),
        (b"[1]", None, "body"),
    ],
)
def test_malformed_bodies_name_the_field(raw, param, text):
    with pytest.raises(SpeechParamError) as caught:
        parse_body(raw)
    assert caught.value.param == param
    assert text in str(caught.value)
    assert caught.value.code == "invalid_request"


# -- input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_input_is_refused(text):
    with pytest.raises(SpeechParamError, match="must not be empty") as caught:
        check_input(text)
    assert caught.value.param == "input"


def test_input_is_limited_to_openais_4096_characters():
    assert check_input("a" * MAX_INPUT_CHARS) == "a" * MAX_INPUT_CHARS
    with pytest.raises(SpeechParamError, match="4097 characters; the maximum is 4096"):
        check_input("a" * (MAX_INPUT_CHARS + 1))


# -- voices ---------------------------------------------------------------------------------


def test_every_openai_voice_is_known():
    assert OPENAI_VOICES == {
        "alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse", "marin", "cedar"
    }


@pytest.mark.parametrize("name", sorted(OPENAI_VOICES))
def test_openai_voices_speak_with_the_default_voice(name):
    assert resolve_voice(name, OWN, voice_for()) == DEFAULT


def test_an_alias_overrides_the_default():
    aliases = voice_for({"nova": "en_GB-alba-medium", "narrator": "en_GB-alba-medium"})
    assert resolve_voice("nova", OWN, aliases) == "en_GB-alba-medium"
    assert resolve_voice("narrator", OWN, aliases) == "en_GB-alba-medium"
    assert resolve_voice("alloy", OWN, aliases) == DEFAULT


def test_own_voices_select_themselves_and_none_is_the_default():
    assert resolve_voice("en_GB-alba-medium", OWN, voice_for()) == "en_GB-alba-medium"
    assert resolve_voice(None, OWN, voice_for()) == DEFAULT


def test_an_unknown_voice_is_refused_with_the_choices():
    with pytest.raises(SpeechParamError) as caught:
        resolve_voice("bob", OWN, voice_for())
    assert caught.value.param == "voice"
    assert "'bob'" in str(caught.value) and "alloy" in str(caught.value) and "en_GB-alba-medium" in str(caught.value)


def test_an_alias_to_a_missing_voice_is_reported_as_such():
    with pytest.raises(SpeechParamError, match="alias of 'gone'"):
        resolve_voice("alloy", OWN, voice_for({"alloy": "gone"}))


def test_voice_objects_carry_their_id():
    assert voice_name({"id": "voice_1234"}) == "voice_1234"
    assert voice_name("echo") == "echo"
    assert voice_name(None) is None
    with pytest.raises(SpeechParamError, match='"id"'):
        voice_name({"name": "echo"})


# -- speed and instructions -----------------------------------------------------------------


@pytest.mark.parametrize("speed", [0.25, 1.0, 4.0])
def test_openai_speeds_are_accepted(speed):
    assert check_speed(speed) == speed


@pytest.mark.parametrize("speed", [0.2, 4.01, 10.0, -1.0, float("nan")])
def test_speeds_outside_openais_range_are_refused(speed):
    with pytest.raises(SpeechParamError, match="between 0.25 and 4.0") as caught:
        check_speed(speed)
    assert caught.value.param == "speed"


@pytest.mark.parametrize(("speed", "expected"), [(0.25, 0.5), (0.5, 0.5), (1.5, 1.5), (2.0, 2.0), (4.0, 2.0)])
def test_speed_is_clamped_into_voxflows_range(speed, expected):
    assert style_for(None, speed) == Style(speed=expected)


@pytest.mark.parametrize(
    ("instructions", "preset"),
    [
        ("happy", "happy"),
        ("Speak in a calm and soothing tone.", "calm"),
        ("SAD, please", "sad"),
        ("Sound serious, not happy.", "serious"),
        ("Whisper like a pirate", "neutral"),
        ("unhappy", "neutral"),  # whole words only
        (None, "neutral"),
        ("", "neutral"),
    ],
)
def test_instructions_pick_the_first_preset_they_name(instructions, preset):
    assert preset_in(instructions) == preset


def test_a_preset_keeps_its_character_and_speed_scales_it():
    sad = PRESETS["sad"]
    assert style_for("sad", 1.0) == sad
    faster = style_for("sad", 2.0)
    assert faster.speed == pytest.approx(sad.speed * 2.0)
    assert (faster.expressiveness, faster.volume) == (sad.expressiveness, sad.volume)
    assert style_for("happy", 4.0).speed == 2.0


# -- formats --------------------------------------------------------------------------------


def test_every_openai_format_is_supported_with_its_media_type():
    assert {name: audio_format(name).media_type for name in ("mp3", "opus", "aac", "flac", "wav", "pcm")} == {
        "mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm",
    }


def test_an_unknown_format_lists_the_supported_ones():
    with pytest.raises(SpeechParamError) as caught:
        audio_format("ogg_vorbis")
    assert caught.value.param == "response_format"
    assert str(caught.value) == "unsupported response_format 'ogg_vorbis'; supported: pcm, wav, mp3, opus, aac, flac"


def test_stream_formats():
    assert wants_sse("sse") is True
    assert wants_sse("audio") is False
    with pytest.raises(SpeechParamError, match="supported: audio, sse"):
        wants_sse("websocket")


# -- the whole mapping ----------------------------------------------------------------------


def test_a_full_request_maps_every_field():
    body = SpeechBody(
        model="gpt-4o-mini-tts", input="Hello!", voice={"id": "alloy"}, instructions="Be calm.",
        response_format="wav", speed=1.0, stream_format="sse",
    )
    request = speech_request(body, OWN, voice_for())
    assert (request.text, request.voice, request.style, request.audio_format.name, request.sse) == (
        "Hello!", DEFAULT, PRESETS["calm"], "wav", True
    )


def test_a_full_request_reports_the_first_bad_field():
    with pytest.raises(SpeechParamError) as caught:
        speech_request(SpeechBody(input="hi", voice="alloy", response_format="aiff"), OWN, voice_for())
    assert caught.value.param == "response_format"


# -- encoders -------------------------------------------------------------------------------


def test_the_streaming_wav_header_is_readable_and_of_unknown_length():
    header = streaming_wav_header(SAMPLE_RATE)
    assert len(header) == 44
    assert header[4:8] == header[40:44] == b"\xff\xff\xff\xff"
    pcm = b"".join(tone(0.5))
    with wave.open(io.BytesIO(header + pcm)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, SAMPLE_RATE)
        assert w.readframes(10**7) == pcm
    # The other major decoders read every sample too (docs/compatibility.md says why these sizes).
    samples, rate = soundfile.read(io.BytesIO(header + pcm), dtype="int16")
    assert rate == SAMPLE_RATE and samples.tobytes() == pcm
    with av.open(io.BytesIO(header + pcm)) as file:
        decoded = np.concatenate([f.to_ndarray().reshape(-1) for f in file.decode(audio=0)])
    assert decoded.astype("<i2").tobytes() == pcm


def test_pcm_passes_through():
    encoder = audio_format("pcm").encoder(SAMPLE_RATE)
    frames = tone(0.1)
    assert b"".join(encoder.encode(f) for f in frames) + encoder.finish() == b"".join(frames)


def test_wav_sends_its_header_once_and_first():
    encoder = audio_format("wav").encoder(SAMPLE_RATE)
    frames = tone(0.1)
    first = encoder.encode(frames[0])
    assert first == streaming_wav_header(SAMPLE_RATE) + frames[0]
    assert encoder.encode(frames[1]) == frames[1]
    assert encoder.finish() == b""


def test_wav_of_no_audio_is_still_a_file():
    assert audio_format("wav").encoder(SAMPLE_RATE).finish() == streaming_wav_header(SAMPLE_RATE)


def decoded_seconds(data: bytes) -> tuple[float, int]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return samples / stream.rate, stream.channels


@pytest.mark.parametrize("name", ["mp3", "opus", "aac", "flac"])
def test_compressed_formats_stream_and_decode(name):
    encoder = audio_format(name).encoder(SAMPLE_RATE)
    outputs = [encoder.encode(frame) for frame in tone(2.0)]
    tail = encoder.finish()
    # Bytes leave while audio keeps coming, not only when the stream is finished.
    first = next(i for i, out in enumerate(outputs) if out)
    assert first < 15
    assert sum(1 for out in outputs if out) > 5
    seconds, channels = decoded_seconds(b"".join(outputs) + tail)
    assert channels == 1
    # Codecs add priming and padding (up to ~0.1 s) but no more.
    assert 2.0 <= seconds <= 2.15


def test_compressed_audio_keeps_the_tone():
    encoder = audio_format("mp3").encoder(SAMPLE_RATE)
    data = b"".join(encoder.encode(frame) for frame in tone(1.0)) + encoder.finish()
    with av.open(io.BytesIO(data)) as container:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.fft.rfftfreq(len(audio), 1 / SAMPLE_RATE)[spectrum.argmax()] == pytest.approx(440, abs=3)


# -- events and errors ----------------------------------------------------------------------


def parse_sse(data: bytes) -> dict:
    assert data.startswith(b"data: ") and data.endswith(b"\n\n")
    return json.loads(data[6:-2])


def test_audio_delta_events_carry_base64_audio():
    event = parse_sse(audio_delta(b"\x00\x01\xff"))
    assert event == {"type": "speech.audio.delta", "audio": base64.b64encode(b"\x00\x01\xff").decode()}


def test_the_done_event_carries_openais_usage_fields():
    assert parse_sse(audio_done()) == {
        "type": "speech.audio.done",
        "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
    }


def test_error_payloads_have_openais_fields_and_voxflows_statuses():
    assert error_payload(SpeechParamError("bad voice", "voice")) == (
        400, {"error": {"code": "invalid_request", "message": "bad voice", "type": "invalid_request_error", "param": "voice"}}
    )
    status, body = error_payload(Unauthorized("no key"))
    assert (status, body["error"]["code"], body["error"]["param"]) == (401, "unauthorized", None)
    assert error_payload(LimitExceeded("too big"))[0] == 413
    status, body = error_payload(VoxflowError("shutting down", code="draining"))
    assert (status, body["error"]["type"]) == (503, "server_error")
