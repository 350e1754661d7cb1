"""The client SDK: against a scripted fake server (no engine), then against a live voxflow."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import wave
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
from websockets.asyncio.server import ServerConnection, serve

import server_harness
import voxflow.client as client_module
from voxflow.client import (
    AsyncVoxflowClient,
    Audio,
    Cancelled,
    ConnectionFailed,
    Done,
    Error,
    Event,
    Metrics,
    Unauthorized,
    VoxflowClient,
    Word,
    backoff_delay,
)
from voxflow.errors import StreamClosed, VoxflowError
from voxflow.streaming.tokens import gpt_like_tokens, paced
from voxflow.transports.protocols.native_protocol import (
    AudioPacket,
    Cancel,
    ClientMessage,
    End,
    Limits,
    Ready,
    ServerMessage,
    Start,
    Started,
    Text,
    pack_audio,
    parse_client,
    parse_server,
    serialize_client,
    serialize_server,
)

TIMEOUT = 60  # seconds for anything that waits on synthesis; nothing here asserts on speed
SENTENCE = "Please remember to call your mother this evening."
LONG_TEXT = " ".join(["The river ran quietly past the old mill while the town slept."] * 6)
READY = Ready(("fake-voice",), "fake-voice", Limits(8, 10_000, 100_000))

Handler = Callable[[ServerConnection], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_server(handler: Handler) -> AsyncIterator[str]:
    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/v1/stream"


def fast_client(url: str, **options: float) -> AsyncVoxflowClient:
    return AsyncVoxflowClient(url, connect_timeout=5, backoff_initial=0.01, backoff_max=0.05, **options)


async def events_of(ctx: AsyncIterator[Event]) -> list[Event]:
    async with asyncio.timeout(TIMEOUT):
        return [event async for event in ctx]


def plain_words(text: str) -> list[str]:
    return [w.strip(",.!?;:").lower() for w in text.split()]


@dataclass
class Wire:
    """The messages SDK clients sent and received while `tap_wire` ran, in order."""

    sent: list[ClientMessage] = field(default_factory=list)
    received: list[ServerMessage | AudioPacket] = field(default_factory=list)

    def of(self, context: str) -> list[ServerMessage | AudioPacket]:
        """The server's messages for one context."""
        return [m for m in self.received if getattr(m, "context", None) == context]


@contextlib.contextmanager
def tap_wire() -> Iterator[Wire]:
    """Record what every SDK client exchanges with its server: for tests of code built on the
    SDK (the framework plugins), which check what they pass on against what the server sent."""
    wire = Wire()

    def parse(data: str | bytes) -> ServerMessage | AudioPacket:
        wire.received.append(message := parse_server(data))
        return message

    def serialize(message: ClientMessage) -> str | bytes:
        wire.sent.append(message)
        return serialize_client(message)

    with (
        mock.patch.object(client_module, "parse_server", parse),
        mock.patch.object(client_module, "serialize_client", serialize),
    ):
        yield wire


async def drop_connections(server: server_harness.RunningServer) -> None:
    """Abort every connection the server holds, as a network failure would (no closing handshake)."""

    async def drop() -> None:
        for protocol in list(server.server.server_state.connections):
            protocol.transport.abort()

    await asyncio.to_thread(server.call, drop)


# -- no server --------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_with_jitter_in_the_upper_half():
    ceilings = [backoff_delay(n, 0.2, 5.0, rand=lambda: 1.0) for n in range(8)]
    assert ceilings == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])
    floors = [backoff_delay(n, 0.2, 5.0, rand=lambda: 0.0) for n in range(8)]
    assert floors == pytest.approx([c / 2 for c in ceilings])
    assert backoff_delay(10_000, 0.2, 5.0) <= 5.0  # no overflow for long outages


async def test_connect_gives_up_after_the_retries(monkeypatch):
    waits: list[int] = []

    def no_wait(attempt: int, initial: float, maximum: float) -> float:
        waits.append(attempt)
        return 0.0

    monkeypatch.setattr(client_module, "backoff_delay", no_wait)
    port = server_harness.free_port()  # nothing listens there
    client = AsyncVoxflowClient(f"ws://127.0.0.1:{port}/v1/stream", max_retries=3)
    with pytest.raises(ConnectionFailed) as info:
        await client.connect()
    assert info.value.code == "connection_failed"
    assert waits == [0, 1, 2]


async def test_a_refused_key_is_not_retried():
    connections = 0

    async def refuse(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        await ws.send(serialize_server(Error(None, "unauthorized", "missing or invalid API key")))
        await ws.close(4001, "unauthorized")

    async with fake_server(refuse) as url:
        with pytest.raises(Unauthorized):
            await fast_client(url, max_retries=5).connect()
    assert connections == 1


async def test_a_busy_server_is_retried_until_it_takes_the_connection():
    connections = 0

    async def busy_once(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:
            await ws.send(serialize_server(Error(None, "limit_exceeded", "at most 64 connections")))
            await ws.close(1013, "limit_exceeded")
            return
        await ws.send(serialize_server(READY))
        await ws.wait_closed()

    async with fake_server(busy_once) as url:
        async with fast_client(url) as client:
            assert client.ready == READY
    assert connections == 2


async def test_events_are_typed_and_routed_to_their_context():
    """The server script interleaves two contexts; each sees only its own events, in order."""
    received: list[object] = []

    async def script(ws: ServerConnection) -> None:
        await ws.send(serialize_server(READY))
        for _ in range(6):  # start, text, end for each of two contexts
            received.append(parse_client(await ws.recv()))
        await ws.send(serialize_server(Started("a", "fake-voice", 16000, "pcm_s16le", 20)))
        await ws.send(serialize_server(Started("b", "fake-voice", 24000, "pcm_s16le", 20)))
        await ws.send(serialize_server(Word("a", "Hi", 0.0, 0.1)))
        await ws.send(pack_audio("a", 0, 0.0, b"\x01\x00" * 320))
        await ws.send(pack_audio("b", 0, 0.0, b"\x02\x00" * 480))
        await ws.send(pack_audio("a", 1, 0.02, b"\x03\x00" * 320))
        await ws.send(serialize_server(Metrics("a", 12.5, 0.1, 0.04)))
        await ws.send(serialize_server(Done("a")))
        await ws.send(serialize_server(Cancelled("b")))
        await ws.wait_closed()

    async with fake_server(script) as url, fast_client(url) as client:
        a = await client.context(style="happy", context_id="a").start()
        b = await client.context(sample_rate=24000, context_id="b").start()
        for ctx, text in ((a, "Hi"), (b, "Bye")):
            ctx.push(text)
            ctx.end()
        events_a, events_b = await asyncio.gather(events_of(a), events_of(b))

    assert received[:3] == [Start("a", style="happy"), Start("b", sample_rate=24000), Text("a", "Hi")]
    assert received[3:] == [End("a"), Text("b", "Bye"), End("b")]
    assert events_a == [
        Word("a", "Hi", 0.0, 0.1),
        Audio(b"\x01\x00" * 320, 0, 0.0, 16000, "a"),
        Audio(b"\x03\x00" * 320, 1, 0.02, 16000, "a"),
        Metrics("a", 12.5, 0.1, 0.04),
        Done("a"),
    ]
    assert events_b == [Audio(b"\x02\x00" * 480, 0, 0.0, 24000, "b"), Cancelled("b")]
    assert a.sample_rate == 16000 and a.voice == "fake-voice"


async def test_push_rules_and_long_text_split_under_the_message_limit():
    limits = Limits(8, 120, 100_000)
    texts: list[str] = []
    got_end = asyncio.Event()

    async def script(ws: ServerConnection) -> None:
        await ws.send(serialize_server(Ready(("v",), "v", limits)))
        async for data in ws:
            assert len(data) <= limits.max_message_chars
            msg = parse_client(data)
            if isinstance(msg, Text):
                texts.append(msg.text)
            elif isinstance(msg, End):
                got_end.set()

    text = 'He said "hi" \\ and then ' * 20 + "naïve café 🎉"
    async with fake_server(script) as url, fast_client(url) as client:
        ctx = client.context()
        with pytest.raises(VoxflowError):
            ctx.push("before start")
        await ctx.start()
        ctx.push("")  # what an LLM stream's empty deltas turn into: nothing is sent
        ctx.push(text)
        ctx.end()
        with pytest.raises(StreamClosed):
            ctx.push("after end")
        await asyncio.wait_for(got_end.wait(), TIMEOUT)
    assert len(texts) > 1
    assert "".join(texts) == text


async def test_an_error_ends_the_context_and_releases_it_on_the_server():
    cancels: list[Cancel] = []

    async def script(ws: ServerConnection) -> None:
        await ws.send(serialize_server(READY))
        start = parse_client(await ws.recv())
        await ws.send(serialize_server(Started(start.context, "fake-voice", 16000, "pcm_s16le", 20)))
        await ws.send(serialize_server(Error(start.context, "limit_exceeded", "context over 100000 characters")))
        async for data in ws:
            if isinstance(msg := parse_client(data), Cancel):
                cancels.append(msg)
                await ws.send(serialize_server(Cancelled(msg.context)))

    async with fake_server(script) as url, fast_client(url) as client:
        async with client.context() as ctx:
            with pytest.raises(VoxflowError) as info:
                await asyncio.wait_for(ctx.collect(), TIMEOUT)
            ctx.push("ignored: the context is over")
        assert info.value.code == "limit_exceeded"
        for _ in range(100):
            if cancels:
                break
            await asyncio.sleep(0.05)
    assert cancels == [Cancel(ctx.id)]


async def test_a_consumer_that_stops_reading_holds_the_connection_until_it_leaves():
    """The documented backpressure: a full queue makes the reader wait, for every context."""

    async def script(ws: ServerConnection) -> None:
        await ws.send(serialize_server(READY))
        for _ in range(2):
            start = parse_client(await ws.recv())
            await ws.send(serialize_server(Started(start.context, "fake-voice", 16000, "pcm_s16le", 20)))
        for seq in range(10):
            await ws.send(pack_audio("slow", seq, seq * 0.02, b"\x00\x00" * 320))
        await ws.send(serialize_server(Done("fast")))
        await ws.wait_closed()

    async with fake_server(script) as url, fast_client(url, queue_size=2) as client:
        slow = await client.context(context_id="slow").start()
        fast = await client.context(context_id="fast").start()
        pending = asyncio.create_task(anext(fast))
        done, _ = await asyncio.wait({pending}, timeout=0.5)
        assert not done  # "fast" is done on the server, but its event waits behind "slow"'s
        slow.detach()
        assert await asyncio.wait_for(pending, TIMEOUT) == Done("fast")


async def test_a_dropped_connection_ends_its_contexts_and_the_client_reconnects():
    connections = 0

    async def drop_first(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        await ws.send(serialize_server(READY))
        start = parse_client(await ws.recv())
        await ws.send(serialize_server(Started(start.context, "fake-voice", 16000, "pcm_s16le", 20)))
        if connections == 1:
            await ws.close(1011, "crash")
            return
        await ws.send(serialize_server(Done(start.context)))
        await ws.wait_closed()

    async with fake_server(drop_first) as url, fast_client(url) as client:
        first = await client.context().start()
        events = await events_of(first)
        assert [type(e) for e in events] == [Error]
        assert events[0].code == "connection_lost"
        first.push("ignored after the loss")
        second = await client.context().start()
        assert await events_of(second) == [Done(second.id)]
    assert connections == 2


# -- a live server ------------------------------------------------------------------------------


def stream_url(server: server_harness.RunningServer) -> str:
    return server.ws + "/v1/stream"


async def test_speaks_a_sentence(server):
    async with AsyncVoxflowClient(stream_url(server)) as client, client.context() as ctx:
        ctx.push(SENTENCE)
        ctx.end()
        events = await events_of(ctx)
    audio = [e for e in events if isinstance(e, Audio)]
    words = [e for e in events if isinstance(e, Word)]
    metrics = [e for e in events if isinstance(e, Metrics)]
    assert isinstance(events[-1], Done)
    assert [e.seq for e in audio] == list(range(len(audio)))
    seconds = sum(len(e.pcm) for e in audio) / 2 / ctx.sample_rate
    assert ctx.sample_rate == 22050
    assert 1.0 < seconds < 15.0
    assert [w.word.strip(",.").lower() for w in words] == plain_words(SENTENCE)
    assert len(metrics) == 1 and metrics[0].audio_seconds == pytest.approx(seconds, abs=0.05)


async def test_speak_takes_llm_tokens(server):
    async with AsyncVoxflowClient(stream_url(server)) as client:
        speech = await asyncio.wait_for(
            client.speak(paced(gpt_like_tokens(SENTENCE), 200), style="calm", sample_rate=16000), TIMEOUT
        )
    assert speech.sample_rate == 16000
    assert 1.0 < speech.duration < 20.0
    assert [w.word.strip(",.").lower() for w in speech.words] == plain_words(SENTENCE)
    assert speech.metrics is not None and speech.metrics.first_audio_ms is not None


async def test_two_contexts_at_once_on_one_connection(server):
    texts = ("Good morning to you.", "The weather is lovely today.")
    async with AsyncVoxflowClient(stream_url(server)) as client:
        results = await asyncio.gather(*(client.speak(t) for t in texts))
    for text, speech in zip(texts, results):
        assert [w.word.strip(",.").lower() for w in speech.words] == plain_words(text)
        assert speech.duration > 0.5


async def test_cancel_stops_the_context(server):
    async with AsyncVoxflowClient(stream_url(server)) as client, client.context() as ctx:
        ctx.push(LONG_TEXT)
        ctx.end()
        events: list[Event] = []
        async with asyncio.timeout(TIMEOUT):
            async for event in ctx:
                events.append(event)
                if isinstance(event, Audio) and event.seq == 0:
                    ctx.cancel()
    assert isinstance(events[-1], Cancelled)
    assert not any(isinstance(e, Done) for e in events)
    heard = sum(len(e.pcm) for e in events if isinstance(e, Audio)) / 2 / ctx.sample_rate
    assert heard < 20.0  # the whole text would be well over a minute


async def test_audio_helper_yields_only_pcm(server):
    async with AsyncVoxflowClient(stream_url(server)) as client, client.context(frame_ms=40) as ctx:
        ctx.push("Hello there.")
        ctx.end()
        async with asyncio.timeout(TIMEOUT):
            chunks = [pcm async for pcm in ctx.audio()]
    assert chunks and all(isinstance(c, bytes) for c in chunks)
    assert len(chunks[0]) == 2 * 22050 * 40 // 1000


async def test_unknown_voice_is_an_error_event(server):
    async with AsyncVoxflowClient(stream_url(server)) as client, client.context(voice="nobody") as ctx:
        ctx.push("Hello.")
        ctx.end()
        events = await events_of(ctx)
    assert len(events) == 1 and isinstance(events[0], Error)
    assert events[0].code == "unknown_voice"


def test_sync_client(server):
    with VoxflowClient(stream_url(server)) as client:
        speech = client.speak(iter(gpt_like_tokens("Hello there, friend.")))
        with client.context() as ctx:
            ctx.push("One more.")
            ctx.end()
            events = list(ctx)
    assert speech.duration > 0.5
    assert [w.word.strip(",.").lower() for w in speech.words] == ["hello", "there", "friend"]
    assert any(isinstance(e, Audio) for e in events) and isinstance(events[-1], Done)


async def test_connects_once_the_server_comes_up(engine, monkeypatch):
    port = server_harness.free_port()
    monkeypatch.setattr(server_harness, "free_port", lambda: port)
    client = AsyncVoxflowClient(f"ws://127.0.0.1:{port}/v1/stream", max_retries=200, backoff_initial=0.05, backoff_max=0.3)
    connecting = asyncio.create_task(client.connect())
    await asyncio.sleep(0.5)
    assert not connecting.done()  # still retrying: nothing listens yet
    with contextlib.ExitStack() as stack:
        await asyncio.to_thread(stack.enter_context, server_harness.run_server(engine))
        try:
            await asyncio.wait_for(connecting, TIMEOUT)
            assert client.connected
            speech = await asyncio.wait_for(client.speak("Hello."), TIMEOUT)
            assert speech.duration > 0.2
        finally:
            await client.aclose()
            await asyncio.to_thread(stack.close)


async def test_server_restart_loses_in_flight_contexts_and_reconnects(engine, monkeypatch):
    port = server_harness.free_port()
    monkeypatch.setattr(server_harness, "free_port", lambda: port)
    url = f"ws://127.0.0.1:{port}/v1/stream"
    client = AsyncVoxflowClient(url, max_retries=200, backoff_initial=0.05, backoff_max=0.3)
    with contextlib.ExitStack() as first, contextlib.ExitStack() as second:
        await asyncio.to_thread(first.enter_context, server_harness.run_server(engine))
        try:
            ctx = await client.context().start()
            ctx.push("This sentence is left open, so the context is still in flight")
            ctx.flush()
            assert isinstance(await asyncio.wait_for(anext(ctx), TIMEOUT), (Audio, Word))
            await asyncio.to_thread(first.close)
            async with asyncio.timeout(TIMEOUT):
                rest = [event async for event in ctx]
            assert isinstance(rest[-1], Error) and rest[-1].code == "connection_lost"

            await asyncio.to_thread(second.enter_context, server_harness.run_server(engine))
            speech = await asyncio.wait_for(client.speak("We are back."), TIMEOUT)
            assert speech.duration > 0.3
        finally:
            await client.aclose()


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXFLOW_")}
    return subprocess.run(
        [sys.executable, "-m", "voxflow.cli", "speak", *args], cwd=cwd, env=env, capture_output=True, timeout=120, check=False
    )


def test_cli_speak_writes_a_wav(server, tmp_path):
    proc = run_cli("--server", server.ws, SENTENCE, "-o", "out.wav", "--json", "--tps", "100", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    figures = json.loads(proc.stdout)
    assert figures["first_audio_ms"] > 0
    assert figures["server_first_audio_ms"] > 0
    assert figures["words"] == len(SENTENCE.split())
    with wave.open(str(tmp_path / "out.wav")) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 22050)
        assert wav.getnframes() / 22050 == pytest.approx(figures["audio_seconds"], abs=0.05)


def test_cli_speak_raw_pcm_to_stdout(server, tmp_path):
    proc = run_cli("--server", stream_url(server), "Hello there.", "-o", "-", "--rate", "16000", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    figures = json.loads(proc.stderr.decode().strip().splitlines()[-1])
    assert figures["sample_rate"] == 16000 and figures["output"] is None
    assert len(proc.stdout) == pytest.approx(figures["audio_seconds"] * 16000 * 2, abs=0.05 * 16000 * 2)
