"""The ElevenLabs wire protocol without a socket: parsing, server messages, alignment math."""

from __future__ import annotations

import base64
import io
import json
import typing

import av
import numpy as np

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxflow.transports.protocols.elevenlabs_protocol import (
    AudioPacker,
    ClientMessage,
    ElevenLabsError,
    VoiceSettings,
    WrittenWords,
    audio_message,
    ends_sentence,
    error_message,
    final_message,
    parse_message,
    parse_output_format,
    parse_query,
)
from livekit.plugins.elevenlabs.tts import _to_timed_words
from pipecat.services.elevenlabs.tts_base import _strip_utterance_leading_spaces, calculate_word_times
from voxflow.voices.styles import Style


def parse(body: object) -> ClientMessage:
    return parse_message(json.dumps(body))


# -- client messages --------------------------------------------------------------------------


def test_multi_stream_messages_as_pipecat_sends_them():
    # The dicts Pipecat's ElevenLabsTTSService builds (pipecat main, commit acead05).
    init = parse({"text": " ", "context_id": "c1", "voice_settings": {"stability": 0.4, "similarity_boost": 0.7, "speed": 1.1}})
    assert init == ClientMessage(text=" ", context_id="c1", voice_settings=VoiceSettings(stability=0.4, speed=1.1))
    assert parse({"text": "Hello there. ", "context_id": "c1"}) == ClientMessage(text="Hello there. ", context_id="c1")
    assert parse({"context_id": "c1", "flush": True}) == ClientMessage(context_id="c1", flush=True)
    assert parse({"context_id": "c1", "close_context": True}) == ClientMessage(context_id="c1", close_context=True)
    assert parse({"close_socket": True}) == ClientMessage(close_socket=True)
    # Keep-alives: empty text is kept apart from absent text, it means something on each endpoint.
    assert parse({"text": "", "context_id": "c1"}) == ClientMessage(text="", context_id="c1")
    assert parse({"text": ""}).text == ""
    assert parse({"context_id": "c1", "flush": True}).text is None


def test_stream_input_messages_as_elevenlabs_documents_them():
    init = parse({
        "text": " ",
        "voice_settings": {"stability": 0.5, "similarity_boost": 0.8, "use_speaker_boost": False},
        "generation_config": {"chunk_length_schedule": [120, 160, 250, 290]},
        "xi_api_key": "secret",
    })
    assert init == ClientMessage(text=" ", voice_settings=VoiceSettings(stability=0.5), api_key="secret")
    assert parse({"text": "Hello ", "try_trigger_generation": True, "flush": False}) == ClientMessage(text="Hello ")
    assert parse({"text": "Now. ", "flush": True}) == ClientMessage(text="Now. ", flush=True)


def test_alternative_spellings_and_nulls():
    assert parse({"text": " ", "xi-api-key": "k"}).api_key == "k"  # the spec's spelling
    assert parse({"text": " ", "authorization": "Bearer k2"}).api_key == "k2"
    assert parse({"text": " ", "authorization": "k3"}).api_key == "k3"
    assert parse({"text": "x", "contextId": "c9"}).context_id == "c9"
    # ElevenLabs' own SDK sends voice_settings: null when none are set.
    assert parse({"text": " ", "voice_settings": None, "flush": None, "context_id": None}) == ClientMessage(text=" ")
    assert parse_message(b'{"text": "bytes"}').text == "bytes"


@pytest.mark.parametrize(
    ("raw", "mentions"),
    [
        ("not json", "JSON object"),
        ("[1, 2]", "JSON object"),
        (b"\xff\xfe", "UTF-8"),
        ('{"text": 123}', "text must be a string"),
        ('{"text": "a", "flush": "yes"}', "flush must be true or false"),
        ('{"close_context": 1, "context_id": "c"}', "close_context must be true or false"),
        ('{"close_socket": "true"}', "close_socket must be true or false"),
        ('{"text": "a", "context_id": 5}', "context_id must be a string"),
        ('{"text": "a", "context_id": ""}', "context_id must have 1 to"),
        ('{"text": " ", "voice_settings": "fast"}', "voice_settings must be an object"),
        ('{"text": " ", "voice_settings": {"speed": "1.1"}}', "voice_settings.speed must be a finite number"),
        ('{"text": " ", "voice_settings": {"stability": true}}', "voice_settings.stability must be a finite number"),
        ('{"text": " ", "voice_settings": {"style": NaN}}', "NaN is not JSON"),
        ('{"text": "\\ud800"}', "lone surrogate"),
        ('{"text": " ", "xi_api_key": 5}', "xi_api_key must be a string"),
    ],
)
def test_malformed_messages_are_named(raw, mentions):
    with pytest.raises(ElevenLabsError) as caught:
        parse_message(raw)
    assert caught.value.code == "invalid_input_message"
    assert mentions in str(caught.value)


# -- query string -----------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 24000, 44100, 48000])
def test_pcm_output_formats(rate):
    assert parse_query({"output_format": f"pcm_{rate}"}).sample_rate == rate


def test_pipecat_query_string():
    # ?model_id=...&output_format=...&auto_mode=true (+ enable_logging), as Pipecat builds the URL.
    options = parse_query(
        {"model_id": "eleven_flash_v2_5", "output_format": "pcm_24000", "auto_mode": "true", "enable_logging": "false"}
    )
    assert (options.sample_rate, options.auto_mode, options.sync_alignment) == (24000, True, False)
    assert options.inactivity_timeout == 20


# ElevenLabs' output_format enum (elevenlabs SDK 2.78: TextToSpeechOutputFormatEnum and
# AllowedOutputFormats), every one of which voxflow must speak.
ELEVENLABS_FORMATS = (
    "alaw_8000 mp3_22050_32 mp3_24000_48 mp3_44100_128 mp3_44100_192 mp3_44100_32 mp3_44100_64 mp3_44100_96 "
    "opus_48000_128 opus_48000_192 opus_48000_32 opus_48000_64 opus_48000_96 pcm_16000 pcm_22050 pcm_24000 "
    "pcm_32000 pcm_44100 pcm_48000 pcm_8000 ulaw_8000"
).split()


def test_every_elevenlabs_output_format_is_known():
    from elevenlabs.types.non_streaming_output_formats import NonStreamingOutputFormats
    from elevenlabs.types.text_to_speech_output_format_enum import TextToSpeechOutputFormatEnum

    assert set(typing.get_args(typing.get_args(TextToSpeechOutputFormatEnum)[0])) <= set(ELEVENLABS_FORMATS)
    for name in typing.get_args(typing.get_args(NonStreamingOutputFormats)[0]):  # wav_8000 ... wav_48000
        assert parse_query({"output_format": name}).output_format.audio.media_type == "audio/wav"
    for name in ELEVENLABS_FORMATS:
        fmt = parse_query({"output_format": name}).output_format
        assert fmt.name == name and fmt.sample_rate == int(name.split("_")[1])


def decoded(name: str, pcm: bytes) -> np.ndarray:
    fmt = parse_output_format(name)
    encoder = fmt.audio.encoder(fmt.sample_rate)
    data = b"".join(encoder.encode(pcm[i : i + 640]) for i in range(0, len(pcm), 640)) + encoder.finish()
    if name.startswith("pcm"):
        return np.frombuffer(data, "<i2")
    container = {"ulaw": "mulaw", "alaw": "alaw"}.get(name[:4])
    options = {"sample_rate": str(fmt.sample_rate)} if container else {}
    with av.open(io.BytesIO(data), format=container, options=options) as file:
        return np.concatenate([f.to_ndarray().reshape(-1) for f in file.decode(audio=0)])


@pytest.mark.parametrize("name", ["pcm_8000", "ulaw_8000", "alaw_8000", "mp3_22050_32", "mp3_44100_128", "opus_48000_64"])
def test_encoded_formats_decode_to_the_same_sound(name):
    rate = parse_output_format(name).sample_rate
    t = np.arange(rate) / rate  # one second of a 440 Hz tone
    tone = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2")
    out = decoded(name, tone.tobytes()).astype(float)
    assert abs(len(out) - rate) <= rate // 10  # codec padding aside, the whole second
    # The tone survives the codec: its spectrum peaks at 440 Hz.
    spectrum = np.abs(np.fft.rfft(out[: rate // 2]))
    assert abs(np.argmax(spectrum) * 2 - 440) <= 4


@pytest.mark.parametrize("value", ["mp3_44100_100", "opus_24000_64", "wav_11025", "pcm_11025", "pcm_", "pcm_abc", "pcm_²"])
def test_other_output_formats_are_refused_clearly(value):
    with pytest.raises(ElevenLabsError) as caught:
        parse_query({"output_format": value})
    assert caught.value.code == "unsupported_output_format"
    assert "pcm_22050" in str(caught.value) and "ulaw_8000" in str(caught.value)


def test_a_missing_output_format_is_elevenlabs_default():
    assert parse_query({}).output_format.name == "mp3_44100_128"


def test_query_options():
    options = parse_query({
        "output_format": "pcm_16000", "inactivity_timeout": "180", "sync_alignment": "1", "seed": "4294967295",
        "authorization": "Bearer tok", "language_code": "en", "apply_text_normalization": "auto",
    })
    assert (options.inactivity_timeout, options.sync_alignment, options.auto_mode) == (180, True, False)
    assert (options.seed, options.api_key) == (4294967295, "tok")


@pytest.mark.parametrize(
    ("name", "value"),
    [("inactivity_timeout", "0"), ("inactivity_timeout", "181"), ("inactivity_timeout", "2.5"), ("inactivity_timeout", "²"),
     ("seed", "-1"), ("seed", "4294967296"), ("auto_mode", "maybe"), ("sync_alignment", "")],
)
def test_bad_query_values(name, value):
    with pytest.raises(ElevenLabsError, match=name):
        parse_query({"output_format": "pcm_16000", name: value})


# -- voice settings and auto mode -------------------------------------------------------------


def test_voice_settings_map_onto_a_style():
    assert VoiceSettings().to_style() == Style()
    assert VoiceSettings(stability=0.5, style=0.0, speed=1.0).to_style() == Style()
    assert VoiceSettings(speed=1.2).to_style().speed == pytest.approx(1.2)
    assert VoiceSettings(speed=0.1).to_style().speed == 0.5  # clamped to voxflow's range
    assert VoiceSettings(speed=9).to_style().speed == 2.0
    assert VoiceSettings(stability=1.0).to_style().expressiveness == pytest.approx(0.5)
    assert VoiceSettings(stability=0.0).to_style().expressiveness == pytest.approx(1.5)
    assert VoiceSettings(stability=0.0, style=1.0).to_style().expressiveness == 2.0
    assert VoiceSettings(stability=7.0).to_style().expressiveness == pytest.approx(0.5)


@given(st.floats(-10, 10), st.floats(-10, 10), st.floats(-10, 10))
def test_any_voice_settings_make_a_valid_style(stability, style, speed):
    VoiceSettings(stability=stability, style=style, speed=speed).to_style()  # Style validates its ranges


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Hello there. ", True), ("Really?", True), ('He said "stop!" ', True), ("(see above.)", True),
     ("Well, ", False), ("e", False), ("   ", False), ("", False), ("你好。", True)],
)
def test_ends_sentence(text, expected):
    assert ends_sentence(text) is expected


# -- server messages --------------------------------------------------------------------------


def one_chunk(words: list[tuple[str, float, float]], seconds: float, **packer_options):
    """All of a context's audio (16 kHz) taken at once."""
    packer = AudioPacker(16000, **packer_options)
    for word, start, end in words:
        packer.add_word(word, start, end)
    packer.add_audio(0.0, bytes(2 * round(seconds * 16000)))
    return packer.take(final=True)


def test_audio_message_fields():
    [chunk] = one_chunk([("Hi", 0.02, 0.1)], 0.15)
    multi = audio_message(chunk, "c1")
    assert set(multi) == {"audio", "isFinal", "normalizedAlignment", "alignment", "contextId"}
    assert base64.b64decode(multi["audio"]) == chunk.audio and multi["isFinal"] is False and multi["contextId"] == "c1"
    assert multi["alignment"] == {"chars": ["H", "i", " "], "charStartTimesMs": [20, 60, 100], "charDurationsMs": [40, 40, 50]}
    assert multi["normalizedAlignment"] == multi["alignment"]
    assert "contextId" not in audio_message(chunk)


def test_audio_without_characters_has_null_or_empty_alignment():
    [chunk] = one_chunk([], 0.1)
    assert audio_message(chunk)["alignment"] is None
    empty = {"chars": [], "charStartTimesMs": [], "charDurationsMs": []}
    assert audio_message(chunk, sync_alignment=True)["alignment"] == empty


def test_final_and_error_messages():
    assert final_message() == {"isFinal": True}
    assert final_message("c1") == {"isFinal": True, "contextId": "c1"}
    timeout = {"message": "no input", "error": "input_timeout_exceeded", "code": 1008}
    assert error_message("input_timeout_exceeded", "no input") == timeout
    assert error_message("internal_error", "boom", code=1011, context_id="c")["contextId"] == "c"


# -- alignment, as the clients rebuild word times from it ----------------------------------------


def pipecat_word_times(messages: list[dict]) -> list[tuple[str, int]]:
    """Word start times (ms from the context's first audio) as Pipecat 1.14's
    ElevenLabsTTSService rebuilds them: its own calculate_word_times and leading-space strip,
    and the clock of its _receive_messages, which advances on every message with alignment by
    the end of that message's last character."""
    clock, partial, partial_start, words = 0.0, "", 0.0, []
    keys = ("chars", "charStartTimesMs", "charDurationsMs")
    for i, message in enumerate(m for m in messages if m["alignment"]):
        alignment = _strip_utterance_leading_spaces(message["alignment"], keys, i == 0)
        found, partial, partial_start = calculate_word_times(alignment, clock, partial, partial_start)
        words += found
        if alignment["charStartTimesMs"]:
            clock += (alignment["charStartTimesMs"][-1] + alignment["charDurationsMs"][-1]) / 1000
    if partial:
        words.append((partial, partial_start))
    return [(w, round(t * 1000)) for w, t in words]


def livekit_word_times(messages: list[dict]) -> list[tuple[str, int]]:
    """Word start times (ms) as livekit-plugins-elevenlabs 1.8.9 rebuilds them: the characters
    of every message appended (its _accumulate_alignment) and cut into words by its own
    _to_timed_words, times taken as they are."""
    text, starts, durations = "", [], []
    for message in messages:
        alignment = message["normalizedAlignment"]
        if alignment and alignment["chars"]:
            text += "".join(alignment["chars"])
            starts += alignment["charStartTimesMs"]
            durations += alignment["charDurationsMs"]
    timed, _ = _to_timed_words(text, starts, durations, flush=True)
    return [(str(t).strip(), round(t.start_time * 1000)) for t in timed if str(t).strip()]


def duration_ms(chunk, rate: int) -> float:
    return chunk.samples / rate * 1000


def test_cuts_fall_on_word_starts_and_times_count_from_each_message():
    # Words of 120 ms every 150 ms: a burst of them is cut where words start, so every message
    # starts with a word at 0 ms and ends with a space reaching its end.
    words = [(f"w{i}", 0.15 * i, 0.15 * i + 0.12) for i in range(10)]
    chunks = one_chunk(words, 1.5)
    assert len(chunks) > 4
    for chunk in chunks:
        a = chunk.alignment
        assert a.chars[0] == "w" and a.start_ms[0] == 0 and a.chars[-1] == " "
        assert a.start_ms[-1] + a.duration_ms[-1] == round(duration_ms(chunk, 16000))
    assert pipecat_word_times([audio_message(c) for c in chunks]) == [(w, round(s * 1000)) for w, s, _ in words]


def test_with_context_times_they_count_from_the_first_audio():
    words = [(f"w{i}", 0.15 * i + 0.03, 0.15 * i + 0.12) for i in range(10)]
    chunks = one_chunk(words, 1.5, context_times=True)
    assert len(chunks) > 4
    messages = [audio_message(c, sync_alignment=True) for c in chunks]
    assert livekit_word_times(messages) == [(w, round(s * 1000)) for w, s, _ in words]


def test_a_message_stretches_to_reach_a_word_start():
    chunks = one_chunk([("extraordinarily", 0.0, 0.3), ("so", 0.32, 0.45), ("now", 0.6, 0.7)], 0.75)
    assert ["".join(c.alignment.chars) for c in chunks] == ["extraordinarily ", "so ", "now "]
    assert [duration_ms(c, 16000) for c in chunks] == [320, 280, 150]


def bursts(packer: AudioPacker, seconds: list[float], **message_options) -> list[dict]:
    """Audio arriving in bursts, each taken when it ends, then the end of the context."""
    messages = []
    for length in seconds:
        packer.add_audio(0.0, bytes(2 * round(length * 16000)))
        messages += [audio_message(c, **message_options) for c in packer.take()]
    return messages + [audio_message(c, **message_options) for c in packer.take(final=True)]


def test_every_message_carries_its_share_of_pipecats_clock():
    # The first audio goes out at once, mid-word; a long letter and a long pause each span a
    # message of their own. Each message's characters still reach its end.
    packer = AudioPacker(16000)
    packer.add_word("Hello", 0.035, 0.29)
    packer.add_word("Oh", 0.35, 1.0)  # 325 ms a letter
    packer.add_word("friend.", 1.6, 1.9)  # after a 600 ms pause
    messages = bursts(packer, [0.06, 0.16, 0.5, 0.15, 0.3, 0.33, 0.3, 0.4])
    assert messages[0]["alignment"]["chars"] == ["H"]
    for m in messages:
        a = m["alignment"]
        assert a and a["charStartTimesMs"][-1] + a["charDurationsMs"][-1] == round(len(base64.b64decode(m["audio"])) / 32)
    assert pipecat_word_times(messages) == [("Hello", 35), ("Oh", 350), ("friend.", 1600)]


def test_audio_before_the_first_word_waits_for_it_with_per_message_times():
    packer = AudioPacker(16000)
    packer.add_word("Late", 0.15, 0.4)
    packer.add_audio(0.0, bytes(2 * 1600))  # 100 ms, all before the word
    assert packer.take() == []
    packer.add_audio(0.0, bytes(2 * 3200))
    [first] = packer.take()
    assert first.samples == 4800 and first.alignment.chars[0] == "L" and first.alignment.start_ms[0] == 150
    # With times from the context's start nothing needs to wait.
    eager = AudioPacker(16000, context_times=True)
    eager.add_word("Late", 0.15, 0.4)
    eager.add_audio(0.0, bytes(2 * 1600))
    [early] = eager.take()
    assert early.samples == 1600 and early.alignment.chars == ()


@st.composite
def spoken(draw):
    rate = draw(st.sampled_from([16000, 22050, 24000]))
    words, t = [], draw(st.floats(0, 0.3))
    for _ in range(draw(st.integers(1, 8))):
        word = draw(st.text("abcxyz.,?'", min_size=1, max_size=8))
        length = draw(st.floats(0.01, 0.6))
        words.append((word, t, t + length))
        t += length + draw(st.sampled_from([0.0, 0.0, draw(st.floats(0, 0.5))]))
    frame = rate // 50
    frames = -(-round((t + draw(st.floats(0, 0.4))) * rate) // frame)
    takes = draw(st.sets(st.integers(0, frames - 1)))  # frames after which the loop was free
    return rate, words, frames, frame, takes, draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(spoken())
def test_alignment_invariants(case):
    rate, words, frames, frame, takes, context_times = case
    packer, chunks, pcm, pending = AudioPacker(rate, context_times=context_times), [], b"", list(words)
    for i in range(frames):
        # Words arrive before their audio, as the engine emits them.
        while pending and pending[0][1] < (i + 1) * frame / rate:
            packer.add_word(*pending.pop(0))
        data = bytes((i * 7 + k) % 251 for k in range(2 * frame))
        pcm += data
        packer.add_audio(i * frame / rate, data)
        if i in takes:
            chunks += packer.take()
    for word in pending:
        packer.add_word(*word)
    chunks += packer.take(final=True)

    assert b"".join(c.audio for c in chunks) == pcm
    spoken_text = "".join("".join(c.alignment.chars) for c in chunks)
    assert " ".join(spoken_text.split()) + " " == "".join(w + " " for w, _, _ in words)
    for chunk in chunks:
        a = chunk.alignment
        assert len(a.chars) == len(a.start_ms) == len(a.duration_ms)
        assert list(a.start_ms) == sorted(a.start_ms) and all(s >= 0 for s in a.start_ms)
        assert all(d >= 0 for d in a.duration_ms)
    messages = [audio_message(c, sync_alignment=context_times) for c in chunks]
    # Each client rebuilds every word at its start (to the ms: cuts fall on samples) from the
    # clock it is given, however the audio was cut.
    rebuilt = (livekit_word_times if context_times else pipecat_word_times)(messages)
    assert [w for w, _ in rebuilt] == [w for w, _, _ in words]
    assert all(abs(ms - s * 1000) <= 1 for (_, ms), (_, s, _) in zip(rebuilt, words))


# -- the client's own text in `alignment` -------------------------------------------------------


def test_written_words_keep_the_clients_markup():
    written = WrittenWords()
    written.feed("Sure, **this** is [a link](https://x.example/z) and 👍 done.")
    spoken = ["Sure,", "this", "is", "a", "link", "and", "done."]
    assert [written.match(w) for w in spoken] == ["Sure,", "**this**", "is", "[a", "link](https://x.example/z)", "and", "done."]


def test_written_words_arrive_in_pieces_and_repeat():
    written = WrittenWords()
    written.feed("the cat and the ")
    assert [written.match(w) for w in ("the", "cat", "and")] == ["the", "cat", "and"]
    written.feed("*dog*.")
    # The second "the" is the one after "and", not the first again.
    assert [written.match(w) for w in ("the", "dog")] == ["the", "*dog*."]
    assert written.match("missing") == "missing"


def test_a_word_far_ahead_is_not_taken_for_this_one():
    written = WrittenWords()
    written.feed("x " * 150 + "target")
    assert written.match("target") == "target"
    assert written.match("x") == "x"  # the text before was not consumed by the failed look


def test_alignment_carries_written_text_and_normalized_the_spoken():
    packer = AudioPacker(16000)
    packer.add_word("Hello", 0.02, 0.3, written="**Hello**")
    packer.add_word("there.", 0.35, 0.7)
    packer.add_audio(0.0, bytes(2 * round(0.75 * 16000)))
    messages = [audio_message(c) for c in packer.take(final=True)]
    assert "".join(c for m in messages for c in m["alignment"]["chars"]) == "**Hello** there. "
    assert "".join(c for m in messages for c in m["normalizedAlignment"]["chars"]) == "Hello there. "
    assert pipecat_word_times(messages) == [("**Hello**", 20), ("there.", 350)]
