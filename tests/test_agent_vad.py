"""VoiceActivity: PCM16 chunks of any size and rate in, exact 16 kHz VAD frames out."""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conversation_audio import compose, noise, speech, to_pcm16
from voxflow.agent.frames import VAD_RATE, VoiceFrame
from voxflow.agent.vad import INPUT_RATES, InvalidAudio, VoiceActivity, hangover_ms
from voxflow.errors import InvalidRequest

FRAME_BYTES = 960  # 30 ms at 16 kHz, PCM16


def frames_of(va: VoiceActivity, chunks) -> list[VoiceFrame]:
    return [frame for chunk in chunks for frame in va.process(chunk)]


def split(pcm: bytes, sizes) -> list[bytes]:
    """pcm cut into pieces of `sizes` bytes (0: an empty chunk), cycling through them."""
    pieces, at, i = [], 0, 0
    while at < len(pcm):
        size = sizes[i % len(sizes)]
        pieces.append(pcm[at:at + size])
        at += size
        i += 1
    return pieces


@cache
def _sample_call(engine, rate: int) -> bytes:
    call = compose(
        engine,
        [("silence", 0.4), ("say", "turn on the lights"), ("noise", 0.1), ("silence", 0.3)],
        rate=rate, noise_level=0.003, seed=3,
    )
    return to_pcm16(call.audio)


@pytest.mark.parametrize("rate", [0, 11025, 16001, 96000, -16000])
def test_unsupported_rate_is_refused_naming_the_allowed_ones(rate):
    with pytest.raises(InvalidAudio) as info:
        VoiceActivity(rate)
    assert info.value.code == "invalid_audio"
    assert isinstance(info.value, InvalidRequest)
    assert "8000" in info.value.message and "48000" in info.value.message


@pytest.mark.parametrize(
    "kwargs", [{"aggressiveness": -1}, {"aggressiveness": 4}, {"aggressiveness": 2.0}, {"frame_ms": 25}, {"frame_ms": 30.0}]
)
def test_bad_vad_settings_are_refused(kwargs):
    with pytest.raises(InvalidAudio):
        VoiceActivity(16000, **kwargs)


def test_hangover_is_longer_for_the_permissive_modes():
    assert hangover_ms(0) == hangover_ms(1) > hangover_ms(2) == hangover_ms(3) > 0


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_frames_are_whole_and_their_starts_exact(frame_ms):
    va = VoiceActivity(16000, frame_ms=frame_ms)
    pcm = to_pcm16(noise(5.0, level=0.003, seed=1))
    frames = frames_of(va, split(pcm, [3202]))
    samples = 16 * frame_ms
    assert len(frames) == len(pcm) // (2 * samples)
    for index, frame in enumerate(frames):
        assert frame.pcm == pcm[index * 2 * samples:(index + 1) * 2 * samples]
        assert frame.start == index * samples / VAD_RATE
        assert frame.duration == frame_ms / 1000
        assert isinstance(frame.speech, bool)


def test_at_most_one_partial_frame_is_held():
    va = VoiceActivity(16000)
    pcm = to_pcm16(noise(1.0, level=0.003, seed=2))
    assert va.process(pcm[:FRAME_BYTES - 2]) == []  # one sample short of a frame
    assert [f.pcm for f in va.process(pcm[FRAME_BYTES - 2:FRAME_BYTES + 2])] == [pcm[:FRAME_BYTES]]
    assert va.process(b"") == []
    three = va.process(pcm[FRAME_BYTES + 2:4 * FRAME_BYTES])
    assert [f.start for f in three] == [0.03, 0.06, 0.09]
    assert b"".join(f.pcm for f in three) == pcm[FRAME_BYTES:4 * FRAME_BYTES]


@pytest.mark.parametrize("rate", [16000, 44100])
def test_odd_byte_count_is_refused_and_leaves_the_stream_intact(engine, rate):
    pcm = _sample_call(engine, rate)
    expected = VoiceActivity(rate).process(pcm)
    va = VoiceActivity(rate)
    cut = 2 * 2001
    got = va.process(pcm[:cut])
    with pytest.raises(InvalidAudio) as info:
        va.process(pcm[cut:cut + 3])
    assert "3 bytes" in info.value.message
    got += va.process(pcm[cut:])
    assert got == expected


@pytest.mark.parametrize("rate", [16000, 8000, 44100])
@pytest.mark.parametrize(
    "chunking",
    ["7 ms", "a sample short of a frame, then the rest", "one huge chunk", "empty chunks between"],
)
def test_chunking_does_not_change_the_frames(engine, rate, chunking):
    pcm = _sample_call(engine, rate)
    sizes = {
        "7 ms": [2 * (7 * rate // 1000)],
        "a sample short of a frame, then the rest": [2 * (30 * rate // 1000) - 2, 2],
        "one huge chunk": [len(pcm)],
        "empty chunks between": [4410, 0, 0, 882],
    }[chunking]
    one_shot = VoiceActivity(rate).process(pcm)
    assert frames_of(VoiceActivity(rate), split(pcm, sizes)) == one_shot
    assert len(one_shot) > 40 and any(f.speech for f in one_shot) and not all(f.speech for f in one_shot)


@settings(max_examples=40, deadline=None)
@given(
    rate=st.sampled_from([16000, 22050, 48000]),
    cuts=st.lists(st.integers(min_value=0, max_value=10**6), max_size=40),
)
def test_any_chunk_boundaries_give_identical_frames(engine, rate, cuts):
    pcm = _sample_call(engine, rate)
    samples = len(pcm) // 2
    edges = sorted({0, samples, *(c % samples for c in cuts)})
    chunks = [pcm[2 * a:2 * b] for a, b in zip(edges, edges[1:])]
    assert frames_of(VoiceActivity(rate), chunks) == VoiceActivity(rate).process(pcm)


@pytest.mark.parametrize("rate", INPUT_RATES)
def test_every_rate_finds_the_speech_where_it_is(engine, rate):
    """Resampled input lines up with the 16 kHz stream: soxr's latency is compensated."""
    lead = 0.5
    clip = speech(engine, "what time is it", rate)
    call = compose(engine, [("silence", lead), ("audio", clip), ("silence", 0.5)], rate=rate, noise_level=0.003, seed=4)
    frames = VoiceActivity(rate).process(to_pcm16(call.audio))
    end = lead + len(clip) / rate
    # soxr holds back its filter's latency (at most ~0.1 s) until more input comes.
    assert call.duration - 0.12 < len(frames) * 0.03 <= call.duration
    voiced = [f for f in frames if f.speech and f.start > 0.2]  # the VAD's first frames adapt
    assert voiced, "no speech found"
    assert abs(voiced[0].start - lead) <= 0.06
    assert lead + 0.3 < voiced[-1].end <= end + 0.2
    inside = [f.speech for f in frames if lead + 0.03 <= f.start and f.end <= end - 0.03]
    assert sum(inside) / len(inside) > 0.8


def test_silence_is_not_speech_after_the_vad_settles():
    frames = VoiceActivity(16000).process(to_pcm16(noise(10.0, level=0.003, seed=5)))
    assert not any(f.speech for f in frames if f.start >= 0.2)
