"""A conversation with the agent over WebRTC on a live server: an aiortc peer's microphone plays
an engine-made call, agent events come back on the data channel and the answer on the track."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from aiortc.contrib.media import MediaPlayer

from conversation_audio import compose, write_wav
from server_harness import run_server
from speech import transcribe, word_error_rate
from test_webrtc_aiortc import connect, registry, server_tasks
from voxflow.agent.events import BotStarted, BotStopped, TranscriptEvent, TurnMetrics
from voxflow.transports.protocols.native_protocol import AgentMessage, Error, Listen, Listening, StopListening
from waiting import until

REQUEST = "please turn on the kitchen lights"


@pytest.fixture(scope="module")
def talk_server(engine):
    with run_server(engine, webrtc_loopback=True) as running:
        yield running


@pytest.fixture(scope="module")
def call_wav(engine, tmp_path_factory) -> Path:
    """The person's side of the call at 48 kHz, what a browser's microphone would send."""
    call = compose(engine, [("silence", 1.5), ("say", REQUEST), ("silence", 4.0)], rate=48_000, seed=11)
    path = tmp_path_factory.mktemp("call") / "call.wav"
    write_wav(path, call.audio, call.rate)
    return path


def agent_event(kind: type, turn: int = 1):
    return lambda m: isinstance(m, AgentMessage) and isinstance(m.event, kind) and m.event.turn == turn


async def test_the_microphone_is_heard_and_answered_on_the_track(talk_server, call_wav):
    player = MediaPlayer(str(call_wav))
    peer = await connect(talk_server, microphone=player.audio)
    loop = asyncio.get_running_loop()
    arrivals: dict[str, float] = {}
    try:
        # What listen asks for is not what a session uses: the track carries both directions.
        peer.send(Listen(sample_rate=8000, output_sample_rate=16000))
        assert await peer.next() == Listening(16000, 48000, 20, "en_US-joe-medium")
        messages = await peer.until(agent_event(BotStarted), timeout=60)
        arrivals["bot_started"] = loop.time()
        messages += await peer.until(agent_event(BotStopped), timeout=60)
        arrivals["bot_stopped"] = loop.time()
        await asyncio.sleep(0.5)  # the tail of the reply still crossing the jitter buffers
        peer.send(StopListening())
        async with httpx.AsyncClient(trust_env=False) as http:
            text = (await http.get(f"{talk_server.http}/metrics")).text
    finally:
        await peer.close()
        player.audio.stop()

    assert not [m for m in messages if isinstance(m, Error)]
    events = [m.event for m in messages if isinstance(m, AgentMessage)]
    (heard,) = [e for e in events if isinstance(e, TranscriptEvent)]
    assert word_error_rate([REQUEST], [heard.text]) <= 0.5, heard.text
    (metrics,) = [e for e in events if isinstance(e, TurnMetrics)]
    assert metrics.voice_to_voice_ms is not None and metrics.voice_to_voice_ms > 0
    assert "voxflow_agent_turns_total 1.0" in text

    # Silent before the answer, then the bot saying the person's words.
    before = peer.loud_frames() - peer.loud_frames(since=arrivals["bot_started"] - 0.5)
    assert before == 0
    assert peer.loud_frames(since=arrivals["bot_started"] - 0.5) > 25
    assert {rate for _, rate, _ in peer.audio} == {48000}
    answer = peer.heard(arrivals["bot_started"] - 0.2, arrivals["bot_stopped"] + 0.5)
    spoken = transcribe(answer, 48000)
    assert word_error_rate([heard.text], [spoken]) <= 0.5, spoken

    await until(lambda: len(registry(talk_server)) == 0, 15, poll=0.05)
    await asyncio.sleep(0.5)
    assert await server_tasks(talk_server) == []
    assert not talk_server.state.conversations
