"""voxflow.integrations.livekit through LiveKit's own stream() and synthesize() against a live
server: the frames and timed words LiveKit hands on are checked against what the server sent."""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import AsyncIterable

import pytest
from livekit.agents import APIConnectionError, APIConnectOptions, APIStatusError
from livekit.agents.tts import SynthesizedAudio
from livekit.agents.types import USERDATA_TIMED_TRANSCRIPT, TimedString

from server_harness import RunningServer, free_port
from test_client import LONG_TEXT, SENTENCE, TIMEOUT, Wire, drop_connections, plain_words, stream_url, tap_wire
from voxflow.client import StyleSpec
from voxflow.errors import VoxflowError
from voxflow.integrations.livekit import TTS
from voxflow.streaming.tokens import gpt_like_tokens
from voxflow.transports.protocols.native_protocol import Cancelled, Done, Metrics, Ready, Start, Text, Word
from waiting import until

RATE = 24000
FRAME_SECONDS = 0.02


async def collect(stream: AsyncIterable[SynthesizedAudio]) -> list[SynthesizedAudio]:
    async with asyncio.timeout(TIMEOUT):
        return [event async for event in stream]


def opened(wire: Wire) -> list[Start]:
    return [m for m in wire.sent if isinstance(m, Start)]


def sockets(wire: Wire) -> int:
    return len([m for m in wire.received if isinstance(m, Ready)])


def voxflow_tasks() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("voxflow-")]


def check_segment(events: list[SynthesizedAudio], wire: Wire, context_id: str, text: str) -> None:
    """The segment's audio and timed words are the server's, timed from the segment's first audio."""
    assert events and all(e.request_id == context_id for e in events)
    assert all(e.frame.sample_rate == RATE and e.frame.num_channels == 1 for e in events)
    assert events[-1].is_final and not any(e.is_final for e in events[:-1])
    [metrics] = [m for m in wire.of(context_id) if isinstance(m, Metrics)]
    assert sum(e.frame.duration for e in events) == pytest.approx(metrics.audio_seconds, abs=FRAME_SECONDS)

    server_words = [m for m in wire.of(context_id) if isinstance(m, Word)]
    words: list[TimedString] = []
    offset = 0.0
    for event in events:
        for word in event.frame.userdata.get(USERDATA_TIMED_TRANSCRIPT, []):
            # A word rides on the first frame sent after the server announced it, ahead of its audio.
            assert offset <= word.start_time + FRAME_SECONDS, (word, offset)
            words.append(word)
        offset += event.frame.duration
    assert [w.strip() for w in words] == [w.word for w in server_words]
    assert [w.start_time for w in words] == pytest.approx([w.start for w in server_words], abs=FRAME_SECONDS)
    assert [w.end_time for w in words] == pytest.approx([w.end for w in server_words], abs=FRAME_SECONDS)
    assert [w.strip(" ,.!?").lower() for w in words] == plain_words(text)
    assert "".join(words).strip() == text  # the transcript LiveKit rebuilds from them


async def test_a_stream_speaks_tokens_with_aligned_words(server: RunningServer) -> None:
    with tap_wire() as wire:
        tts = TTS(url=stream_url(server))
        tts.prewarm()
        await until(lambda: sockets(wire) == 1, TIMEOUT)
        async with tts.stream() as stream:
            for token in gpt_like_tokens(SENTENCE):
                stream.push_text(token)
            stream.end_input()
            events = await collect(stream)
        await tts.aclose()
    [start] = opened(wire)
    assert (start.sample_rate, start.style, start.voice) == (RATE, None, None)
    assert "".join(m.text for m in wire.sent if isinstance(m, Text)) == SENTENCE
    assert isinstance(wire.of(start.context)[-1], Done)
    check_segment(events, wire, start.context, SENTENCE)
    assert {e.segment_id for e in events} == {start.context}
    assert sockets(wire) == 1  # the prewarmed socket was used


async def test_synthesize_speaks_a_whole_text(server: RunningServer) -> None:
    with tap_wire() as wire:
        tts = TTS(url=stream_url(server), style="serious", speed=0.9)
        async with tts.synthesize(SENTENCE) as chunked:
            events = await collect(chunked)
        await tts.aclose()
    [start] = opened(wire)
    assert start.style == StyleSpec(preset="serious", speed=0.9)
    assert [m.text for m in wire.sent if isinstance(m, Text)] == [SENTENCE]
    check_segment(events, wire, start.context, SENTENCE)


async def test_two_streams_share_one_socket_and_stay_apart(server: RunningServer) -> None:
    texts = ("Good morning to you.", "The weather is lovely today.")

    async def speak(text: str) -> list[SynthesizedAudio]:
        async with tts.stream() as stream:
            stream.push_text(text)
            stream.end_input()
            return await collect(stream)

    with tap_wire() as wire:
        tts = TTS(url=stream_url(server))
        first = asyncio.create_task(speak(texts[0]))
        await until(lambda: len(opened(wire)) == 1, TIMEOUT)
        tts.update_options(style="calm", speed=1.2)
        results = await asyncio.gather(first, speak(texts[1]))
        await tts.aclose()
    starts = opened(wire)
    assert [s.style for s in starts] == [None, StyleSpec(preset="calm", speed=1.2)]
    assert sockets(wire) == 1
    for start, events, text in zip(starts, results, texts):
        check_segment(events, wire, start.context, text)


async def test_closing_a_stream_cancels_its_context_at_once(server: RunningServer) -> None:
    with tap_wire() as wire:
        tts = TTS(url=stream_url(server))
        stream = tts.stream()
        stream.push_text(LONG_TEXT)
        stream.end_input()
        heard = [await asyncio.wait_for(anext(stream), TIMEOUT)]
        await stream.aclose()
        [start] = opened(wire)
        await until(lambda: any(isinstance(m, Cancelled) for m in wire.of(start.context)), TIMEOUT)
        assert sorted(voxflow_tasks()) == ["voxflow-client-reader", "voxflow-client-writer"]  # the socket's own
        await tts.aclose()
    assert not any(isinstance(m, Done) for m in wire.of(start.context))
    assert heard[0].frame.duration < 1
    await until(lambda: not voxflow_tasks(), TIMEOUT)


async def test_server_errors_are_livekit_errors(server: RunningServer) -> None:
    tts = TTS(url=stream_url(server), voice="nobody")
    with pytest.raises(APIStatusError) as info:
        async with tts.synthesize("Hello.") as chunked:
            await collect(chunked)
    await tts.aclose()
    assert info.value.status_code == 404 and not info.value.retryable
    assert "unknown_voice" in info.value.message


async def test_an_unreachable_server_is_a_connection_error() -> None:
    tts = TTS(url=f"ws://127.0.0.1:{free_port()}/v1/stream")
    with pytest.raises(APIConnectionError):
        async with tts.stream(conn_options=APIConnectOptions(max_retry=0, timeout=2)) as stream:
            stream.push_text("Hello.")
            stream.end_input()
            await collect(stream)
    await tts.aclose()
    assert not voxflow_tasks()


async def test_a_dropped_socket_fails_the_stream_and_the_next_one_reconnects(server: RunningServer) -> None:
    with tap_wire() as wire:
        tts = TTS(url=stream_url(server))
        async with tts.stream() as stream:
            stream.push_text(LONG_TEXT)
            stream.end_input()
            await asyncio.wait_for(anext(stream), TIMEOUT)
            await drop_connections(server)
            with pytest.raises(APIConnectionError, match="connection_lost"):
                await collect(stream)
        async with tts.stream() as stream:
            stream.push_text("We are back.")
            stream.end_input()
            events = await collect(stream)
        await tts.aclose()
    lost, back = opened(wire)
    assert sockets(wire) == 2
    check_segment(events, wire, back.context, "We are back.")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sample_rate": 11025}, "sample_rate must be one of"),
        ({"style": "grumpy"}, "unknown style 'grumpy'"),
        ({"speed": 3.0}, "speed must be a number in"),
    ],
)
def test_bad_options_fail_when_the_plugin_is_made(options: dict, message: str) -> None:
    with pytest.raises(VoxflowError, match=message) as info:
        TTS(**options)
    assert info.value.code == "invalid_request"


def test_importing_without_livekit_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "livekit.agents", None)
    monkeypatch.delitem(sys.modules, "voxflow.integrations.livekit")
    with pytest.raises(ImportError, match=r"pip install 'voxflow\[livekit\]'"):
        importlib.import_module("voxflow.integrations.livekit")
