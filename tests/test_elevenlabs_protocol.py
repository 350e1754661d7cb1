"""The ElevenLabs wire protocol without a socket: parsing, server messages, alignment math."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxflow.transports.protocols.elevenlabs_protocol import (
    MAX_MESSAGE_MS,
    AudioPacker,
    ClientMessage,
    ElevenLabsError,
    VoiceSettings,
    audio_message,
    ends_sentence,
    error_message,
    final_message,
    parse_message,
    parse_query,
)
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


@pytest.mark.parametrize("value", ["mp3_44100_128", "ulaw_8000", "opus_48000_64", "pcm_11025", "pcm_", "pcm_abc", "pcm_²"])
def test_other_output_formats_are_refused_clearly(value):
    with pytest.raises(ElevenLabsError) as caught:
        parse_query({"output_format": value})
    assert caught.value.code == "unsupported_output_format"
    assert "pcm_22050" in str(caught.value) and "PCM only" in str(caught.value)


def test_missing_output_format_is_refused_not_sent_as_mislabeled_pcm():
    with pytest.raises(ElevenLabsError) as caught:
        parse_query({})
    assert "mp3_44100_128" in str(caught.value) and "pcm_16000" in str(caught.value)


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


def one_chunk(words: list[tuple[str, float, float]], seconds: float):
    """All of a context's audio (16 kHz) taken at once."""
    packer = AudioPacker(16000)
    for word, start, end in words:
        packer.add_word(word, start, end)
    packer.add_audio(0.0, bytes(2 * round(seconds * 16000)))
    return packer.take(final=True)


def test_audio_message_fields():
    [chunk] = one_chunk([("Hi", 0.02, 0.1)], 0.15)
    multi = audio_message(chunk, "c1")
    assert set(multi) == {"audio", "isFinal", "normalizedAlignment", "alignment", "contextId"}
    assert base64.b64decode(multi["audio"]) == chunk.pcm and multi["isFinal"] is False and multi["contextId"] == "c1"
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


# -- alignment --------------------------------------------------------------------------------


def pipecat_word_times(messages: list[dict]) -> list[tuple[str, int]]:
    """Word start times (ms) the way Pipecat's ElevenLabsTTSService rebuilds them (pipecat main,
    commit acead05: calculate_word_times in tts_base.py, the clock in tts.py _receive_messages):
    words end at a space, a word's time is the clock plus its first character's start, and
    the clock advances by the end of a message's last character when the message completed a
    word. Leading spaces of a context's first alignment are dropped. Integer ms here."""
    clock, partial, partial_start, started, words = 0, "", 0, False, []
    for message in messages:
        alignment = message["alignment"] or message["normalizedAlignment"]
        if not alignment:
            continue
        chars, starts, durations = alignment["chars"], alignment["charStartTimesMs"], alignment["charDurationsMs"]
        if not started:
            while chars and chars[0] == " ":
                chars, starts, durations = chars[1:], starts[1:], durations[1:]
        started = True
        completed, current, current_start = [], partial, partial_start if partial else None
        for char, start in zip(chars, starts):
            if char == " ":
                if current:
                    completed.append((current, current_start))
                current, current_start = "", None
            else:
                if current_start is None:
                    current_start = clock + start
                current += char
        partial, partial_start = current, current_start or 0
        if completed:
            words += completed
            clock += starts[-1] + durations[-1]
    return words


def duration_ms(chunk, rate: int) -> float:
    return len(chunk.pcm) / 2 / rate * 1000


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


def test_a_message_stretches_to_reach_a_word_start():
    chunks = one_chunk([("extraordinarily", 0.0, 0.3), ("so", 0.32, 0.45), ("now", 0.6, 0.7)], 0.75)
    assert ["".join(c.alignment.chars) for c in chunks] == ["extraordinarily ", "so ", "now "]
    assert [duration_ms(c, 16000) for c in chunks] == [320, 280, 150]


def test_early_messages_inside_the_first_word_do_not_set_pipecat_behind():
    # The first audio goes out at once, mid-word; so does a pause. Pipecat's clock only moves
    # on messages completing a word, and the next message's times make up for it.
    packer = AudioPacker(16000)
    packer.add_word("Hello", 0.035, 0.29)
    packer.add_word("there,", 0.35, 0.62)
    packer.add_word("friend.", 0.96, 1.3)
    messages = []
    for seconds in (0.06, 0.16, 0.5, 0.15, 0.3, 0.33):  # bursts, each taken when it ends
        packer.add_audio(0.0, bytes(2 * round(seconds * 16000)))
        messages += [audio_message(c) for c in packer.take()]
    messages += [audio_message(c) for c in packer.take(final=True)]
    assert messages[0]["alignment"]["chars"] == ["H"]
    assert pipecat_word_times(messages) == [("Hello", 35), ("there,", 350), ("friend.", 960)]


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
    return rate, words, frames, frame, takes


@settings(max_examples=200, deadline=None)
@given(spoken())
def test_alignment_invariants(case):
    rate, words, frames, frame, takes = case
    packer, chunks, pcm, pending = AudioPacker(rate), [], b"", list(words)
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

    assert b"".join(c.pcm for c in chunks) == pcm
    assert "".join("".join(c.alignment.chars) for c in chunks) == "".join(w + " " for w, _, _ in words)
    for chunk in chunks:
        a = chunk.alignment
        assert len(a.chars) == len(a.start_ms) == len(a.duration_ms)
        assert list(a.start_ms) == sorted(a.start_ms) and all(s >= 0 for s in a.start_ms)
        assert all(d >= 0 for d in a.duration_ms)
        assert duration_ms(chunk, rate) <= 2 * MAX_MESSAGE_MS + 1e-6
    # Pipecat rebuilds every word at its start (to the ms, cuts fall on samples), however the
    # audio was cut.
    rebuilt = pipecat_word_times([audio_message(c) for c in chunks])
    assert [w for w, _ in rebuilt] == [w for w, _, _ in words]
    assert all(abs(ms - s * 1000) <= 1 for (_, ms), (_, s, _) in zip(rebuilt, words))
