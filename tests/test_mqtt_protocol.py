"""The MQTT and Hermes payloads, without a broker."""

from __future__ import annotations

import io
import json
import wave

import pytest

from voxflow.transports.protocols import hermes_protocol as hermes
from voxflow.wav import wav_file
from voxflow.transports.protocols.mqtt_protocol import (
    SAY,
    START,
    TEXT,
    END,
    CANCEL,
    AudioBatcher,
    AudioFormat,
    BrokerAddress,
    Done,
    MqttProtocolError,
    RequestLimits,
    Say,
    StreamText,
    Topics,
    encode_event,
    pack_audio,
    parse_request,
    unpack_audio,
)

LIMITS = RequestLimits(max_text_chars=100, voices={"joe"})


def _parse(kind: str, body: object) -> object:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request("dev", kind, payload, LIMITS, lambda: "generated")


def test_topics_under_a_prefix() -> None:
    topics = Topics("home/tts")
    assert topics.parse("home/tts/kitchen/say") == ("kitchen", SAY)
    assert topics.parse("home/tts/kitchen/stream/text") == ("kitchen", TEXT)
    assert topics.parse("home/tts/kitchen/audio/x") is None
    assert topics.parse("other/kitchen/say") is None
    assert topics.audio("kitchen", "r1") == "home/tts/kitchen/audio/r1"
    # Shared: new requests go to one worker; what follows a request goes to every worker.
    assert topics.request_filters("g") == (
        "$share/g/home/tts/+/say", "$share/g/home/tts/+/stream/start",
        "home/tts/+/stream/text", "home/tts/+/stream/end", "home/tts/+/cancel",
    )
    assert topics.request_filters("") == tuple(f"home/tts/+/{kind}" for kind in (SAY, START, TEXT, END, CANCEL))
    with pytest.raises(ValueError):
        Topics("bad/+/prefix")


def test_say_parses_with_defaults_and_a_generated_id() -> None:
    say = _parse(SAY, {"text": "Hi.", "style": {"preset": "calm", "speed": 1.2}, "sample_rate": 16000, "voice": "joe"})
    assert isinstance(say, Say)
    assert (say.id, say.voice, say.sample_rate, say.style.speed) == ("generated", "joe", 16000, 1.2)


def test_stream_ids_are_required() -> None:
    with pytest.raises(MqttProtocolError) as err:
        _parse(START, {})
    assert err.value.code == "invalid_request"
    text = _parse(TEXT, {"id": "c", "text": "to", "end": True})
    assert text == StreamText("dev", "c", "to", False, True)


@pytest.mark.parametrize(
    ("kind", "payload", "code"),
    [
        (SAY, b"\xff\xfe", "invalid_json"),
        (SAY, b'{"text": "\\ud800"}', "invalid_json"),
        (TEXT, b'{"id": "c", "text": "a\\udc00b"}', "invalid_json"),
        (CANCEL, b'{"id": "\\ud83d"}', "invalid_json"),
        (SAY, b'{"text": "a", "n": NaN}', "invalid_json"),
        (END, b'{"id": 7}', "invalid_request"),
        (START, {"id": "c", "voice": 3}, "invalid_request"),
        (SAY, b"nope", "invalid_json"),
        (SAY, b"[]", "invalid_json"),
        (SAY, {"text": 1}, "invalid_request"),
        (SAY, {"text": "  "}, "invalid_request"),
        (SAY, {"text": "a" * 101}, "limit_exceeded"),
        (SAY, b"{" + b" " * 10_000 + b"}", "limit_exceeded"),
        (SAY, {"text": "a", "voice": "amy"}, "unknown_voice"),
        (SAY, {"text": "a", "style": "angry"}, "invalid_request"),
        (SAY, {"text": "a", "style": {"speed": "fast"}}, "invalid_request"),
        (SAY, {"text": "a", "sample_rate": 16000.0}, "invalid_request"),
        (SAY, {"text": "a", "id": "a/b"}, "invalid_request"),
        (TEXT, {"id": "c", "text": "a", "flush": 1}, "invalid_request"),
    ],
)
def test_bad_requests_raise_typed_errors(kind: str, payload: object, code: str) -> None:
    with pytest.raises(MqttProtocolError) as err:
        _parse(kind, payload)
    assert err.value.code == code


@pytest.mark.parametrize(
    ("topic", "allowed"),
    [
        ("home/tts/replies/me", True),
        ("home/tts/kitchen/audio/mine", True),
        ("home/tts/kitchen/say/replies", True),  # not a request topic: nobody reads it as one
        ("replies/me", False),
        ("home/ttsx/replies", False),
        ("home/tts", False),
        ("home/tts/status", False),
        ("home/tts/kitchen/say", False),
        ("home/tts/kitchen/stream/text", False),
        ("home/tts/+/event", False),
        ("home/tts/#", False),
        ("home/tts//x", False),
    ],
)
def test_response_topics_stay_under_the_prefix(topic: str, allowed: bool) -> None:
    topics = Topics("home/tts")
    if allowed:
        topics.check_response_topic(topic)
    else:
        with pytest.raises(MqttProtocolError) as err:
            topics.check_response_topic(topic)
        assert err.value.code == "invalid_request"


def test_errors_carry_the_request_id_when_readable() -> None:
    with pytest.raises(MqttProtocolError) as err:
        _parse(SAY, {"text": "a", "id": "r9", "voice": "amy"})
    assert err.value.request_id == "r9"


def test_audio_round_trip() -> None:
    first = unpack_audio(pack_audio(0, b"\x01\x00", format=AudioFormat(24000)))
    assert (first.seq, first.first, first.last, first.format, first.pcm) == (0, True, False, AudioFormat(24000), b"\x01\x00")
    last = unpack_audio(pack_audio(7, b"", last=True))
    assert (last.seq, last.first, last.last, last.format, last.pcm) == (7, False, True, None, b"")
    with pytest.raises(ValueError):
        unpack_audio(b"\x02" + bytes(7))


def test_batcher_sends_the_first_frame_alone_then_groups_to_200_ms() -> None:
    rate, frame = 16000, bytes(640)  # 20 ms
    batcher = AudioBatcher()
    out = [m for _ in range(25) for m in batcher.add(frame, rate)]
    out.append(batcher.finish(rate))
    messages = [unpack_audio(m) for m in out]
    assert [len(m.pcm) for m in messages] == [640, 6400, 6400, 640 * 4]
    assert [m.seq for m in messages] == [0, 1, 2, 3]
    assert messages[0].first and messages[-1].last and batcher.samples == 25 * 320


def test_batcher_finish_without_audio_is_first_and_last() -> None:
    only = unpack_audio(AudioBatcher().finish(22050))
    assert only.first and only.last and only.format == AudioFormat(22050) and only.pcm == b""
    cancelled = AudioBatcher()
    cancelled.add(bytes(640), 16000)
    cancelled.add(bytes(640), 16000)
    assert unpack_audio(cancelled.finish(16000, keep_audio=False)).pcm == b""


def test_events_are_json_with_a_type() -> None:
    assert json.loads(encode_event(Done("r", 1.5))) == {"type": "done", "id": "r", "audio_seconds": 1.5}


def test_broker_urls() -> None:
    assert BrokerAddress.parse("mqtt://127.0.0.1:1999") == BrokerAddress("127.0.0.1", 1999)
    assert BrokerAddress.parse("mqtts://u:p%40@host") == BrokerAddress("host", 8883, True, "u", "p@")
    with pytest.raises(ValueError):
        BrokerAddress.parse("http://host")


def test_hermes_say_and_replies() -> None:
    say = hermes.parse_say(json.dumps({"text": "Hi", "siteId": "s", "id": "i", "sessionId": "x", "volume": 0.5}).encode(), 100)
    assert (say.site_id, say.id, say.session_id, say.volume) == ("s", "i", "x", 0.5)
    assert hermes.parse_say(b'{"text": "Hi"}', 100).site_id == "default"
    assert json.loads(hermes.say_finished(say)) == {"id": "i", "siteId": "s", "sessionId": "x"}
    assert hermes.play_bytes_topic("s", "i") == "hermes/audioServer/s/playBytes/i"
    error = json.loads(hermes.error_payload("boom", "s", "x", "Hi"))
    assert error == {"error": "boom", "context": "Hi", "siteId": "s", "sessionId": "x"}
    with wave.open(io.BytesIO(wav_file(bytes(100), 22050))) as w:
        assert (w.getframerate(), w.getnframes()) == (22050, 50)


@pytest.mark.parametrize(
    ("payload", "code", "site"),
    [
        (b"nope", "invalid_json", "default"),
        (b'{"text": "\\ud800", "siteId": "s"}', "invalid_json", "default"),
        (b"\xff", "invalid_json", "default"),
        (b"{" + b" " * 30_000 + b"}", "limit_exceeded", "default"),
        (b'{"text": "", "siteId": "s"}', "invalid_request", "s"),
        (b'{"text": "aaaa", "siteId": "s"}', "limit_exceeded", "s"),
        (b'{"text": "a", "siteId": "a/b"}', "invalid_request", "default"),
        (b'{"text": "a", "volume": 9}', "invalid_request", "default"),
        (b'{"text": "a", "siteId": "s", "sessionId": 5}', "invalid_request", "s"),
        (b'{"text": "a", "siteId": "s", "lang": ["en"]}', "invalid_request", "s"),
    ],
)
def test_hermes_bad_says(payload: bytes, code: str, site: str) -> None:
    with pytest.raises(hermes.HermesError) as err:
        hermes.parse_say(payload, 3)
    assert (err.value.code, err.value.site_id) == (code, site)
