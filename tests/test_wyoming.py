"""The Wyoming server, driven by the `wyoming` package's own client, as Home Assistant drives it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event, async_read_event, async_write_event
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped, SynthesizeVoice

from server_harness import RunningServer, free_port, run_server
from voxflow.errors import InvalidRequest, LimitExceeded
from voxflow.streaming.engine import Engine
from voxflow.transports.protocols.wyoming_protocol import (
    FramingLost, VoiceChoice, choose_voice, parse_event, parse_header,
)
from voxflow.transports.wyoming_server import read_event
from voxflow.voices.voice import VoiceInfo

VOICE = "en_US-joe-medium"
TIMEOUT = 30.0
SMALL_BOUND = 8192  # max_message_bytes of the `limited` server
LONG_TEXT = " ".join(["This sentence keeps the voice busy for a while."] * 20)  # about a minute of speech


@pytest.fixture(scope="module")
def wyoming(engine: Engine) -> Iterator[tuple[RunningServer, int]]:
    port = free_port()
    with run_server(engine, wyoming_url=f"tcp://127.0.0.1:{port}") as running:
        yield running, port


@pytest.fixture(scope="module")
def limited(engine: Engine) -> Iterator[tuple[RunningServer, int]]:
    """Two connections at most, a short send timeout and a small event bound."""
    port = free_port()
    options = {"max_wyoming_connections": 2, "send_timeout_seconds": 2.0, "max_message_bytes": SMALL_BOUND}
    with run_server(engine, wyoming_url=f"tcp://127.0.0.1:{port}", **options) as running:
        yield running, port


@contextlib.asynccontextmanager
async def raw_connection(port: int, rcvbuf: int | None = None) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A plain TCP connection, for bytes no well-behaved client sends; `rcvbuf` is set before
    connecting (a tiny one makes a client that stops reading hold the server up at once)."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        yield reader, writer
    finally:
        writer.transport.abort()


async def assert_closed_by_server(reader: asyncio.StreamReader) -> None:
    """Reads whatever is left until the server closes the connection (a reset counts too)."""
    with contextlib.suppress(ConnectionResetError):
        while await asyncio.wait_for(reader.read(1 << 16), TIMEOUT):
            pass


async def voxflow_tasks() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("voxflow-")]


async def assert_released(server: RunningServer) -> None:
    """Eventually no Wyoming place is held and no synthesis task is left on the server."""
    for _ in range(300):
        places = server.state.admission.counts()["wyoming"]
        tasks = await asyncio.to_thread(server.call, voxflow_tasks)
        if places == 0 and not tasks:
            break
        await asyncio.sleep(0.1)
    assert (places, tasks) == (0, [])


async def read(client: AsyncTcpClient | asyncio.StreamReader) -> Event:
    """The next event from a wyoming client or a raw connection's reader."""
    pending = client.read_event() if isinstance(client, AsyncTcpClient) else async_read_event(client)
    event = await asyncio.wait_for(pending, TIMEOUT)
    assert event is not None, "server closed the connection"
    return event


async def read_until(client: AsyncTcpClient, last: str) -> list[Event]:
    events = [await read(client)]
    while events[-1].type != last:
        events.append(await read(client))
    return events


def pcm_of(events: list[Event]) -> np.ndarray:
    chunks = [AudioChunk.from_event(e) for e in events if AudioChunk.is_type(e.type)]
    assert all((c.rate, c.width, c.channels) == (22050, 2, 1) for c in chunks)
    return np.frombuffer(b"".join(c.audio for c in chunks), dtype=np.int16)


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))


async def test_describe_lists_voices_and_streaming(wyoming: tuple[RunningServer, int]) -> None:
    async with AsyncTcpClient("127.0.0.1", wyoming[1]) as client:
        await client.write_event(Describe().event())
        info = Info.from_event(await read(client))
    (program,) = info.tts
    assert program.supports_synthesize_streaming
    voice = next(v for v in program.voices if v.name == VOICE)
    assert voice.languages == ["en_US"] and voice.installed and voice.attribution.url


async def test_synthesize_whole_text(wyoming: tuple[RunningServer, int]) -> None:
    async with AsyncTcpClient("127.0.0.1", wyoming[1]) as client:
        await client.write_event(Synthesize("The quick brown fox jumps over the lazy dog.", voice=SynthesizeVoice(name=VOICE)).event())
        events = await read_until(client, "audio-stop")
    start = AudioStart.from_event(events[0])
    assert (start.rate, start.width, start.channels) == (22050, 2, 1)
    assert [e.type for e in events].count("audio-start") == 1
    pcm = pcm_of(events)
    assert 1.2 < len(pcm) / 22050 < 5.0
    assert rms(pcm) > 500


async def test_streaming_audio_before_stop(wyoming: tuple[RunningServer, int]) -> None:
    first, rest = "Hello there, this is the first sentence. ", "And here is the second one, a little longer."
    async with AsyncTcpClient("127.0.0.1", wyoming[1]) as client:
        await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name=VOICE)).event())
        await client.write_event(SynthesizeChunk(first).event())
        early = await read_until(client, "audio-chunk")  # before any stop is sent
        await client.write_event(SynthesizeChunk(rest).event())
        # What Home Assistant sends: the whole text once more, for servers that do not stream.
        await client.write_event(Synthesize(first + rest, voice=SynthesizeVoice(name=VOICE)).event())
        await client.write_event(SynthesizeStop().event())
        events = early + await read_until(client, "synthesize-stopped")
    types = [e.type for e in events]
    assert types[0] == "audio-start" and types.count("audio-start") == 1
    assert types[-2:] == ["audio-stop", "synthesize-stopped"] and types.count("audio-stop") == 1
    assert "error" not in types
    seconds = len(pcm_of(events)) / 22050
    assert 3.0 < seconds < 9.0  # both sentences once; the compatibility `synthesize` is not spoken again
    assert rms(pcm_of(events)) > 500


async def test_unknown_voice_is_an_error_and_the_connection_goes_on(wyoming: tuple[RunningServer, int]) -> None:
    async with AsyncTcpClient("127.0.0.1", wyoming[1]) as client:
        await client.write_event(Synthesize("Hello.", voice=SynthesizeVoice(name="xx_XX-nobody-low")).event())
        error = Error.from_event(await read(client))
        assert error.code == "unknown_voice"
        assert AudioStop.is_type((await read(client)).type)  # a waiting client is released
        await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="xx_XX-nobody-low")).event())
        await client.write_event(SynthesizeChunk("Hello.").event())
        await client.write_event(SynthesizeStop().event())
        assert Error.from_event(await read(client)).code == "unknown_voice"
        assert SynthesizeStopped.is_type((await read(client)).type)
        await client.write_event(Describe().event())
        assert Info.is_type((await read(client)).type)


async def test_bad_events_are_errors_and_the_connection_goes_on(wyoming: tuple[RunningServer, int]) -> None:
    async with AsyncTcpClient("127.0.0.1", wyoming[1]) as client:
        await client.write_event(Event(type="no-such-event", data={"x": 1}))
        assert Error.from_event(await read(client)).code == "unknown_event"
        await client.write_event(Synthesize("   ").event())
        assert Error.from_event(await read(client)).code == "invalid_request"
        assert AudioStop.is_type((await read(client)).type)
        await client.write_event(SynthesizeChunk("orphan text").event())
        assert Error.from_event(await read(client)).code == "invalid_request"
        await client.write_event(Synthesize("Still here.").event())
        events = await read_until(client, "audio-stop")
    assert rms(pcm_of(events)) > 500


@pytest.mark.parametrize("streaming", [False, True])
async def test_disconnect_cancels_synthesis(wyoming: tuple[RunningServer, int], streaming: bool) -> None:
    server, port = wyoming
    async with AsyncTcpClient("127.0.0.1", port) as client:
        if streaming:
            await client.write_event(SynthesizeStart().event())
            await client.write_event(SynthesizeChunk(LONG_TEXT).event())
        else:
            await client.write_event(Synthesize(LONG_TEXT).event())
        await read_until(client, "audio-chunk")
        assert await asyncio.to_thread(server.call, voxflow_tasks)  # synthesis is running
        assert server.state.admission.counts()["wyoming"] == 1
    await assert_released(server)


async def wait_until_admitted(server: RunningServer, places: int) -> None:
    for _ in range(300):
        if server.state.admission.counts()["wyoming"] == places:
            return
        await asyncio.sleep(0.1)
    assert server.state.admission.counts()["wyoming"] == places


def header_line(**fields: object) -> bytes:
    return json.dumps(fields).encode() + b"\n"


async def test_malformed_events_are_errors(wyoming: tuple[RunningServer, int]) -> None:
    server, port = wyoming
    async with raw_connection(port) as (reader, writer):
        # The framing holds, so only the event is refused and the connection goes on.
        bad_text = b'{"text": "\\udfff"}'
        for frame in (
            b'{"type": "synthesize", "data": {"text": "\\ud800"}}\n',  # a lone surrogate in the header
            header_line(type="synthesize", data_length=5) + b"{bad}",
            header_line(type="synthesize", data_length=len(bad_text)) + bad_text,
            header_line(data={"text": "no type"}),
        ):
            writer.write(frame)
            assert Error.from_event(await read(reader)).code == "invalid_request"
        await async_write_event(Describe().event(), writer)
        assert Info.is_type((await read(reader)).type)
        # A header that is not JSON: where the next event starts is unknown, so the connection ends.
        writer.write(b"this is not JSON\n")
        assert Error.from_event(await read(reader)).code == "invalid_request"
        await assert_closed_by_server(reader)
    async with raw_connection(port) as (reader, writer):
        writer.write(header_line(type="synthesize", data_length="12"))
        assert Error.from_event(await read(reader)).code == "invalid_request"
        await assert_closed_by_server(reader)
    await assert_released(server)


async def test_sizes_over_the_bound_close_without_reading_them(limited: tuple[RunningServer, int]) -> None:
    server, port = limited
    for name in ("data_length", "payload_length"):
        async with raw_connection(port) as (reader, writer):
            writer.write(header_line(type="synthesize", **{name: 10**9}))
            error = Error.from_event(await read(reader))
            assert error.code == "limit_exceeded" and name in error.text
            await assert_closed_by_server(reader)  # without a byte of the declared body
    async with raw_connection(port) as (reader, writer):
        writer.write(header_line(type="describe", pad="x" * SMALL_BOUND))
        assert Error.from_event(await read(reader)).code == "limit_exceeded"
        await assert_closed_by_server(reader)
    await assert_released(server)


async def test_admission_caps_connections_and_gives_places_back(limited: tuple[RunningServer, int]) -> None:
    server, port = limited
    async with AsyncTcpClient("127.0.0.1", port) as first, AsyncTcpClient("127.0.0.1", port) as second:
        for client in (first, second):
            await client.write_event(Describe().event())
            assert Info.is_type((await read(client)).type)
        assert server.state.admission.counts()["wyoming"] == 2
        async with AsyncTcpClient("127.0.0.1", port) as third:
            assert Error.from_event(await read(third)).code == "limit_exceeded"
            assert await asyncio.wait_for(third.read_event(), TIMEOUT) is None
    await assert_released(server)
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Describe().event())
        assert Info.is_type((await read(client)).type)


async def test_a_client_that_never_reads_is_dropped(limited: tuple[RunningServer, int]) -> None:
    server, port = limited
    async with raw_connection(port, rcvbuf=4096) as (reader, writer):
        await async_write_event(Synthesize(LONG_TEXT).event(), writer)
        await wait_until_admitted(server, 1)
        # Past send_timeout the synthesis is cancelled and the connection closed.
        await assert_released(server)
        await assert_closed_by_server(reader)
    assert b'voxflow_errors_total{code="slow_consumer"} 1.0' in server.state.metrics.render()
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Synthesize("Everyone else is still served.").event())
        events = await read_until(client, "audio-stop")
    assert rms(pcm_of(events)) > 500
    await assert_released(server)


async def test_drain_finishes_synthesis_and_refuses_new_work(engine: Engine) -> None:
    port = free_port()
    text = " ".join(["Every word of this reply is still spoken while the server drains."] * 4)
    # A long send timeout: the first client below stops reading for a moment on purpose.
    with run_server(engine, wyoming_url=f"tcp://127.0.0.1:{port}", grace_seconds=60.0, send_timeout_seconds=30.0) as server:
        async with raw_connection(port, rcvbuf=4096) as (reader, writer), AsyncTcpClient("127.0.0.1", port) as streaming:
            await async_write_event(Synthesize(text).event(), writer)
            assert AudioStart.is_type((await read(reader)).type)  # in flight, held up by its reader
            await streaming.write_event(SynthesizeStart().event())
            await streaming.write_event(SynthesizeChunk("The stream that was open when the drain began ").event())
            drain = asyncio.ensure_future(asyncio.to_thread(server.call, server.state.drain))
            for _ in range(300):
                if server.state.draining:
                    break
                await asyncio.sleep(0.05)
            assert server.state.draining
            async with AsyncTcpClient("127.0.0.1", port) as late:
                assert Error.from_event(await read(late)).code == "draining"
                assert await asyncio.wait_for(late.read_event(), TIMEOUT) is None
            await async_write_event(Synthesize("This one comes too late.").event(), writer)
            events = []
            while (event := await asyncio.wait_for(async_read_event(reader), TIMEOUT)) is not None:
                events.append(event)
            await streaming.write_event(SynthesizeChunk("goes on to its end.").event())
            await streaming.write_event(SynthesizeStop().event())
            streamed = await read_until(streaming, "synthesize-stopped")
            await asyncio.wait_for(drain, TIMEOUT)
        types = [e.type for e in events]
        end = types.index("audio-stop")
        # The request in flight is spoken whole; the new one gets `draining` after it, then the close.
        assert "error" not in types[:end] and len(pcm_of(events[:end])) / 22050 > 9.0
        assert types[end + 1:] == ["error", "audio-stop"]
        assert Error.from_event(events[end + 1]).code == "draining"
        assert "error" not in [e.type for e in streamed] and rms(pcm_of(streamed)) > 500
        await assert_released(server)


def test_voice_choice() -> None:
    def info(name: str, language: str) -> VoiceInfo:
        return VoiceInfo(name, language, 22050, "medium", language.lower(), (), Path("x.onnx"), Path("x.onnx.json"))

    infos = [info("de_DE-a-low", "de_DE"), info("en_GB-b-low", "en_GB"), info(VOICE, "en_US")]
    assert choose_voice(None, infos, VOICE) == VoiceChoice(VOICE)
    assert choose_voice(SynthesizeVoice(name="de_DE-a-low", speaker="0"), infos, VOICE) == VoiceChoice("de_DE-a-low", "0")
    assert choose_voice(SynthesizeVoice(language="en-GB"), infos, VOICE) == VoiceChoice("en_GB-b-low")
    assert choose_voice(SynthesizeVoice(language="de"), infos, VOICE) == VoiceChoice("de_DE-a-low")
    assert choose_voice(SynthesizeVoice(language="en"), infos, VOICE) == VoiceChoice(VOICE)  # the default among equals
    assert choose_voice(SynthesizeVoice(language="fr_FR"), infos, VOICE) == VoiceChoice(VOICE)


def test_header_lengths_are_bounded_byte_counts() -> None:
    header = parse_header(header_line(type="synthesize", data_length=12, payload_length=100), 100)
    assert (header.data_length, header.payload_length) == (12, 100)  # the bound itself is allowed
    for name in ("data_length", "payload_length"):
        with pytest.raises(LimitExceeded):
            parse_header(header_line(type="synthesize", **{name: 101}), 100)
        for bad in ("12", -1, 1.5, True, [3]):
            with pytest.raises(FramingLost) as refused:
                parse_header(header_line(type="synthesize", **{name: bad}), 100)
            assert refused.value.code == "invalid_request"
    for line in (b"not json\n", b"[1, 2]\n", b'{"type": NaN}\n', b"\xff\xfe\n"):
        with pytest.raises(FramingLost):
            parse_header(line, 100)


def test_event_content_errors_leave_the_framing_intact() -> None:
    header = parse_header(header_line(type="synthesize", data={"text": "Hi."}, data_length=24), 100)
    event = parse_event(header, b'{"voice": {"name": "v"}}', b"\x00\x01")
    assert event == Event("synthesize", {"text": "Hi.", "voice": {"name": "v"}}, b"\x00\x01")
    cases = (
        (b'{"type": "synthesize", "data": {"text": "\\ud800"}}', b""),
        (header_line(type="synthesize", data_length=5), b"{bad}"),
        (header_line(type="synthesize", data_length=18), b'{"text": "\\udfff"}'),
        (header_line(type="synthesize", data_length=3), b"[1]"),
        (header_line(type="synthesize", data=[1]), b""),
        (header_line(type=7), b""),
        (header_line(data={}), b""),
    )
    for line, data in cases:
        with pytest.raises(InvalidRequest) as refused:
            parse_event(parse_header(line, 100), data, None)
        assert not isinstance(refused.value, FramingLost)


async def test_reader_bounds_each_part_before_reading_it() -> None:
    # Far below the bound: a header longer than the reader's own limit still reads whole.
    reader = asyncio.StreamReader(limit=64)
    data = json.dumps({"text": "x" * 300}).encode()
    reader.feed_data(header_line(type="synthesize", data_length=len(data), pad="y" * 300) + data)
    event = await asyncio.wait_for(read_event(reader, 1000), TIMEOUT)
    assert event is not None and event.data["text"] == "x" * 300
    # A declared size over the bound is refused at once, without waiting for its bytes.
    reader.feed_data(header_line(type="synthesize", payload_length=10**9))
    with pytest.raises(LimitExceeded):
        await asyncio.wait_for(read_event(reader, 1000), TIMEOUT)
    # So is a header line over the bound, before its end arrives.
    reader = asyncio.StreamReader(limit=64)
    reader.feed_data(b'{"type": "' + b"x" * 2000)
    with pytest.raises(LimitExceeded):
        await asyncio.wait_for(read_event(reader, 1000), TIMEOUT)
    # A connection that ends, even inside an event, ends the reading.
    reader = asyncio.StreamReader()
    reader.feed_data(header_line(type="ping", data_length=10) + b'{"a"')
    reader.feed_eof()
    assert await asyncio.wait_for(read_event(reader, 1000), TIMEOUT) is None
