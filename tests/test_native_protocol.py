"""The voxflow.v1 protocol core, without sockets: messages, JSON, errors, the audio header."""

from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxflow.agent.events import (
    EVENT_TYPES,
    AgentError,
    BotStarted,
    BotStopped,
    Interrupted,
    ReplyEvent,
    SpeechStarted,
    SpeechStopped,
    TranscriptEvent,
    TurnMetrics,
    event_from_dict,
    event_to_dict,
)
from voxflow.streaming.framing import FRAME_MS_CHOICES, OUTPUT_RATES
from voxflow.transports.protocols.native_protocol import (
    AGENT_FRAME_MS,
    FRAME_MS,
    HEADER_SIZE,
    LISTEN_RATES,
    MAX_MICROPHONE_CHUNK_SECONDS,
    PROTOCOL,
    SAMPLE_RATES,
    AgentMessage,
    AudioPacket,
    Cancel,
    Cancelled,
    Done,
    End,
    Error,
    Flush,
    Limits,
    Listen,
    Listening,
    Metrics,
    MicrophoneAudio,
    Ping,
    Pong,
    ProtocolError,
    Ready,
    Start,
    Started,
    StopListening,
    StyleSpec,
    Text,
    Word,
    pack_audio,
    parse_client,
    parse_server,
    serialize_client,
    serialize_server,
    unpack_audio,
)
from voxflow.voices.styles import PRESETS, Style

CLIENT_MESSAGES = [
    Start("c1"),
    Start(
        "ctx-2", voice="en_US-joe-medium", style="happy", speaker=0, seed=2**64 - 1,
        sample_rate=24000, encoding="pcm_s16le", frame_ms=40,
    ),
    Start("s", style=StyleSpec(preset="calm", speed=1.5, expressiveness=0.0, volume=2.0)),
    Start("s", style=StyleSpec(speed=0.5), speaker="alice", sample_rate=8000, frame_ms=100),
    Text("c1", "Hello, wor"),
    Text("c1", ""),
    Text("ü" * 32, "naïve café — 你好 🎉"),
    Flush("c1"),
    End("c1"),
    Cancel("c1"),
    Ping(),
    Ping("abc"),
    Ping(7),
    Ping(0.25),
    Listen(),
    Listen(sample_rate=8000, encoding="pcm_s16le", output_sample_rate=48000, voice="en_US-joe-medium", style="calm"),
    StopListening(),
]

AGENT_EVENTS = [
    SpeechStarted(1.3, 1, 1.02),
    SpeechStopped(2.8, 1, 2.19),
    SpeechStopped(31.0, 2, 30.5, forced=True),
    TranscriptEvent(2.8125, 1, "turn on the lights"),
    TranscriptEvent(2.8, 3, ""),
    ReplyEvent(2.9, 1, "Turning them on."),
    ReplyEvent(2.9, 1, "Turn", error="llm_timeout"),
    BotStarted(2.96, 1),
    BotStopped(4.1, 1, "done", "Turning them on."),
    BotStopped(4.1, 1, "interrupted", ""),
    Interrupted(5.0, 1, 2, "Turning", 61.5),
    TurnMetrics(2.96, 1, 600.0, 12.0, 0.0, 147.0, 759.0),
    TurnMetrics(3.5, 2, 600.0, None, None, None, None),
    AgentError(1.0, "asr_error", "pocketsphinx failed", 1),
    AgentError(0.5, "internal_error", "tts failed"),
]

SERVER_MESSAGES = [
    Ready(("en_US-joe-medium", "other"), "en_US-joe-medium", Limits(8, 10_000, 100_000)),
    Ready((), "v", Limits(1, 1, 1), protocol="voxflow.v2"),
    Started("c1", "en_US-joe-medium", 24000, "pcm_s16le", 20),
    Word("c1", "Hello", 0.0348, 0.2902),
    Word("c1", "naïve", 1.0, 2.0),
    Metrics("c1", 31.5, 0.06, 3.44),
    Metrics("c1", None, None, 0.0),
    Done("c1"),
    Cancelled("c1"),
    Error("c1", "unknown_voice", "unknown voice 'x'"),
    Error(None, "invalid_json", "not valid JSON"),
    Pong(),
    Pong("abc"),
    Pong(3),
    Listening(16000, 24000, 20, "en_US-joe-medium"),
    *(AgentMessage(event) for event in AGENT_EVENTS),
]


def error_of(data: str | bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_client(data)
    return info.value


def start_json(**fields) -> str:
    return json.dumps({"type": "start", "context": "c", **fields})


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("msg", CLIENT_MESSAGES, ids=repr)
def test_client_messages_round_trip(msg):
    text = serialize_client(msg)
    assert json.loads(text)["type"] == msg.type
    assert parse_client(text) == msg


@pytest.mark.parametrize("msg", SERVER_MESSAGES, ids=repr)
def test_server_messages_round_trip(msg):
    text = serialize_server(msg)
    assert json.loads(text)["type"] == msg.type
    assert parse_server(text) == msg


def test_wire_shapes_follow_the_spec():
    assert json.loads(serialize_server(Error(None, "invalid_json", "m"))) == {
        "type": "error", "context": None, "code": "invalid_json", "message": "m",
    }
    assert json.loads(serialize_server(SERVER_MESSAGES[0])) == {
        "type": "ready", "protocol": PROTOCOL, "voices": ["en_US-joe-medium", "other"],
        "default_voice": "en_US-joe-medium",
        "limits": {"max_contexts": 8, "max_message_chars": 10_000, "max_context_chars": 100_000},
    }
    # Optional fields left unset are not sent at all.
    assert json.loads(serialize_client(Start("c"))) == {"type": "start", "context": "c", "encoding": "pcm_s16le", "frame_ms": 20}
    assert json.loads(serialize_client(Ping())) == {"type": "ping"}
    assert json.loads(serialize_client(Start("c", style=StyleSpec(speed=2))))["style"] == {"speed": 2}


def test_non_ascii_text_is_not_escaped():
    # Escapes would count 6 characters per character against max_message_chars.
    assert serialize_client(Text("c", "你好")) == '{"type":"text","context":"c","text":"你好"}'


def test_unknown_fields_are_ignored_and_null_means_omitted():
    assert parse_client('{"type":"flush","context":"c","future":{"x":[1,2]}}') == Flush("c")
    assert parse_client(start_json(voice=None, style=None, seed=None, sample_rate=None, encoding=None, frame_ms=None)) == Start("c")
    assert parse_client('{"type":"ping","context":"ignored"}') == Ping()
    assert parse_server('{"type":"done","context":"c","extra":1}') == Done("c")


def test_numbers_are_converted_to_the_field_types():
    assert parse_server('{"type":"word","context":"c","word":"a","start":0,"end":1}') == Word("c", "a", 0.0, 1.0)
    start = parse_client(start_json(style={"speed": 2}))
    assert start.style == StyleSpec(speed=2.0)


def test_protocol_constants_match_the_engine():
    assert SAMPLE_RATES == OUTPUT_RATES
    assert FRAME_MS == FRAME_MS_CHOICES


def test_conversation_constants_match_the_agent():
    from voxflow.agent.agent import MAX_CHUNK_SECONDS, OUTPUT_FRAME_MS
    from voxflow.agent.vad import INPUT_RATES

    assert LISTEN_RATES == INPUT_RATES
    assert MAX_MICROPHONE_CHUNK_SECONDS == MAX_CHUNK_SECONDS
    assert AGENT_FRAME_MS == OUTPUT_FRAME_MS


# -- conversation mode ------------------------------------------------------------------------


def test_agent_events_travel_in_their_events_file_form():
    for event in AGENT_EVENTS:
        assert json.loads(serialize_server(AgentMessage(event))) == {"type": "agent", "event": event_to_dict(event)}
    # Every field, defaults included, and times to 0.1 ms.
    wire = json.loads(serialize_server(AgentMessage(SpeechStopped(1.234567, 1, 0.98765))))
    assert wire["event"] == {"type": "speech_stopped", "t": 1.2346, "turn": 1, "speech_end": 0.9877, "forced": False}
    assert json.loads(serialize_client(Listen())) == {
        "type": "listen", "sample_rate": 16000, "encoding": "pcm_s16le", "output_sample_rate": 24000,
    }
    assert json.loads(serialize_client(StopListening())) == {"type": "stop_listening"}


def event_strategy(cls: type) -> st.SearchStrategy:
    floats = st.floats(min_value=-1e6, max_value=1e9, allow_nan=False)
    fields = {
        "t": floats, "turn": st.integers(0, 2**40), "speech_start": floats, "speech_end": floats, "forced": st.booleans(),
        "text": st.text(), "error": st.text(), "reason": st.sampled_from(["done", "interrupted"]), "spoken": st.text(),
        "by_turn": st.integers(0, 2**40), "stop_ms": floats, "end_of_turn_ms": floats, "code": st.text(), "message": st.text(),
        **{name: st.none() | floats for name in ("asr_ms", "llm_first_token_ms", "tts_first_audio_ms", "voice_to_voice_ms")},
    }
    if cls is AgentError:
        fields["turn"] = st.none() | st.integers(0, 2**40)
    names = [f.name for f in dataclasses.fields(cls)]
    return st.builds(cls, **{name: fields[name] for name in names})


@settings(max_examples=500, deadline=None)
@given(st.one_of(*(event_strategy(cls) for cls in EVENT_TYPES.values())))
def test_agent_messages_round_trip(event):
    wire = serialize_server(AgentMessage(event))
    parsed = parse_server(wire)
    assert parsed == AgentMessage(event_from_dict(event_to_dict(event)))  # as rounded on the way out
    assert serialize_server(parsed) == wire


@pytest.mark.parametrize(
    "event",
    [
        None, 5, [], {}, {"type": "nope", "t": 1}, {"type": "reply"}, {"type": "bot_started", "t": 1},
        {"type": "bot_started", "t": "1", "turn": 1}, {"type": "bot_started", "t": 1, "turn": 1.5},
        {"type": "bot_stopped", "t": 1, "turn": 1, "reason": "bored", "spoken": ""},
        {"type": "speech_stopped", "t": 1, "turn": 1, "speech_end": 1, "forced": 0},
        {"type": "turn_metrics", "t": 1, "turn": 1, "end_of_turn_ms": None},
    ],
)
def test_agent_messages_with_a_bad_event_are_refused(event):
    with pytest.raises(ProtocolError) as info:
        parse_server(json.dumps({"type": "agent", "event": event}))
    assert info.value.code == "invalid_request"


@pytest.mark.parametrize(
    "data",
    [
        '{"type":"listen","sample_rate":11025}',
        '{"type":"listen","sample_rate":"16000"}',
        '{"type":"listen","sample_rate":16000.0}',
        '{"type":"listen","output_sample_rate":11025}',
        '{"type":"listen","output_sample_rate":true}',
        '{"type":"listen","encoding":"opus"}',
        '{"type":"listen","voice":7}',
        '{"type":"listen","style":"furious"}',
        '{"type":"listen","style":{"preset":"calm"}}',
    ],
)
def test_invalid_listen(data):
    err = error_of(data)
    assert (err.code, err.context) == ("invalid_request", None)


@pytest.mark.parametrize("rate", LISTEN_RATES)
def test_microphone_audio_while_listening(rate):
    most = bytes(2 * rate)  # one second
    assert parse_client(most, audio_rate=rate) == MicrophoneAudio(most)
    assert parse_client(memoryview(b"\x01\x02"), audio_rate=rate) == MicrophoneAudio(b"\x01\x02")
    assert parse_client(b"", audio_rate=rate) == MicrophoneAudio(b"")
    for bad in (b"\x01", most + b"\x00\x00", most + b"\x00"):
        with pytest.raises(ProtocolError) as info:
            parse_client(bad, audio_rate=rate)
        assert (info.value.code, info.value.context) == ("invalid_audio", None)
    # Text frames are still JSON messages while listening.
    assert parse_client(serialize_client(StopListening()), audio_rate=rate) == StopListening()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=20_000), st.sampled_from(LISTEN_RATES))
def test_microphone_audio_round_trips_or_is_invalid_audio(data, rate):
    try:
        msg = parse_client(data, audio_rate=rate)
    except ProtocolError as exc:
        assert exc.code == "invalid_audio"
        assert len(data) % 2 or len(data) > 2 * rate
    else:
        assert serialize_client(msg) == data
        assert parse_client(serialize_client(msg), audio_rate=rate) == msg


# -- styles -----------------------------------------------------------------------------------


def test_resolved_style():
    assert Start("c").resolved_style() == Style()
    assert parse_client(start_json(style="sad")).resolved_style() == PRESETS["sad"]
    style = parse_client(start_json(style={"preset": "happy", "volume": 0.5})).resolved_style()
    assert style == Style(speed=PRESETS["happy"].speed, expressiveness=PRESETS["happy"].expressiveness, volume=0.5)


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    ["", "{", "not json", "[]", '"text"', "42", "null", "NaN", '{"type":"ping","id":Infinity}', "[" * 100_000, '{"a":' + "9" * 5000 + "}"],
)
def test_invalid_json(data):
    err = error_of(data)
    assert err.code == "invalid_json"
    assert err.context is None


@pytest.mark.parametrize("data", [b"", b'{"type":"ping"}', b"\xff\xfe\x00", bytearray(b"abc")])
def test_binary_not_expected(data):
    assert error_of(data).code == "binary_not_expected"


@pytest.mark.parametrize(
    "data, context",
    [
        ("{}", None),
        ('{"type":"speak","context":"c"}', "c"),
        ('{"type":5,"context":"c"}', "c"),
        ('{"type":null}', None),
        ('{"type":"START","context":"c"}', "c"),
        ('{"type":"ready","context":"c"}', "c"),  # a server message is no client message
        ('{"type":"nope","context":""}', None),
    ],
)
def test_unknown_type_carries_the_context_when_valid(data, context):
    err = error_of(data)
    assert err.code == "unknown_type"
    assert err.context == context


@pytest.mark.parametrize(
    "data",
    [
        start_json(sample_rate=12345),
        start_json(sample_rate=24000.0),
        start_json(sample_rate="24000"),
        start_json(sample_rate=True),
        start_json(encoding="mp3"),
        start_json(encoding=1),
        start_json(frame_ms=30),
        start_json(frame_ms=20.5),
        start_json(style="angry"),
        start_json(style=3),
        start_json(style=["happy"]),
        start_json(style={"speed": 3.0}),
        start_json(style={"volume": -0.1}),
        start_json(style={"expressiveness": "high"}),
        start_json(style={"preset": "nope"}),
        start_json(seed=-1),
        start_json(seed=2**64),
        start_json(seed=1.5),
        start_json(seed=False),
        start_json(speaker=-1),
        start_json(speaker=1.0),
        start_json(voice=3),
        '{"type":"text","context":"c"}',
        '{"type":"text","context":"c","text":5}',
        '{"type":"text","context":"c","text":["a"]}',
        '{"type":"text","context":"c","text":"\\ud800"}',
    ],
)
def test_invalid_request_names_the_context(data):
    err = error_of(data)
    assert err.code == "invalid_request"
    assert err.context == "c"


@pytest.mark.parametrize(
    "context",
    ["", "x" * 65, "é" * 33, "🎉" * 17, 5, None, ["c"], {"c": 1}, "\ud800"],
)
@pytest.mark.parametrize("kind", ["start", "text", "flush", "end", "cancel"])
def test_invalid_context(kind, context):
    data = json.dumps({"type": kind, "context": context, "text": "t"})
    err = error_of(data)
    assert err.code == "invalid_request"
    assert err.context is None


@pytest.mark.parametrize("context", ["x", "x" * 64, "é" * 32, "🎉" * 16, "a b/c:d"])
def test_context_limits_are_in_utf8_bytes(context):
    assert parse_client(json.dumps({"type": "end", "context": context})) == End(context)


def test_ping_id_must_be_a_string_or_number():
    for value in ("{}", "[1]", "true"):
        assert error_of('{"type":"ping","id":%s}' % value).code == "invalid_request"


def test_constructing_an_invalid_message_raises():
    with pytest.raises(ProtocolError) as info:
        Start("c", sample_rate=11025)
    assert (info.value.code, info.value.context) == ("invalid_request", "c")
    with pytest.raises(ProtocolError):
        Text("x" * 65, "hi")
    with pytest.raises(ProtocolError):
        Start("c", seed=-5)


@pytest.mark.parametrize(
    "data, code",
    [
        ("{", "invalid_json"),
        ('{"type":"hello"}', "unknown_type"),
        ('{"type":"start","context":"c"}', "unknown_type"),
        ('{"type":"started","context":"c","voice":"v","sample_rate":"x","encoding":"pcm_s16le","frame_ms":20}', "invalid_request"),
        ('{"type":"word","context":"c","word":"a","start":0}', "invalid_request"),
        ('{"type":"error","context":null,"message":"m"}', "invalid_request"),
        ('{"type":"ready","voices":"v","default_voice":"v","limits":{}}', "invalid_request"),
        ('{"type":"ready","voices":["v"],"default_voice":"v","limits":{"max_contexts":1}}', "invalid_request"),
        ('{"type":"metrics","context":"c","first_audio_ms":"1","rtf":null,"audio_seconds":1}', "invalid_request"),
    ],
)
def test_parse_server_errors(data, code):
    with pytest.raises(ProtocolError) as info:
        parse_server(data)
    assert info.value.code == code


# -- audio frames -----------------------------------------------------------------------------


def test_audio_header_layout():
    pcm = struct.pack("<3h", 1, -2, 32767)
    data = pack_audio("ctx", 258, 1.5, pcm)
    assert data[:HEADER_SIZE] == bytes([1, 3, 0, 0]) + (258).to_bytes(4, "little") + (1_500_000).to_bytes(8, "little")
    assert data[HEADER_SIZE:] == b"ctx" + pcm
    packet = parse_server(data)
    assert packet == AudioPacket("ctx", 258, 1_500_000, pcm)
    assert packet.pts == 1.5


def test_pts_is_rounded_to_microseconds():
    assert unpack_audio(pack_audio("c", 0, 0.02 * 3, b"")).pts_us == 60_000
    assert unpack_audio(pack_audio("c", 0, 1e-7, b"")).pts_us == 0


@settings(max_examples=300, deadline=None)
@given(
    context=st.text(min_size=1, max_size=64).filter(lambda s: len(s.encode("utf-8")) <= 64),
    seq=st.integers(0, 2**32 - 1),
    pts_us=st.integers(0, 10**12),  # 11.5 days; seconds as a float keep every microsecond that far
    pcm=st.binary(max_size=4000).map(lambda b: b[: len(b) // 2 * 2]),
)
def test_audio_round_trip(context, seq, pts_us, pcm):
    packet = unpack_audio(pack_audio(context, seq, pts_us / 1_000_000, pcm))
    assert packet == AudioPacket(context, seq, pts_us, pcm)
    assert unpack_audio(memoryview(pack_audio(context, seq, pts_us / 1_000_000, pcm))) == packet


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes(HEADER_SIZE - 1),
        bytes([2, 1, 0, 0]) + bytes(12) + b"c",  # version 2
        bytes([1, 0, 0, 0]) + bytes(12),  # empty context
        bytes([1, 65, 0, 0]) + bytes(12) + b"c" * 65,  # context too long
        bytes([1, 5, 0, 0]) + bytes(12) + b"abc",  # context past the end
        bytes([1, 2, 0, 0]) + bytes(12) + b"\xff\xfe",  # context not UTF-8
        bytes([1, 1, 0, 0]) + bytes(12) + b"c\x00",  # odd PCM16 length
    ],
)
def test_unpack_rejects_malformed_frames(data):
    with pytest.raises(ProtocolError) as info:
        unpack_audio(data)
    assert info.value.code == "invalid_request"


@pytest.mark.parametrize(
    "args",
    [("", 0, 0.0, b""), ("x" * 65, 0, 0.0, b""), ("c", -1, 0.0, b""), ("c", 2**32, 0.0, b""), ("c", 0, -0.1, b""), ("c", 0, 0.0, b"\x00")],
)
def test_pack_rejects_what_the_header_cannot_carry(args):
    with pytest.raises(ProtocolError):
        pack_audio(*args)


# -- robustness -------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(), st.binary()))
def test_arbitrary_frames_raise_only_protocol_errors(data):
    try:
        msg = parse_client(data)
    except ProtocolError as exc:
        assert exc.code in {"invalid_json", "binary_not_expected", "unknown_type", "invalid_request"}
    else:
        assert parse_client(serialize_client(msg)) == msg


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=70),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
message_fields = ["context", "text", "voice", "style", "speaker", "seed", "sample_rate", "encoding", "frame_ms", "id",
                  "preset", "speed", "word", "start", "end", "code", "message", "voices", "limits", "rtf",
                  "output_sample_rate", "event"]


@settings(max_examples=1000, deadline=None)
@given(
    kind=st.sampled_from(["start", "text", "flush", "end", "cancel", "ping", "ready", "started", "word", "metrics",
                          "done", "cancelled", "error", "pong", "listen", "stop_listening", "listening", "agent", "other"]),
    body=st.dictionaries(st.sampled_from(message_fields), json_values, max_size=6),
)
def test_message_shaped_input_raises_only_protocol_errors(kind, body):
    data = json.dumps({**body, "type": kind})
    for parse, serialize in ((parse_client, serialize_client), (parse_server, serialize_server)):
        try:
            msg = parse(data)
        except ProtocolError:
            continue
        assert parse(serialize(msg)) == msg


event_fields = ["t", "turn", "speech_start", "speech_end", "forced", "text", "error", "reason", "spoken", "by_turn",
                "stop_ms", "end_of_turn_ms", "asr_ms", "llm_first_token_ms", "tts_first_audio_ms", "voice_to_voice_ms",
                "code", "message"]


@settings(max_examples=1000, deadline=None)
@given(
    kind=st.sampled_from([*EVENT_TYPES, "other"]),
    body=st.dictionaries(st.sampled_from(event_fields), json_values | st.sampled_from(["done", "interrupted"]), max_size=8),
)
def test_event_shaped_input_raises_only_protocol_errors(kind, body):
    data = json.dumps({"type": "agent", "event": {**body, "type": kind}})
    try:
        msg = parse_server(data)
    except ProtocolError as exc:
        assert exc.code == "invalid_request"
    else:
        assert parse_server(serialize_server(msg)) == msg


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_binary_from_the_server_raises_only_protocol_errors(data):
    try:
        packet = parse_server(data)
    except ProtocolError as exc:
        assert exc.code == "invalid_request"
    else:
        n = data[1]
        assert packet.seq == int.from_bytes(data[4:8], "little")
        assert packet.pts_us == int.from_bytes(data[8:16], "little")
        assert packet.context.encode("utf-8") == data[16 : 16 + n]
        assert packet.pcm == data[16 + n :]


def test_the_client_direction_does_not_need_torch():
    code = (
        "import sys\n"
        "from voxflow.transports.protocols.native_protocol import *\n"
        "serialize_client(Start('c', style='happy', sample_rate=24000))\n"
        "parse_server(pack_audio('c', 0, 0.0, b''))\n"
        "parse_server(serialize_server(Done('c')))\n"
        "parse_server(serialize_server(Listening(16000, 24000, 20, 'v')))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("flags", [{}, {"flush": True}, {"end": True}, {"flush": True, "end": True}])
def test_text_flags_round_trip(flags):
    msg = Text(context="c", text="One moment, please.", **flags)
    assert parse_client(serialize_client(msg)) == msg


def test_text_flags_must_be_booleans():
    with pytest.raises(ProtocolError) as err:
        parse_client('{"type": "text", "context": "c", "text": "hi", "end": 1}')
    assert err.value.code == "invalid_request"
