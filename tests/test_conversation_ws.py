"""Conversations with the agent over the native WebSocket on a live server: a real websockets
client streams an engine-made call in real time and hears the echo agent answer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from conversation_audio import compose, to_pcm16
from server_harness import RunningServer, run_server, shrink_server_send_buffers, small_buffer_socket
from speech import transcribe, word_error_rate
import waiting
from test_native_ws import closed_with, greeted, open_socket, receive, wait_for
from voxflow.agent.asr import RecognitionError
from voxflow.agent.events import BotStarted, BotStopped, ReplyEvent, SpeechStarted, SpeechStopped, TranscriptEvent, TurnMetrics
from voxflow.transports.protocols.native_protocol import (
    AgentMessage,
    AudioPacket,
    Error,
    Listen,
    Listening,
    Ping,
    Pong,
    StopListening,
    parse_server,
    serialize_client,
)

# Heard by pocketsphinx on a fresh decoder (the module's first turn) with the decoder in either
# precision; "turn on the kitchen lights" in bfloat16 came out as "from the kitchen life".
REQUEST = "please turn on the kitchen lights"
CHUNK_MS = 20


@pytest.fixture(scope="module")
def talk_server(engine):
    with run_server(engine, agent={"max_conversations": 2}) as running:
        yield running


@pytest.fixture(scope="module")
def call(engine):
    """A person saying REQUEST between stretches of silence, as 16 kHz PCM16."""
    made = compose(engine, [("silence", 1.0), ("say", REQUEST), ("silence", 3.0)], seed=11)
    return to_pcm16(made.audio)


async def stream(ws: ClientConnection, pcm: bytes, rate: int = 16000) -> None:
    """Microphone audio in real time: each 20 ms chunk when it would have finished arriving."""
    step = rate * CHUNK_MS // 1000 * 2
    loop = asyncio.get_running_loop()
    start = loop.time()
    for index, offset in enumerate(range(0, len(pcm), step)):
        if (wait := start + (index + 1) * CHUNK_MS / 1000 - loop.time()) > 0:
            await asyncio.sleep(wait)
        await ws.send(pcm[offset : offset + step])


class Talker:
    """A client with a conversation: everything the server sends is collected as it comes."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.messages: list = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                self.messages.append(parse_server(data))
        except ConnectionClosed:
            pass

    async def send(self, *messages) -> None:
        for msg in messages:
            await self.ws.send(serialize_client(msg) if not isinstance(msg, bytes) else msg)

    async def stream(self, pcm: bytes) -> None:
        await stream(self.ws, pcm)

    async def until(self, found: Callable[[list], object], seconds: float = 60) -> None:
        await waiting.until(lambda: found(self.messages), seconds, poll=0.02)  # a hang, not a timing target

    def events(self, kind: type | None = None) -> list:
        events = [m.event for m in self.messages if isinstance(m, AgentMessage)]
        return [e for e in events if kind is None or isinstance(e, kind)]

    def errors(self) -> list[Error]:
        return [m for m in self.messages if isinstance(m, Error)]

    def audio(self, context: str) -> list[AudioPacket]:
        return [m for m in self.messages if isinstance(m, AudioPacket) and m.context == context]

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


async def talker(server: RunningServer, **listen) -> Talker:
    ws = await open_socket(server)
    await greeted(ws)
    await ws.send(serialize_client(Listen(**listen)))
    acknowledged = await receive(ws)
    assert isinstance(acknowledged, Listening), acknowledged
    return Talker(ws)


def turn_over(turn: int) -> Callable[[list], bool]:
    """The turn's metrics are out and its reply has played (or there was none)."""

    def check(messages: list) -> bool:
        events = [m.event for m in messages if isinstance(m, AgentMessage)]
        metrics = any(isinstance(e, TurnMetrics) and e.turn == turn for e in events)
        stopped = any(isinstance(e, BotStopped) and e.turn == turn for e in events)
        return metrics and stopped

    return check


async def metrics_text(server: RunningServer) -> str:
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
        return (await http.get(f"{server.http}/metrics")).text


def sample(text: str, name: str) -> float:
    """One unlabelled sample's value from Prometheus text."""
    (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])


async def conversation_leftovers(server: RunningServer) -> tuple[int, list[str]]:
    """Open conversations and every voxflow task (agent, conversation, synthesis) on the server."""

    async def probe():
        names = sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("voxflow-"))
        return len(server.state.conversations), names

    return await asyncio.to_thread(server.call, probe)


async def nothing_left(server: RunningServer) -> bool:
    return await conversation_leftovers(server) == (0, [])


# -- a whole turn ------------------------------------------------------------------------------


async def test_a_spoken_request_is_answered_in_voice(talk_server, call):
    before = await metrics_text(talk_server)
    client = await talker(talk_server, sample_rate=16000, output_sample_rate=24000)
    try:
        await client.stream(call)
        await client.until(turn_over(1))
        assert sample(await metrics_text(talk_server), "voxflow_agent_conversations") == 1
    finally:
        await client.close()
    await wait_for(lambda: nothing_left(talk_server))

    kinds = [type(e) for e in client.events()]
    for kind in (SpeechStarted, SpeechStopped, TranscriptEvent, ReplyEvent, BotStarted, TurnMetrics, BotStopped):
        assert kinds.count(kind) == 1, kinds
    assert kinds.index(SpeechStarted) < kinds.index(SpeechStopped) < kinds.index(TranscriptEvent) < kinds.index(BotStarted)
    (heard,) = client.events(TranscriptEvent)
    assert word_error_rate([REQUEST], [heard.text]) <= 0.5, heard.text
    (reply,) = client.events(ReplyEvent)
    assert reply.text.split() == heard.text.split()  # the echo model
    (metrics,) = client.events(TurnMetrics)
    assert metrics.voice_to_voice_ms is not None and metrics.voice_to_voice_ms > 0
    assert client.errors() == []

    frames = client.audio("reply-1")
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert all(len(f.pcm) == 24000 * CHUNK_MS // 1000 * 2 for f in frames)
    pcm = np.frombuffer(b"".join(f.pcm for f in frames), "<i2").astype(np.float32) / 32768
    spoken = transcribe(pcm, 24000)
    assert word_error_rate([REQUEST], [spoken]) <= 0.5, spoken
    assert {m.context for m in client.messages if isinstance(m, AudioPacket)} == {"reply-1"}

    after = await metrics_text(talk_server)
    for name in ("voxflow_agent_turns_total", "voxflow_agent_voice_to_voice_seconds_count", "voxflow_agent_asr_seconds_count",
                 "voxflow_agent_llm_first_token_seconds_count", "voxflow_agent_tts_first_audio_seconds_count"):
        assert sample(after, name) == sample(before, name) + 1, name
    assert "voxflow_agent_barge_in_stop_seconds_count" in after and "voxflow_agent_interruptions_total" in after
    assert sample(after, "voxflow_agent_conversations") == 0


async def test_bad_audio_is_refused_and_the_conversation_goes_on(talk_server, call):
    client = await talker(talk_server)  # 16 kHz in, 24 kHz out by default
    try:
        await client.send(b"\x00\x01\x02", bytes(2 * 16000 + 2), b"")
        await client.until(lambda m: len(client.errors()) == 2, seconds=10)
        assert [(e.code, e.context) for e in client.errors()] == [("invalid_audio", None)] * 2
        await client.stream(call)
        await client.until(lambda m: client.events(TranscriptEvent))
    finally:
        await client.close()
    (heard,) = client.events(TranscriptEvent)
    assert word_error_rate([REQUEST], [heard.text]) <= 0.5, heard.text


# -- the protocol's rules ----------------------------------------------------------------------


async def test_listen_rules(talk_server):
    async with open_socket(talk_server) as ws:
        await greeted(ws)
        cases = [
            (b"\x00\x00", "binary_not_expected"),
            (serialize_client(StopListening()), "not_listening"),
            ('{"type": "listen", "sample_rate": 11025}', "invalid_request"),
            ('{"type": "listen", "sample_rate": 16000.0}', "invalid_request"),
            ('{"type": "listen", "output_sample_rate": 12345}', "invalid_request"),
            ('{"type": "listen", "encoding": "opus"}', "invalid_request"),
            ('{"type": "listen", "style": "furious"}', "invalid_request"),
            (serialize_client(Listen(voice="nobody")), "unknown_voice"),
        ]
        for data, code in cases:
            await ws.send(data)
            answer = await receive(ws)
            assert (type(answer), answer.code) == (Error, code), data
        await ws.send(serialize_client(Listen(sample_rate=48000, output_sample_rate=16000, style="calm")))
        assert await receive(ws) == Listening(48000, 16000, 20, "en_US-joe-medium")
        await ws.send(serialize_client(Listen()))
        assert (await receive(ws)).code == "already_listening"
        await ws.send(bytes(960))  # 10 ms at 48 kHz: taken without an answer
        await ws.send(serialize_client(StopListening()))
        await ws.send(serialize_client(Ping("after")))
        assert await receive(ws) == Pong("after")
        await ws.send(b"\x00\x00")
        assert (await receive(ws)).code == "binary_not_expected"
    await wait_for(lambda: nothing_left(talk_server))


async def test_max_conversations_and_room_again_after_one_ends(talk_server):
    first, second = await talker(talk_server), await talker(talk_server)
    try:
        async with open_socket(talk_server) as third:
            await greeted(third)
            await third.send(serialize_client(Listen()))
            refused = await receive(third)
            assert (type(refused), refused.code) == (Error, "limit_exceeded")
            assert sample(await metrics_text(talk_server), "voxflow_agent_conversations") == 2
            await first.send(StopListening(), Ping("stopped"))
            await first.until(lambda m: Pong("stopped") in m, seconds=10)
            await third.send(serialize_client(Listen()))
            assert isinstance(await receive(third), Listening)
    finally:
        await first.close()
        await second.close()
    await wait_for(lambda: nothing_left(talk_server))
    assert sample(await metrics_text(talk_server), "voxflow_agent_conversations") == 0


async def test_a_client_vanishing_mid_reply_leaves_no_task(talk_server, call):
    client = await talker(talk_server)
    streaming = asyncio.create_task(client.stream(call))
    try:
        await client.until(lambda m: client.audio("reply-1"))
        assert (await conversation_leftovers(talk_server))[1]  # the agent is at work
    finally:
        streaming.cancel()
        await asyncio.gather(streaming, return_exceptions=True)
    client.ws.transport.abort()  # no closing handshake, as when a client crashes
    await wait_for(lambda: nothing_left(talk_server))
    assert sample(await metrics_text(talk_server), "voxflow_agent_conversations") == 0


async def test_drain_ends_the_conversation_and_closes_with_1001(engine):
    with run_server(engine, grace_seconds=5) as srv:
        ws = await open_socket(srv)
        await greeted(ws)
        await ws.send(serialize_client(Listen()))
        assert isinstance(await receive(ws), Listening)
        await ws.send(bytes(640))
        drained = asyncio.create_task(asyncio.to_thread(srv.call, srv.state.drain))
        rest, code = await closed_with(ws)
        await drained
        assert code == 1001 and not [e for e in rest if isinstance(e, Error)]
        await wait_for(lambda: nothing_left(srv))
        async with open_socket(srv) as late:
            refused, _ = await closed_with(late)
        assert [e.code for e in refused] == ["draining"]


async def test_shutdown_ends_an_open_conversation_and_its_plugins(engine):
    with run_server(engine) as srv:
        ws = await open_socket(srv)
        await greeted(ws)
        await ws.send(serialize_client(Listen()))
        assert isinstance(await receive(ws), Listening)
        assert len(srv.state.conversations) == 1
        recognizer = srv.state.recognizer
    # The server shut down with the conversation open.
    assert srv.state.conversations == set()
    with pytest.raises(RecognitionError, match="closed"):
        recognizer.open_session()
    await ws.close()


async def test_a_client_that_stops_reading_loses_its_conversation(engine, call):
    with run_server(engine, send_timeout_seconds=1) as srv:
        sock = small_buffer_socket(srv)
        async with connect(f"{srv.ws}/v1/stream", sock=sock, max_queue=1, proxy=None, compression=None) as ws:
            await greeted(ws)

            await shrink_server_send_buffers(srv)
            await ws.send(serialize_client(Listen(output_sample_rate=48000)))
            streaming = asyncio.create_task(stream(ws, call))
            try:
                await wait_for(lambda: nothing_left(srv), seconds=60)  # not reading at all meanwhile
            finally:
                streaming.cancel()
                await asyncio.gather(streaming, return_exceptions=True)
            assert isinstance(await receive(ws), Listening)  # reading again: the socket is still open
            await ws.send(b"\x00\x00")
            async with asyncio.timeout(30):
                while not isinstance(answer := await receive(ws), Error):
                    pass
    assert answer.code == "binary_not_expected"
