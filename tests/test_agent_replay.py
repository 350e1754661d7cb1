"""The whole agent on recorded calls made with the engine: turns, echo replies, barge-in,
history, the events file and the bot's WAV, replayed in real time as `voxflow agent` does."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest

from conversation_audio import compose, write_wav
from speech import normalize_words, transcribe, word_error_rate
from voxflow.agent.events import (
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
from voxflow.agent.replay import read_call, replay
from voxflow.agent.vad import InvalidAudio
from voxflow.config import AgentConfig

REQUEST = "please turn on the kitchen lights"
LONG = "the weather today will be sunny in the morning with clouds later and a light wind from the west"


def _of(events, kind):
    return [e for e in events if isinstance(e, kind)]


def _read_wav(path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as wav:
        data = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").astype(np.float32) / 32768
        return data, wav.getframerate()


def _loud(audio: np.ndarray, rate: int, start: float, end: float) -> float:
    """Peak level of the bot's WAV between two times (s)."""
    part = audio[int(start * rate) : int(end * rate)]
    return float(np.abs(part).max()) if len(part) else 0.0


@pytest.fixture(scope="module")
def echo_call(engine, tmp_path_factory):
    """One echo conversation, replayed once for the tests that read it."""
    import asyncio

    folder = tmp_path_factory.mktemp("echo")
    call = compose(engine, [("silence", 1.0), ("say", REQUEST), ("silence", 4.0)], seed=3)
    write_wav(folder / "call.wav", call.audio, call.rate)
    result = asyncio.run(replay(engine, AgentConfig(), folder / "call.wav", folder / "reply.wav", folder / "events.jsonl"))
    return call, result, folder


def test_echo_turn_is_detected_where_the_speech_is(echo_call):
    call, result, _ = echo_call
    (start,) = _of(result.events, SpeechStarted)
    (stop,) = _of(result.events, SpeechStopped)
    (span,) = call.speech_spans
    assert abs(start.speech_start - span[0]) < 0.15
    assert abs(stop.speech_end - span[1]) < 0.2
    # Called over once turn_end_ms of silence was heard, not before, and not much after.
    assert 0.6 <= stop.t - stop.speech_end <= 0.75


def test_echo_reply_says_the_persons_words(echo_call):
    _, result, folder = echo_call
    (heard,) = _of(result.events, TranscriptEvent)
    assert word_error_rate([REQUEST], [heard.text]) <= 0.5
    (reply,) = _of(result.events, ReplyEvent)
    assert normalize_words(reply.text) == normalize_words(heard.text)
    (started,) = _of(result.events, BotStarted)
    (stopped,) = _of(result.events, BotStopped)
    assert stopped.reason == "done"
    bot, rate = _read_wav(folder / "reply.wav")
    spoken = transcribe(bot[int(started.t * rate) : int(stopped.t * rate) + rate // 2], rate)
    assert word_error_rate([heard.text], [spoken]) <= 0.5, spoken


def test_bot_wav_is_on_the_calls_timeline(echo_call):
    call, result, folder = echo_call
    bot, rate = _read_wav(folder / "reply.wav")
    assert rate == call.rate
    assert len(bot) >= len(call.audio)  # at least as long as the call, so the two line up
    (started,) = _of(result.events, BotStarted)
    (stopped,) = _of(result.events, BotStopped)
    assert _loud(bot, rate, 0, started.t - 0.02) == 0  # silent until the bot speaks
    assert _loud(bot, rate, started.t, stopped.t) > 0.05
    assert _loud(bot, rate, stopped.t + 0.05, len(bot) / rate) == 0


def test_turn_metrics_add_up(echo_call):
    _, result, _ = echo_call
    (m,) = _of(result.events, TurnMetrics)
    parts = [m.end_of_turn_ms, m.asr_ms, m.llm_first_token_ms, m.tts_first_audio_ms]
    assert all(p is not None and p >= 0 for p in parts)
    assert m.voice_to_voice_ms == pytest.approx(sum(parts), abs=1.0)
    assert 550 <= m.end_of_turn_ms <= 800


def test_events_file_holds_every_event_in_order(echo_call):
    _, result, folder = echo_call
    lines = (folder / "events.jsonl").read_text().splitlines()
    parsed = [event_from_dict(json.loads(line)) for line in lines]
    assert [event_to_dict(e) for e in parsed] == [event_to_dict(e) for e in result.events]
    times = [e.t for e in parsed]
    assert times == sorted(times)
    assert [e.type for e in parsed][:2] == ["speech_started", "speech_stopped"]


async def test_noise_alone_gets_no_turn(engine, tmp_path):
    call = compose(engine, [("silence", 0.5), ("noise", 0.1), ("silence", 1.0), ("noise", 0.12), ("silence", 1.0)], noise_level=0.01, seed=5)
    write_wav(tmp_path / "noise.wav", call.audio, call.rate)
    result = await replay(engine, AgentConfig(), tmp_path / "noise.wav", tmp_path / "out.wav")
    assert result.events == []
    bot, rate = _read_wav(tmp_path / "out.wav")
    assert _loud(bot, rate, 0, len(bot) / rate) == 0


async def test_barge_in_cuts_the_bot_and_keeps_what_was_heard(engine, tmp_path):
    # The echo answers the long sentence with the same long sentence; the person talks over
    # it about two seconds into the answer.
    call = compose(engine, [("silence", 0.5), ("say", LONG), ("silence", 3.0), ("say", "stop please"), ("silence", 3.0)], seed=7)
    write_wav(tmp_path / "call.wav", call.audio, call.rate)
    result = await replay(engine, AgentConfig(), tmp_path / "call.wav", tmp_path / "out.wav")
    events = result.events
    (cut,) = _of(events, Interrupted)
    assert (cut.turn, cut.by_turn) == (1, 2)
    assert cut.stop_ms <= 100
    decision = next(e for e in _of(events, SpeechStarted) if e.turn == 2)
    assert decision.t == pytest.approx(cut.t, abs=0.05)
    first_reply = next(e for e in _of(events, ReplyEvent) if e.turn == 1)
    heard = normalize_words(cut.spoken)
    full = normalize_words(first_reply.text)
    assert 0 < len(heard) < len(full)
    assert full[: len(heard)] == heard
    assert [e.reason for e in _of(events, BotStopped) if e.turn == 1] == ["interrupted"]
    # Silent from 100 ms after the decision until the reply to the interruption starts.
    bot, rate = _read_wav(tmp_path / "out.wav")
    second = next(e for e in _of(events, BotStarted) if e.turn == 2)
    assert _loud(bot, rate, decision.t + 0.1, second.t - 0.02) == 0
    # The history keeps only what the person heard of the first reply.
    assistant = [m.content for m in result.history if m.role == "assistant"]
    assert normalize_words(assistant[0]) == heard


async def test_call_at_other_rates_and_stereo(engine, tmp_path):
    call = compose(engine, [("silence", 0.8), ("say", REQUEST), ("silence", 2.5)], rate=48_000, seed=9)
    stereo = np.stack([call.audio, call.audio], axis=1)
    with wave.open(str(tmp_path / "stereo.wav"), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(48_000)
        wav.writeframes((stereo * 32767).astype("<i2").tobytes())
    result = await replay(engine, AgentConfig(), tmp_path / "stereo.wav", tmp_path / "out.wav")
    (heard,) = _of(result.events, TranscriptEvent)
    assert word_error_rate([REQUEST], [heard.text]) <= 0.5
    bot, rate = _read_wav(tmp_path / "out.wav")
    assert rate == 48_000 and _loud(bot, rate, 0, len(bot) / rate) > 0.05


def test_read_call_refuses_what_it_cannot_use(tmp_path):
    path = tmp_path / "wide.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(4)
        wav.setframerate(16_000)
        wav.writeframes(bytes(400))
    with pytest.raises(InvalidAudio, match="32-bit"):
        read_call(path)
    (tmp_path / "junk.wav").write_bytes(b"not a wav at all")
    with pytest.raises(InvalidAudio):
        read_call(tmp_path / "junk.wav")
