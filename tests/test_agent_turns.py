"""TurnTracker: where the person's turns start and end, on engine speech over seeded noise."""

from __future__ import annotations

import time
import tracemalloc
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conversation_audio import Call, compose, to_pcm16
from voxflow.agent.frames import UserAudio, UserStartedSpeaking, UserStoppedSpeaking, VoiceFrame
from voxflow.agent.turns import TurnOptions, TurnTracker
from voxflow.agent.vad import INPUT_RATES, VoiceActivity
from voxflow.config import AgentConfig
from voxflow.errors import InvalidRequest

FRAME = 0.03
DEFAULTS = TurnOptions()
START_DELAY = (DEFAULTS.speech_start_ms + DEFAULTS.vad_hangover_ms) / 1000  # see turns.py


@dataclass
class Turn:
    start: UserStartedSpeaking
    pcm: bytearray = field(default_factory=bytearray)
    stop: UserStoppedSpeaking | None = None


def track(call: Call, options: TurnOptions | None = None, chunk_ms: int = 20) -> list[Turn]:
    """Run a call through VoiceActivity and TurnTracker the way a live agent would, `now` being
    the end of the frame just decided (the agent hears audio as it is spoken)."""
    va, tracker = VoiceActivity(call.rate), TurnTracker(options)
    pcm = to_pcm16(call.audio)
    step = 2 * (call.rate * chunk_ms // 1000)
    turns: list[Turn] = []
    for at in range(0, len(pcm), step):
        for frame in va.process(pcm[at:at + step]):
            for out in tracker.process(frame, frame.end):
                if isinstance(out, UserStartedSpeaking):
                    assert not turns or turns[-1].stop is not None, "a turn started inside a turn"
                    turns.append(Turn(out))
                else:
                    turn = turns[-1]
                    assert out.turn == turn.start.turn and turn.stop is None
                    if isinstance(out, UserAudio):
                        turn.pcm += out.pcm
                    else:
                        turn.stop = out
    assert [t.start.turn for t in turns] == list(range(1, len(turns) + 1))
    return turns


def say(engine, *parts, rate=16000, noise_level=0.003, seed=1) -> Call:
    return compose(engine, list(parts), rate=rate, noise_level=noise_level, seed=seed)


@pytest.mark.parametrize("text", ["turn on the lights", "yes", "hello there, how are you doing today?"])
def test_one_utterance_is_one_turn_where_the_speech_is(engine, text):
    call = say(engine, ("silence", 1.0), ("say", text), ("silence", 1.5))
    begin, end = call.speech_spans[0]
    [turn] = track(call)
    assert abs(turn.start.speech_start - begin) <= 0.09
    assert abs(turn.start.decided_at - (begin + START_DELAY)) <= 0.15
    assert turn.stop is not None and not turn.stop.forced
    assert end - 0.15 <= turn.stop.speech_end <= end + 0.15
    assert abs(turn.stop.decided_at - turn.stop.speech_end - DEFAULTS.turn_end_ms / 1000) < 1e-9
    assert abs(turn.stop.decided_at - (end + DEFAULTS.turn_end_ms / 1000)) <= 0.15


def test_utterances_apart_by_1_5_s_are_two_turns(engine):
    call = say(engine, ("silence", 0.8), ("say", "turn on the lights"), ("silence", 1.5),
               ("say", "in the kitchen"), ("silence", 1.2))
    turns = track(call)
    assert len(turns) == 2
    for turn, (begin, end) in zip(turns, call.speech_spans):
        assert abs(turn.start.speech_start - begin) <= 0.09
        assert turn.stop is not None and end - 0.15 <= turn.stop.speech_end <= end + 0.15


def test_utterances_apart_by_0_3_s_are_one_turn(engine):
    call = say(engine, ("silence", 0.8), ("say", "turn on the lights"), ("silence", 0.3),
               ("say", "in the kitchen"), ("silence", 1.2))
    [turn] = track(call)
    assert abs(turn.start.speech_start - call.speech_spans[0][0]) <= 0.09
    assert abs(turn.stop.speech_end - call.speech_spans[1][1]) <= 0.15


@pytest.mark.parametrize("level", [0.0, 0.003, 0.01])
def test_no_turn_in_silence_or_background_noise(level):
    call = say(None, ("silence", 60.0), noise_level=level, seed=7)
    assert track(call) == []


@pytest.mark.parametrize("seconds", [0.05, 0.1, 0.15])
def test_a_short_burst_never_starts_a_turn(seconds):
    # Bursts at every offset within a frame, over quiet and over louder background noise.
    for offset_ms in range(0, 30, 3):
        parts = [("silence", 1.0 + offset_ms / 1000)]
        for _ in range(5):
            parts += [("noise", seconds), ("silence", 1.0)]
        for level in (0.003, 0.01):
            assert track(say(None, *parts, noise_level=level, seed=offset_ms)) == []


def test_a_sound_as_long_as_speech_start_does_start_a_turn():
    """The other side of the burst rule: the rule is a duration, not a dislike of noise."""
    turns = track(say(None, ("silence", 1.0), ("noise", 0.25), ("silence", 1.0)))
    assert len(turns) == 1
    assert abs(turns[0].start.speech_start - 1.0) <= 0.03


def test_a_knock_in_the_silence_after_speech_is_not_speech(engine):
    plain = say(engine, ("silence", 1.0), ("say", "turn on the lights"), ("silence", 2.0))
    knocked = say(engine, ("silence", 1.0), ("say", "turn on the lights"), ("silence", 0.3),
                  ("noise", 0.1), ("silence", 1.6))
    [a], [b] = track(plain), track(knocked)
    assert b.stop.speech_end == a.stop.speech_end
    # It may put the decision off while it is in the window (390 ms), no longer.
    assert a.stop.decided_at <= b.stop.decided_at <= a.stop.decided_at + 0.39 + 1e-9


def test_the_first_audio_carries_the_preroll_and_the_turn_audio_is_contiguous(engine):
    call = say(engine, ("silence", 1.0), ("say", "turn on the lights"), ("silence", 1.5))
    pcm = to_pcm16(call.audio)
    [turn] = track(call)
    first = round((turn.start.speech_start - DEFAULTS.preroll_ms / 1000) * 16000)
    last = round(turn.stop.decided_at * 16000)  # the frame that decided the end is the turn's last
    assert bytes(turn.pcm) == pcm[2 * first:2 * last]


def test_the_first_audio_alone_runs_from_the_preroll_to_the_deciding_frame(engine):
    call = say(engine, ("silence", 1.0), ("say", "turn on the lights"), ("silence", 1.5))
    va, tracker = VoiceActivity(16000), TurnTracker()
    out = [o for f in va.process(to_pcm16(call.audio)) for o in tracker.process(f, f.end)]
    start, first_audio = out[0], out[1]
    assert isinstance(start, UserStartedSpeaking) and isinstance(first_audio, UserAudio)
    seconds = len(first_audio.pcm) / 2 / 16000
    assert abs(seconds - (start.decided_at - start.speech_start + DEFAULTS.preroll_ms / 1000)) < 1e-9


@pytest.mark.parametrize("rate", [r for r in INPUT_RATES if r != 16000])
def test_other_input_rates_give_the_same_turns(engine, rate):
    parts = [("silence", 1.0), ("say", "turn on the lights"), ("silence", 1.5), ("say", "thank you"),
             ("silence", 0.25), ("say", "that's all"), ("silence", 1.2)]
    reference = track(say(engine, *parts))
    turns = track(say(engine, *parts, rate=rate))
    assert len(reference) == 2
    assert len(turns) == len(reference)
    for got, want in zip(turns, reference):
        assert abs(got.start.speech_start - want.start.speech_start) <= FRAME + 1e-9
        assert abs(got.start.decided_at - want.start.decided_at) <= FRAME + 1e-9
        assert abs(got.stop.speech_end - want.stop.speech_end) <= FRAME + 1e-9


def test_a_turn_longer_than_max_turn_seconds_is_forced_to_end_and_talk_goes_on(engine):
    text = "the quick brown fox jumps over the lazy dog, and then it runs back home again"
    call = say(engine, ("silence", 0.5), ("say", text), ("silence", 1.5))
    assert call.speech_spans[0][1] - call.speech_spans[0][0] > 3.0
    turns = track(call, TurnOptions(max_turn_seconds=2.0))
    first, second = turns[0], turns[1]
    assert first.stop.forced
    assert abs(first.stop.decided_at - first.start.speech_start - 2.0) <= FRAME + 1e-9
    assert second.start.speech_start >= first.stop.decided_at  # no frame is in two turns
    assert second.start.decided_at - first.stop.decided_at < 0.6  # the person still talks
    assert not turns[-1].stop.forced


# Synthetic VAD decisions: the rules themselves, without the VAD's judgement in between.

def frames(pattern: str, start_index: int = 0) -> list[VoiceFrame]:
    """One 30 ms frame per character ('1' speech, '0' not); pcm holds the frame's index."""
    return [
        VoiceFrame(i.to_bytes(4, "little") * 240, i * 480 / 16000, FRAME, c == "1")
        for i, c in enumerate(pattern, start_index)
    ]


def decisions(pattern: str, options: TurnOptions | None = None) -> list:
    tracker = TurnTracker(options)
    return [o for f in frames(pattern) for o in tracker.process(f, f.end) if not isinstance(o, UserAudio)]


def test_speech_with_dropouts_starts_a_turn():
    # webrtcvad drops a frame or two inside words; nine voiced frames within 13 still start it.
    [start] = decisions("0" * 20 + "1101101111011")
    assert start.speech_start == 20 * FRAME
    assert start.decided_at == pytest.approx(32 * FRAME)


def test_eight_voiced_frames_never_start_a_turn_however_spread():
    # With the defaults a start takes 9 voiced frames (200 ms + 60 ms hang-over) within 13.
    for pattern in ("11111111", "1111011110", "1010101010101010", "110011001100110011"):
        assert decisions(("0" * 20 + pattern) * 5 + "0" * 20) == [], pattern


def test_stray_voiced_frames_in_the_silence_do_not_keep_the_turn_alive():
    # A stray frame every 300 ms forever would reset a "600 ms of consecutive silence" rule.
    # Speech ends with frame 39; the strays are frames 49, 59, 69, ... Each holds the end off
    # while it is in the 13-frame window: frame 72 is the first with 20 frames from speech_end
    # to the first voiced frame in the window (69).
    out = decisions("0" * 10 + "1" * 30 + "000000000" + "1000000000" * 100)
    assert [type(o) for o in out] == [UserStartedSpeaking, UserStoppedSpeaking]
    assert out[1].speech_end == pytest.approx(40 * FRAME)
    assert out[1].decided_at == pytest.approx(73 * FRAME)


def test_a_short_sound_after_speech_does_not_move_speech_end():
    out = decisions("0" * 10 + "1" * 30 + "0" * 10 + "1" * 8 + "0" * 40)
    assert out[1].speech_end == pytest.approx(40 * FRAME)
    # Held off until the sound has left the window (frame 57 leaves it at frame 70).
    assert out[1].decided_at == pytest.approx(71 * FRAME)


def test_a_word_resumed_after_a_pause_is_not_cut_off_while_it_is_confirmed():
    # 540 ms of pause, then a word with a dropout: it counts as speech only on its 10th frame,
    # 28 frames after speech_end, when a plain 600 ms (20 frames) timer would have fired.
    out = decisions("0" * 10 + "1" * 30 + "0" * 18 + "1101111111" + "0" * 30)
    assert [type(o) for o in out] == [UserStartedSpeaking, UserStoppedSpeaking]
    assert out[1].speech_end == pytest.approx(68 * FRAME)
    assert out[1].decided_at == pytest.approx(88 * FRAME)


def test_turn_numbers_count_up():
    out = decisions(("0" * 30 + "1" * 20) * 4 + "0" * 30)
    assert [o.turn for o in out] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert [type(o) for o in out] == [UserStartedSpeaking, UserStoppedSpeaking] * 4


@settings(max_examples=200, deadline=None)
@given(voiced=st.lists(st.booleans(), max_size=600), max_turn=st.sampled_from([1.0, 30.0]))
def test_every_frame_goes_to_at_most_one_turn_in_order(voiced, max_turn):
    options = TurnOptions(max_turn_seconds=max_turn)
    tracker = TurnTracker(options)
    seen: list[int] = []
    open_turn = None
    for frame in frames("".join("1" if v else "0" for v in voiced)):
        for out in tracker.process(frame, frame.end):
            if isinstance(out, UserStartedSpeaking):
                assert open_turn is None
                open_turn = out
            elif isinstance(out, UserAudio):
                assert open_turn is not None and out.turn == open_turn.turn
                seen += [int.from_bytes(out.pcm[i:i + 4], "little") for i in range(0, len(out.pcm), 960)]
            else:
                assert open_turn is not None and out.turn == open_turn.turn
                assert open_turn.speech_start < out.speech_end <= frame.end
                if not out.forced:  # turn_end_ms after speech_end, put off by up to the window
                    assert options.turn_end_ms / 1000 - 1e-9 <= out.decided_at - out.speech_end <= 0.6 + 12 * FRAME + 1e-9
                # A forced end comes with the frame that reaches max_turn_seconds: up to a frame past it.
                assert out.decided_at - open_turn.speech_start <= max_turn + FRAME + 1e-9
                open_turn = None
        assert tracker.in_turn == (open_turn is not None)
    assert seen == sorted(set(seen))  # in order, none twice


def test_options_come_from_the_config_and_are_checked():
    options = TurnOptions.from_config(AgentConfig(speech_start_ms=150, turn_end_ms=700, vad_aggressiveness=0))
    assert (options.speech_start_ms, options.turn_end_ms, options.vad_hangover_ms) == (150, 700, 90)
    assert TurnOptions.from_config(AgentConfig()) == TurnOptions()
    for bad in ({"speech_start_ms": 0}, {"turn_end_ms": -1}, {"preroll_ms": float("nan")},
                {"max_turn_seconds": 0.1}, {"vad_hangover_ms": -5}, {"turn_end_ms": "600"}):
        with pytest.raises(InvalidRequest):
            TurnOptions(**bad)


def test_frames_of_another_length_are_refused():
    tracker = TurnTracker()
    tracker.process(VoiceFrame(b"\0" * 960, 0.0, 0.03, False), 0.03)
    with pytest.raises(InvalidRequest):
        tracker.process(VoiceFrame(b"\0" * 640, 0.03, 0.02, False), 0.05)


def test_an_hour_keeps_memory_bounded():
    # Six different 10 s blocks of quiet noise, one with a sound long enough to be a turn; made
    # before tracing starts and cycled, so the hour never exists at once.
    turn = [("silence", 4.0), ("noise", 0.5), ("silence", 5.5)]
    blocks = [to_pcm16(compose(None, turn if k == 0 else [("silence", 10.0)], noise_level=0.003, seed=k).audio)
              for k in range(6)]
    chunk = 3200  # 100 ms
    va, tracker = VoiceActivity(16000), TurnTracker()
    starts = stops = count = 0
    began = time.perf_counter()
    tracemalloc.start()
    try:
        for block in range(360):
            source = blocks[block % 6]
            for at in range(0, len(source), chunk):
                for frame in va.process(source[at:at + chunk]):
                    for out in tracker.process(frame, frame.end):
                        starts += isinstance(out, UserStartedSpeaking)
                        stops += isinstance(out, UserStoppedSpeaking)
                    count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - began
    assert count == 120_000
    assert frame.start == 119_999 * 480 / 16000  # exact after an hour: no float drift
    assert starts == stops == 60  # one a minute: the turn path ran too
    assert peak < 1_000_000, f"peak {peak} bytes"
    assert elapsed < 30, f"an hour took {elapsed:.1f} s"
