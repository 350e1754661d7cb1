"""The native /v1/stream endpoint on a live server, driven by a real websockets client."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from server_harness import RunningServer, run_server, shrink_server_send_buffers, small_buffer_socket
from voxflow.streaming.tokens import gpt_like_tokens
from voxflow.transports.protocols.native_protocol import (
    PROTOCOL,
    AudioPacket,
    Cancel,
    Cancelled,
    Done,
    End,
    Error,
    Flush,
    Metrics,
    Ping,
    Pong,
    Ready,
    Start,
    Started,
    Text,
    Word,
    parse_server,
    serialize_client,
)

PARAGRAPH = (
    "Sure, I can help with that. The weather tomorrow looks mild, with a light breeze in the "
    "morning and some sun in the afternoon. If you are heading out, a thin jacket should be enough."
)
LONG_TEXT = " ".join([PARAGRAPH] * 4)  # about 50 s of speech


def url(server: RunningServer, query: str = "") -> str:
    return f"{server.ws}/v1/stream{query}"


def open_socket(server: RunningServer, query: str = "", **kwargs) -> connect:
    return connect(url(server, query), proxy=None, open_timeout=30, **kwargs)


async def send(ws: ClientConnection, *messages) -> None:
    for msg in messages:
        await ws.send(serialize_client(msg))


async def receive(ws: ClientConnection):
    return parse_server(await ws.recv())


async def read_until(ws: ClientConnection, stop: Callable[[object], bool]) -> list:
    events = []
    async with asyncio.timeout(60):
        while not events or not stop(events[-1]):
            events.append(await receive(ws))
    return events


async def read_all_done(ws: ClientConnection, contexts: set[str]) -> list:
    events = []
    async with asyncio.timeout(60):
        while contexts - {e.context for e in events if isinstance(e, Done)}:
            events.append(await receive(ws))
    return events


async def greeted(ws: ClientConnection) -> Ready:
    ready = await receive(ws)
    assert isinstance(ready, Ready)
    return ready


def context_of(event) -> str | None:
    return getattr(event, "context", None)


def is_end(context: str) -> Callable[[object], bool]:
    return lambda e: isinstance(e, (Done, Cancelled, Error)) and e.context == context


async def speak(ws: ClientConnection, context: str, text: str = PARAGRAPH, **start) -> list:
    """One whole context on its own; returns its events, started to done."""
    await send(ws, Start(context, **start), *(Text(context, t) for t in gpt_like_tokens(text)), End(context))
    return await read_until(ws, is_end(context))


def check_context_stream(events: list, context: str, sample_rate: int, frame_ms: int = 20) -> list[AudioPacket]:
    """A complete, well-ordered context: started, words and frames in order, metrics, done."""
    mine = [e for e in events if context_of(e) == context]
    assert isinstance(mine[0], Started)
    assert (mine[0].sample_rate, mine[0].encoding, mine[0].frame_ms) == (sample_rate, "pcm_s16le", frame_ms)
    assert isinstance(mine[-2], Metrics) and isinstance(mine[-1], Done)
    frames = [e for e in mine if isinstance(e, AudioPacket)]
    frame_bytes = sample_rate * frame_ms // 1000 * 2
    frame_seconds = frame_ms / 1000
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert all(len(f.pcm) == frame_bytes for f in frames)
    assert all(f.pts_us == round(f.seq * frame_seconds * 1e6) for f in frames)
    assert any(f.pcm.strip(b"\0") for f in frames)
    # A word is announced before its audio: frames sent ahead of it end by its start.
    sent_until = 0.0
    for event in mine:
        if isinstance(event, AudioPacket):
            sent_until = event.pts + frame_seconds
        elif isinstance(event, Word):
            assert sent_until <= event.start + frame_seconds + 1e-6, (event, sent_until)
    metrics = mine[-2]
    assert metrics.audio_seconds == pytest.approx(len(frames) * frame_seconds, abs=1e-6)
    assert metrics.first_audio_ms > 0 and metrics.rtf > 0
    assert not any(isinstance(e, Error) for e in mine)
    return frames


async def server_leftovers(server: RunningServer) -> tuple[int, list[str]]:
    """Open connections and synthesis tasks on the server, read on its own loop."""

    async def probe() -> tuple[int, list[str]]:
        tasks = sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("voxflow-"))
        return len(server.state.context_sets), tasks

    return await asyncio.to_thread(server.call, probe)


async def wait_for(condition: Callable[[], object], seconds: float = 20) -> None:
    """Poll an async check until it is truthy."""
    async with asyncio.timeout(seconds):
        while not await condition():
            await asyncio.sleep(0.05)


# -- the protocol on the shared server ---------------------------------------------------------


async def test_ready_greeting(server):
    async with open_socket(server) as ws:
        ready = await greeted(ws)
    assert ready.protocol == PROTOCOL
    assert ready.default_voice == "en_US-joe-medium" and ready.default_voice in ready.voices
    cfg = server.state.settings.server
    assert (ready.limits.max_contexts, ready.limits.max_message_chars) == (cfg.max_contexts_per_socket, cfg.max_message_chars)
    assert ready.limits.max_context_chars == server.state.engine.config.max_text_chars


async def test_one_context_from_start_to_done(server):
    async with open_socket(server) as ws:
        await greeted(ws)
        events = await speak(ws, "a", sample_rate=24000)
    assert events[0] == Started("a", "en_US-joe-medium", 24000, "pcm_s16le", 20)
    frames = check_context_stream(events, "a", 24000)
    words = [e.word for e in events if isinstance(e, Word)]
    assert words == PARAGRAPH.split()
    assert len(frames) * 0.02 > 5  # the whole paragraph was spoken, not a piece of it


async def test_two_contexts_on_one_socket(server):
    async with open_socket(server) as ws:
        await greeted(ws)
        await send(ws, Start("one", sample_rate=16000, frame_ms=40), Start("two", sample_rate=48000, style="calm"))
        second = "Two contexts can share a socket without getting in each other's way."
        for a, b in zip(gpt_like_tokens(PARAGRAPH), gpt_like_tokens(second) + [""] * 100):
            await send(ws, Text("one", a), Text("two", b))
        await send(ws, End("two"), End("one"))
        events = await read_all_done(ws, {"one", "two"})
    check_context_stream(events, "one", 16000, frame_ms=40)
    check_context_stream(events, "two", 48000)
    assert [e.word for e in events if isinstance(e, Word) and e.context == "two"] == second.split()


async def test_flush_speaks_buffered_text_without_end(server):
    async with open_socket(server) as ws:
        await greeted(ws)
        await send(ws, Start("f"), Text("f", "Good morning"), Flush("f"))
        first = await read_until(ws, lambda e: isinstance(e, AudioPacket))
        assert [e.word for e in first if isinstance(e, Word)] == ["Good", "morning"]
        await send(ws, Text("f", " to you too."), End("f"))
        events = first + await read_until(ws, is_end("f"))
        await send(ws, Flush("f"))  # the context is gone after done
        late = await receive(ws)
    check_context_stream(events, "f", 22050)
    assert [e.word for e in events if isinstance(e, Word)] == ["Good", "morning", "to", "you", "too."]
    assert (late.code, late.context) == ("unknown_context", "f")


async def test_cancel_stops_the_context(server):
    async with open_socket(server) as ws:
        await greeted(ws)
        await send(ws, Start("c"), *(Text("c", t) for t in gpt_like_tokens(LONG_TEXT)), End("c"))
        await read_until(ws, lambda e: isinstance(e, AudioPacket))
        await send(ws, Cancel("c"))
        before = await read_until(ws, is_end("c"))
        await send(ws, Ping("after"))
        after = await read_until(ws, lambda e: isinstance(e, Pong))
    assert before[-1] == Cancelled("c")
    assert not any(isinstance(e, (Done, Metrics)) for e in before)
    assert after == [Pong("after")]  # nothing of the context after `cancelled`
    spoken = sum(1 for e in before if isinstance(e, AudioPacket)) * 0.02
    assert spoken < 40  # stopped well before the end of the text


async def test_errors_are_answered_and_the_socket_carries_on(server):
    max_chars = server.state.settings.server.max_message_chars
    async with open_socket(server) as ws:
        await greeted(ws)
        cases = [
            ("{not json", None, "invalid_json"),
            ("[1, 2]", None, "invalid_json"),
            ('{"type": "sing", "context": "e"}', "e", "unknown_type"),
            ('{"context": "e"}', "e", "unknown_type"),
            ('{"type": "start", "context": "e", "frame_ms": 30}', "e", "invalid_request"),
            ('{"type": "start", "context": "e", "style": "furious"}', "e", "invalid_request"),
            ('{"type": "text", "context": "e", "text": 42}', "e", "invalid_request"),
            ('{"type": "end", "context": ""}', None, "invalid_request"),
            (serialize_client(Flush("nope")), "nope", "unknown_context"),
            (serialize_client(End("nope")), "nope", "unknown_context"),
            (serialize_client(Cancel("nope")), "nope", "unknown_context"),
            (serialize_client(Start("v", voice="no-such-voice")), "v", "unknown_voice"),
            (serialize_client(Text("big", "x" * max_chars)), None, "limit_exceeded"),
            (b'{"type": "ping"}', None, "binary_not_expected"),
            (b"\xff\xfe not UTF-8", None, "binary_not_expected"),
        ]
        for data, context, code in cases:
            await ws.send(data)
            error = await receive(ws)
            assert (type(error), error.context, error.code) == (Error, context, code), data
        # A message of exactly the limit is accepted.
        exact = serialize_client(Text("fits", ""))
        exact = exact.replace('"text":""', '"text":"' + "a" * (max_chars - len(exact)) + '"')
        assert len(exact) == max_chars
        await ws.send(exact)
        assert isinstance(await receive(ws), Started)
        await send(ws, Cancel("fits"))
        assert (await read_until(ws, is_end("fits")))[-1] == Cancelled("fits")
        # The errors left nothing behind: a context still works end to end.
        events = await speak(ws, "ok", text="Still working.")
    check_context_stream(events, "ok", 22050)


async def test_duplicate_start_and_text_after_end(server):
    async with open_socket(server) as ws:
        await greeted(ws)
        await send(ws, Start("d"), Start("d"))
        assert isinstance(await receive(ws), Started)
        assert (await receive(ws)).code == "context_exists"
        # A long text keeps the context open while the next messages arrive.
        await send(ws, Text("d", LONG_TEXT), End("d"), Text("d", "more"), Flush("d"), End("d"), Cancel("d"))
        events = await read_until(ws, lambda e: isinstance(e, Cancelled))
    assert [e.code for e in events if isinstance(e, Error)] == ["stream_closed"] * 3
    assert events[-1] == Cancelled("d")


async def test_text_without_start_opens_a_context_with_defaults(server):
    async with open_socket(server) as ws:
        await greeted(ws)
        await send(ws, Text("imp", "Hello there."), End("imp"))
        events = await read_until(ws, is_end("imp"))
    assert events[0] == Started("imp", "en_US-joe-medium", 22050, "pcm_s16le", 20)
    check_context_stream(events, "imp", 22050)


async def test_too_many_contexts(server):
    limit = server.state.settings.server.max_contexts_per_socket
    async with open_socket(server) as ws:
        await greeted(ws)
        await send(ws, *(Start(f"m{i}") for i in range(limit + 1)))
        answers = [await receive(ws) for _ in range(limit + 1)]
        assert all(isinstance(a, Started) for a in answers[:limit])
        assert (answers[-1].code, answers[-1].context) == ("limit_exceeded", f"m{limit}")
        await send(ws, *(Cancel(f"m{i}") for i in range(limit)))
        ended = [await receive(ws) for _ in range(limit)]
        assert sorted(e.context for e in ended if isinstance(e, Cancelled)) == sorted(f"m{i}" for i in range(limit))
        # Room again once contexts ended.
        events = await speak(ws, f"m{limit}", text="Room again.")
    check_context_stream(events, f"m{limit}", 22050)


async def test_ping(server):
    async with open_socket(server) as ws:
        await greeted(ws)
        await send(ws, Ping(), Ping("x"), Ping(12))
        assert [await receive(ws) for _ in range(3)] == [Pong(), Pong("x"), Pong(12)]


async def test_invalid_utf8_in_a_text_frame_closes_the_socket(server):
    # The WebSocket layer, below the protocol, fails the connection with 1007 (RFC 6455
    # requires it); the same bytes in a binary frame get `binary_not_expected`.
    async with open_socket(server) as ws:
        await greeted(ws)
        await ws.send(b'{"type": "text", "context": "u", "text": "\xff"}', text=True)
        with pytest.raises(ConnectionClosed) as info:
            async with asyncio.timeout(30):
                await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1007


async def test_disconnect_mid_stream_leaves_nothing_running(server):
    async with open_socket(server) as ws:
        await greeted(ws)
        await send(ws, Start("gone"), Text("gone", LONG_TEXT), End("gone"))
        await read_until(ws, lambda e: isinstance(e, AudioPacket))
        assert (await server_leftovers(server))[1]  # synthesis is under way
    await wait_for(lambda: _nothing_left(server))


async def test_abrupt_disconnect_leaves_nothing_running(server):
    ws = await open_socket(server)
    await greeted(ws)
    await send(ws, Start("cut"), Text("cut", LONG_TEXT), End("cut"))
    await read_until(ws, lambda e: isinstance(e, AudioPacket))
    ws.transport.abort()  # no closing handshake, as when a client crashes
    await wait_for(lambda: _nothing_left(server))


async def _nothing_left(server: RunningServer) -> bool:
    return await server_leftovers(server) == (0, [])


# -- admission: keys, sockets, rates ----------------------------------------------------------


async def closed_with(ws: ClientConnection) -> tuple[list, int]:
    """The messages a refused client gets, and the close code."""
    events = []
    with pytest.raises(ConnectionClosed) as info:
        async with asyncio.timeout(30):
            while True:
                events.append(await receive(ws))
    return events, info.value.rcvd.code


async def test_api_keys(engine):
    with run_server(engine, api_keys=("k1",)) as srv:
        for headers, query in ((None, ""), ({"Authorization": "Bearer wrong"}, ""), (None, "?api_key=k2")):
            async with open_socket(srv, query, additional_headers=headers) as ws:
                events, code = await closed_with(ws)
            assert code == 4001
            assert [(e.code, e.context) for e in events] == [("unauthorized", None)]
        for headers, query in (({"Authorization": "Bearer k1"}, ""), ({"xi-api-key": "k1"}, ""), (None, "?api_key=k1")):
            async with open_socket(srv, query, additional_headers=headers) as ws:
                await greeted(ws)
                events = await speak(ws, "auth", text="Let me in.")
            check_context_stream(events, "auth", 22050)


async def test_max_sockets(engine):
    with run_server(engine, max_sockets=1) as srv:
        async with open_socket(srv) as first:
            await greeted(first)
            async with open_socket(srv) as second:
                events, code = await closed_with(second)
            assert code == 1013
            assert [e.code for e in events] == ["limit_exceeded"]
            await send(first, Ping(1))
            assert await receive(first) == Pong(1)
        await wait_for(lambda: _nothing_left(srv))
        async with open_socket(srv) as third:
            await greeted(third)


async def test_rate_limit(engine):
    # 0.1 per second gives a burst of one request: the connection itself.
    with run_server(engine, requests_per_second=0.1) as srv:
        async with open_socket(srv) as ws:
            await greeted(ws)
            await send(ws, Start("r"), Ping("alive"))
            error = await receive(ws)
            assert (error.code, error.context) == ("rate_limited", "r")
            assert await receive(ws) == Pong("alive")
            async with open_socket(srv) as other:
                events, code = await closed_with(other)
            assert code == 1013
            assert [e.code for e in events] == ["rate_limited"]


# -- flow control and shutdown ------------------------------------------------------------------


async def test_slow_reader_loses_its_context_and_server_memory_stays_bounded(engine):
    with run_server(engine, send_timeout_seconds=1) as srv:
        sock = small_buffer_socket(srv)
        async with connect(url(srv), sock=sock, max_queue=1, proxy=None, compression=None) as ws:
            await greeted(ws)

            await shrink_server_send_buffers(srv)
            await send(ws, Start("slow", sample_rate=48000), *(Text("slow", p) for p in [PARAGRAPH] * 4), End("slow"))

            async def probe():
                streams = [c.stream("slow") for c in srv.state.context_sets if "slow" in c]
                queues_ok = all(s._output.qsize() <= s.options.output_queue for s in streams)
                buffered = max(p.transport.get_write_buffer_size() for p in srv.server.server_state.connections)
                return len(streams), queues_ok, buffered

            peak = 0
            async with asyncio.timeout(60):
                while True:  # not reading at all, until the server gives up on the context
                    alive, queues_ok, buffered = await asyncio.to_thread(srv.call, probe)
                    assert queues_ok
                    peak = max(peak, buffered)
                    if not alive:
                        break
                    await asyncio.sleep(0.05)
            assert peak < 512 * 1024  # the server held back instead of buffering the audio
            events = await read_until(ws, is_end("slow"))
            await send(ws, Ping("still here"))
            assert await receive(ws) == Pong("still here")
    assert (events[-1].code, events[-1].context) == ("slow_consumer", "slow")
    heard = sum(1 for e in events if isinstance(e, AudioPacket)) * 0.02
    assert heard < 30  # dropped long before the text's ~50 s were spoken
    assert not any(isinstance(e, Done) for e in events)


async def test_drain_lets_a_context_finish_then_closes_with_1001(engine):
    with run_server(engine, grace_seconds=60) as srv:
        async with open_socket(srv) as ws:
            await greeted(ws)
            await send(ws, Start("speaking"), Text("speaking", PARAGRAPH), End("speaking"))
            events = await read_until(ws, lambda e: isinstance(e, AudioPacket))
            drained = asyncio.create_task(asyncio.to_thread(srv.call, srv.state.drain))

            async def draining() -> bool:
                return srv.state.draining

            await wait_for(draining)
            await send(ws, Start("late"))
            async with open_socket(srv) as newcomer:
                refused, refused_code = await closed_with(newcomer)
            rest, code = await closed_with(ws)
            await drained
    events += rest
    late = [e for e in events if context_of(e) == "late"]
    assert [(e.code, type(e)) for e in late] == [("draining", Error)]
    check_context_stream([e for e in events if context_of(e) == "speaking"], "speaking", 22050)
    assert code == 1001
    assert ([e.code for e in refused], refused_code) == (["draining"], 1001)


async def test_drain_cuts_contexts_at_the_end_of_the_grace_period(engine):
    with run_server(engine, grace_seconds=0.5) as srv:
        async with open_socket(srv) as ws:
            await greeted(ws)
            await send(ws, Start("endless"), Text("endless", LONG_TEXT), End("endless"))
            events = await read_until(ws, lambda e: isinstance(e, AudioPacket))
            drained = asyncio.create_task(asyncio.to_thread(srv.call, srv.state.drain))
            rest, code = await closed_with(ws)
            await drained
        assert code == 1001
        assert not any(isinstance(e, (Done, Metrics)) for e in events + rest)
        await wait_for(lambda: _nothing_left(srv))


async def test_text_with_end_speaks_a_whole_utterance_in_one_message(server):
    async with asyncio.timeout(60):
        async with connect(f"{server.ws}/v1/stream", max_size=None) as ws:
            await ws.recv()  # ready
            await ws.send(serialize_client(Text(context="w", text="One whole phrase.", end=True)))
            kinds = []
            async for data in ws:
                msg = parse_server(data)
                kinds.append(type(msg).__name__)
                if isinstance(msg, Done):
                    break
    assert kinds[0] == "Started" and "AudioPacket" in kinds and kinds[-1] == "Done"
