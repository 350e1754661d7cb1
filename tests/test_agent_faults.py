"""The whole agent against an OpenAI-compatible chat server that fails the ways real ones do
(openai_chat_double, through the real `openai` client), and against bad input, long silence
and closing mid-reply. The conversation always goes on.

Most tests drive the Agent directly (agent_driver): each turn's audio is fed as fast as the
agent takes it, then the test waits for the reply to play in real time before the next turn.
Turns are decided on the audio's own timeline, so this gives the same turns as a paced call
while costing only the bot's speaking time.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
import wave
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest

from agent_driver import AgentDriver, RecordingSink
from conversation_audio import compose, noise, to_pcm16, write_wav
from openai_chat_double import ChatDouble, ChatScript, Pause, chat_double
from speech import normalize_words, transcribe, word_error_rate
from voxflow.agent.agent import Agent
from voxflow.agent.asr_pocketsphinx import PocketsphinxRecognizer
from voxflow.agent.events import (
    AgentError,
    BotStarted,
    BotStopped,
    Interrupted,
    ReplyEvent,
    TranscriptEvent,
    TurnMetrics,
)
from voxflow.agent.llm_openai import OpenAIChatModel
from voxflow.agent.replay import replay
from voxflow.agent.vad import InvalidAudio
from voxflow.config import AgentConfig
from voxflow.errors import InvalidRequest, UnknownVoice
from waiting import until

LIGHTS = "please turn on the kitchen lights"
TIME = "what time is it"
MOTHER = "Sure, I will call your mother on the phone."
MOTHER_PIECES = ["Sure,", " I will", Pause(0.2), " call your", " mother on", " the phone."]
KITCHEN = ["The kitchen", " lights", " are on now."]
WEATHER = "The weather today will be sunny in the morning with clouds later and a light wind from the west."
SYSTEM = "You are a test assistant. Answer briefly."
CONFIG = AgentConfig(system_prompt=SYSTEM)


@pytest.fixture(scope="module", autouse=True)
def warm_engine(engine) -> None:
    """A fresh process's first synthesis stream pays torch's first-call costs (seconds on this
    machine); paying them here keeps them out of the replies the tests time."""
    asyncio.run(engine.warm_up())


@pytest.fixture(scope="module")
def recognizer() -> Iterator[PocketsphinxRecognizer]:
    """One decoder pool for the module (the agent does not own a recognizer it is given)."""
    made = PocketsphinxRecognizer()
    yield made
    asyncio.run(made.aclose())


@pytest.fixture(scope="module")
def turns(engine) -> dict[str, bytes]:
    """One turn of the person's speech each, with the silence that ends it, as 16 kHz PCM16."""
    return {
        text: to_pcm16(compose(engine, [("silence", 0.4), ("say", text), ("silence", 1.0)], seed=seed).audio)
        for seed, text in enumerate((LIGHTS, TIME), start=21)
    }


@pytest.fixture
def double() -> Iterator[ChatDouble]:
    with chat_double(ChatScript(MOTHER_PIECES)) as running:
        yield running


@pytest.fixture
async def model(double: ChatDouble) -> AsyncIterator[OpenAIChatModel]:
    made = OpenAIChatModel(model="gpt-test", base_url=double.base_url, api_key="sk-test", timeout=1.0)
    yield made
    await made.aclose()


def words_of(text: str) -> list[str]:
    return normalize_words(text)


def without_gaps(audio: np.ndarray, rate: int) -> np.ndarray:
    """The audio less every run of exact zeros a frame (20 ms) or longer: the padding a WAV sink
    writes where no frame was due."""
    frame = rate // 50
    zero = np.concatenate([[False], audio == 0, [False]])
    edges = np.flatnonzero(np.diff(zero.astype(np.int8)))
    keep = np.ones(len(audio), bool)
    for start, end in zip(edges[::2], edges[1::2]):
        if end - start >= frame:
            keep[start:end] = False
    return audio[keep]


# -- (a) a normal streamed reply, replayed as `voxflow agent` does --


async def test_a_streamed_reply_is_spoken(engine, tmp_path, double: ChatDouble, recognizer) -> None:
    call = compose(engine, [("silence", 0.5), ("say", LIGHTS), ("silence", 2.0)], seed=31)
    write_wav(tmp_path / "call.wav", call.audio, call.rate)
    # A long pause in the middle of the reply (long for this busy machine's first audio): the
    # bot starts speaking before the LLM is done.
    double.script = ChatScript(["Sure,", Pause(2.5), " I will", " call your", " mother on", " the phone."])
    model = OpenAIChatModel(model="gpt-test", base_url=double.base_url, api_key="sk-test", timeout=10.0)
    try:
        result = await replay(engine, CONFIG, tmp_path / "call.wav", tmp_path / "bot.wav", recognizer=recognizer, llm=model)
    finally:
        await model.aclose()
    assert result.settled
    events = result.events
    (heard,) = [e for e in events if isinstance(e, TranscriptEvent)]
    assert word_error_rate([LIGHTS], [heard.text]) <= 0.5
    (reply,) = [e for e in events if isinstance(e, ReplyEvent)]
    assert (reply.turn, reply.text, reply.error) == (1, MOTHER, "")
    assert not [e for e in events if isinstance(e, AgentError)]
    # The request: the real client's stream request with the system prompt and the transcript.
    (request,) = double.requests
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.body["model"] == "gpt-test" and request.body["stream"] is True
    assert request.body["messages"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": heard.text},
    ]
    # The bot said the double's pieces, on the call's timeline.
    (started,) = [e for e in events if isinstance(e, BotStarted)]
    (stopped,) = [e for e in events if isinstance(e, BotStopped)]
    assert stopped.reason == "done" and words_of(stopped.spoken) == words_of(MOTHER)
    with wave.open(str(tmp_path / "bot.wav"), "rb") as wav:
        rate = wav.getframerate()
        bot = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").astype(np.float32) / 32768
    assert float(np.abs(bot[: int((started.t - 0.02) * rate)]).max()) == 0.0  # silent before
    # The WAV is on the call's timeline: where this busy machine made audio slower than real time
    # the playout ran dry and the file has digital silence there. Joined up again, it is the reply.
    spoken = transcribe(without_gaps(bot[int(started.t * rate) : int(stopped.t * rate) + rate // 2], rate), rate)
    assert word_error_rate([MOTHER], [spoken]) <= 0.3, spoken
    # The first audio came after the first piece arrived, not after the whole reply.
    (metrics,) = [e for e in events if isinstance(e, TurnMetrics)]
    assert None not in (metrics.asr_ms, metrics.llm_first_token_ms, metrics.tts_first_audio_ms)
    assert started.t < reply.t  # speaking began while the LLM was still writing (the 2.5 s pause)


# -- (b) an error in the middle of the stream --


async def test_an_error_mid_stream_is_reported_and_what_came_is_spoken(engine, double, model, recognizer, turns) -> None:
    double.script = ChatScript(KITCHEN, error_after=2)
    async with AgentDriver(engine, CONFIG, llm=model, recognizer=recognizer) as drive:
        await drive.feed(turns[LIGHTS])
        await drive.settle()
        (error,) = drive.of(AgentError)
        assert (error.code, error.turn) == ("llm_error", 1)
        assert "mid-reply" in error.message
        (reply,) = drive.of(ReplyEvent)
        assert (reply.turn, reply.text, reply.error) == (1, "The kitchen lights", "llm_error")
        (stopped,) = drive.of(BotStopped)
        assert (stopped.turn, stopped.reason) == (1, "done")
        assert words_of(stopped.spoken) == ["the", "kitchen", "lights"]
        spoken = transcribe(drive.sink.audio("reply-1"), 16_000)
        assert {"kitchen", "lights"} <= set(words_of(spoken)), spoken

        # The next turn in the same call is answered normally.
        double.script = ChatScript(MOTHER_PIECES)
        await drive.feed(turns[TIME])
        await drive.settle()
        (second,) = drive.of(ReplyEvent, turn=2)
        assert (second.text, second.error) == (MOTHER, "")
        assert [e.reason for e in drive.of(BotStopped, turn=2)] == ["done"]
        assert len(drive.of(AgentError)) == 1
        assert word_error_rate([MOTHER], [transcribe(drive.sink.audio("reply-2"), 16_000)]) <= 0.3
        # What the person heard of the failed reply is in the history the LLM got next.
        assert double.requests[1].body["messages"][2] == {"role": "assistant", "content": "The kitchen lights"}


# -- (c) a stream that stalls --


async def test_a_stalled_stream_times_out_and_the_conversation_goes_on(engine, double, model, recognizer, turns) -> None:
    double.script = ChatScript(["Okay,", " one moment"], stall_after=1)
    async with AgentDriver(engine, CONFIG, llm=model, recognizer=recognizer) as drive:
        began = time.perf_counter()
        await drive.feed(turns[LIGHTS])
        error = await drive.wait_for(AgentError, timeout=15)
        (heard,) = drive.of(TranscriptEvent)
        assert (error.code, error.turn) == ("llm_timeout", 1)
        # After the timeout (1 s from the first piece), not before; and not much later.
        assert error.t - heard.t >= 0.9
        assert time.perf_counter() - began < 20  # a hang bound only
        await drive.settle()
        (reply,) = drive.of(ReplyEvent)
        assert (reply.text, reply.error) == ("Okay,", "llm_timeout")
        assert drive.sink.frames("reply-1")  # what came was spoken
        assert await double.wait_client_went_away(0)  # the stalled response was let go

        double.script = ChatScript(MOTHER_PIECES)
        await drive.feed(turns[TIME])
        await drive.settle()
        (second,) = drive.of(ReplyEvent, turn=2)
        assert (second.text, second.error) == (MOTHER, "")
        assert drive.of(BotStopped, turn=2)[0].reason == "done"
        assert [e.code for e in drive.of(AgentError)] == ["llm_timeout"]


# -- (d) an HTTP error before any text --


async def test_an_http_error_gives_no_bot_audio_and_empty_metrics(engine, double, model, recognizer, turns) -> None:
    double.script = ChatScript(status=500)
    async with AgentDriver(engine, CONFIG, llm=model, recognizer=recognizer) as drive:
        await drive.feed(turns[LIGHTS])
        await drive.settle()
        (error,) = drive.of(AgentError)
        assert (error.code, error.turn) == ("llm_error", 1)
        assert "HTTP 500" in error.message
        assert [(e.text, e.error) for e in drive.of(ReplyEvent)] == [("", "llm_error")]
        assert drive.sink.played == []  # not a frame, not even silence
        assert drive.of(BotStarted) == [] and drive.of(BotStopped) == []
        (metrics,) = drive.of(TurnMetrics)
        assert metrics.turn == 1 and metrics.asr_ms is not None
        assert metrics.llm_first_token_ms is None and metrics.tts_first_audio_ms is None and metrics.voice_to_voice_ms is None
        assert drive.agent.conversation.active_reply is None
        assert len(double.requests) == 1  # no retry while the person waits


# -- (e) bad input --


async def test_bad_audio_is_refused_and_the_agent_goes_on(engine, recognizer, turns) -> None:
    async with AgentDriver(engine, CONFIG, recognizer=recognizer) as drive:
        agent = drive.agent
        refused = [
            b"\x00\x01\x02",  # an odd byte count
            bytes(2 * 16_000 + 2),  # more than a second
            "not audio",
            [0, 1, 2, 3],
            None,
        ]
        for pcm in refused:
            with pytest.raises(InvalidAudio) as caught:
                await agent.feed(pcm)  # type: ignore[arg-type]
            assert caught.value.code == "invalid_audio"
        await agent.feed(bytes(2 * 16_000))  # exactly a second is fine
        await agent.feed(bytearray(640))
        await agent.feed(memoryview(bytes(640)))
        await drive.feed(turns[LIGHTS])
        await drive.settle()
        (heard,) = drive.of(TranscriptEvent)
        assert word_error_rate([LIGHTS], [heard.text]) <= 0.5
        (reply,) = drive.of(ReplyEvent)
        assert words_of(reply.text) == words_of(heard.text)  # the echo answered
        assert drive.of(BotStopped)[0].reason == "done"
        assert drive.of(AgentError) == []


async def test_bad_settings_fail_at_construction(engine) -> None:
    before = asyncio.all_tasks()
    sink = RecordingSink(16_000)
    with pytest.raises(InvalidAudio, match="11025") as caught:
        Agent(engine, CONFIG, sink, input_rate=11_025)
    assert caught.value.code == "invalid_audio"
    with pytest.raises(UnknownVoice, match="nobody") as caught:
        Agent(engine, AgentConfig(tts_voice="nobody"), sink, input_rate=16_000)
    assert caught.value.code == "unknown_voice"
    with pytest.raises(InvalidRequest, match="whispering"):
        Agent(engine, AgentConfig(tts_style="whispering"), sink, input_rate=16_000)
    assert asyncio.all_tasks() - before == set()  # nothing was started


# -- (f) an hour of silence --


async def test_an_hour_of_quiet_keeps_memory_bounded(engine, recognizer) -> None:
    # Ten different seconds of quiet background noise, cycled; each feed gets a fresh copy, as
    # a transport hands over new buffers.
    seconds = [to_pcm16(noise(1.0, 16_000, level=0.003, seed=100 + k)) for k in range(10)]
    async with AgentDriver(engine, CONFIG, recognizer=recognizer) as drive:
        agent = drive.agent
        began = time.perf_counter()
        tracemalloc.start()
        try:
            for second in range(3600):
                await agent.feed(bytearray(seconds[second % 10]))
                if second == 119:  # by then the first inbox has been full for a while
                    _, first_peak = tracemalloc.get_traced_memory()
                    tracemalloc.reset_peak()
            await drive.settle()
            current, rest_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        elapsed = time.perf_counter() - began
        print(f"an hour of quiet took {elapsed:.1f} s; peak {first_peak} B in the first two minutes, {rest_peak} B after")
        assert agent.graph.nodes[0].activity._frames_out == 120_000  # the whole hour was heard
        assert drive.events == []
        # Bounded by the inboxes (the first holds up to 64 of these 1 s chunks), not by the hour.
        assert first_peak < 4_000_000
        assert rest_peak < first_peak + 256_000
        assert current < 512_000
        assert elapsed < 60


# -- (g) closing in the middle of a reply --


async def test_aclose_mid_reply_leaves_nothing_running(engine, double, model, recognizer, turns) -> None:
    double.script = ChatScript([*[w + " " for w in WEATHER.split()[:6]], Pause(5.0), "west."])
    before = asyncio.all_tasks()
    drive = AgentDriver(engine, CONFIG, llm=model, recognizer=recognizer)
    await drive.__aenter__()
    try:
        await drive.feed(turns[LIGHTS])
        await drive.wait_for(BotStarted, timeout=15)
        await asyncio.sleep(0.3)
        running = {t.get_name() for t in asyncio.all_tasks() - before}
        assert "voxflow-stream-reply-1" in running and "voxflow-agent-playout" in running  # mid-reply
    finally:
        await drive.aclose()
    left = [t.get_name() for t in asyncio.all_tasks() - before]
    assert left == []
    # The LLM's response was let go (it was still streaming: the pause is 5 s).
    assert await double.wait_client_went_away(0)
    played = len(drive.sink.played)
    count = len(drive.events)
    await asyncio.sleep(0.2)
    assert len(drive.sink.played) == played and len(drive.events) == count  # nothing after close
    await drive.agent.feed(bytes(640))  # feeding a closed agent is harmless
    await drive.agent.aclose()  # and closing twice too


# -- (h) barge-in: the LLM sees only what was heard --


async def test_after_a_barge_in_the_llm_sees_only_the_spoken_words(engine, double, model, recognizer, turns) -> None:
    double.script = ChatScript([w + " " for w in WEATHER.split()])
    async with AgentDriver(engine, CONFIG, llm=model, recognizer=recognizer) as drive:
        await drive.feed(turns[LIGHTS])
        started = await drive.wait_for(BotStarted, timeout=15)
        # A second and a half into the reply.
        await until(lambda: drive.agent.clock.now() >= started.t + 1.5, 15, poll=0.02)
        double.script = ChatScript(["Okay."])
        await drive.feed(turns[TIME])
        await drive.settle()
        (cut,) = drive.of(Interrupted)
        assert (cut.turn, cut.by_turn) == (1, 2)
        heard = words_of(cut.spoken)
        full = words_of(WEATHER)
        assert 0 < len(heard) < len(full) and full[: len(heard)] == heard
        assert [e.reason for e in drive.of(BotStopped, turn=1)] == ["interrupted"]
        # No audio of the cut reply was handed out after the decision.
        assert all(due <= cut.t + 0.001 for frame, due in drive.sink.played if frame.context_id == "reply-1")
        assert drive.sink.stops == ["reply-1"]
        # The second request carries the history: the first reply as far as it was heard.
        assert len(double.requests) == 2
        messages = double.requests[1].body["messages"]
        (first_heard,) = drive.of(TranscriptEvent, turn=1)
        (second_heard,) = drive.of(TranscriptEvent, turn=2)
        assert messages == [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": first_heard.text},
            {"role": "assistant", "content": cut.spoken},
            {"role": "user", "content": second_heard.text},
        ]
        assert words_of(messages[2]["content"]) == heard
        assert drive.of(ReplyEvent, turn=2)[0].text == "Okay."
