"""The ElevenLabs-compatible endpoints on a live server, driven the way Pipecat drives ElevenLabs.

The client messages below are the literal dicts Pipecat's ElevenLabsTTSService builds
(pipecat-ai/pipecat main at commit acead05, v1.7.0+771: services/elevenlabs/tts.py and
tts_base.py): context init {"text": " ", "context_id", "voice_settings"}, text {"text",
"context_id"}, {"context_id", "flush": True}, {"context_id", "close_context": True},
keep-alives {"text": "", "context_id"} and {"text": ""}, and {"close_socket": True}; its URL
carries model_id, output_format and auto_mode, its handshake the xi-api-key header.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
from urllib.parse import urlencode

import av
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from server_harness import RunningServer, run_server, shrink_server_send_buffers, small_buffer_socket
from test_elevenlabs_protocol import pipecat_word_times
from voxflow.streaming.tokens import gpt_like_tokens

VOICE_ID = "21m00Tcm4TlvDq8ikWCM"  # an ElevenLabs voice id this server does not have: the default voice speaks
SENTENCE = "Hello there, how are you today?"
PARAGRAPH = (
    "Sure, I can help with that. The weather tomorrow looks mild, with a light breeze in the "
    "morning and some sun in the afternoon. If you are heading out, a thin jacket should be enough."
)
TIMEOUT = 120  # generous: the suite shares two cores with others


def url(server: RunningServer, endpoint: str = "multi-stream-input", **query: str | None) -> str:
    """A query value of None leaves that parameter out."""
    params = {"model_id": "eleven_flash_v2_5", "output_format": "pcm_16000", "auto_mode": "true", **query}
    params = {name: value for name, value in params.items() if value is not None}
    return f"{server.ws}/v1/text-to-speech/{VOICE_ID}/{endpoint}?{urlencode(params)}"


def open_socket(address: str, key: str | None = None, **kwargs) -> connect:
    headers = {"xi-api-key": key} if key else None
    return connect(address, additional_headers=headers, max_size=16 * 1024 * 1024, proxy=None, open_timeout=30, **kwargs)


async def send(ws: ClientConnection, *messages: dict) -> None:
    for message in messages:
        await ws.send(json.dumps(message))


async def receive(ws: ClientConnection) -> dict:
    async with asyncio.timeout(TIMEOUT):
        return json.loads(await ws.recv())


async def until_final(ws: ClientConnection, *contexts: str) -> list[dict]:
    """Messages up to the isFinal of each named context (stream-input: up to its one isFinal)."""
    waiting, messages = set(contexts), []
    while True:
        message = await receive(ws)
        messages.append(message)
        if message.get("isFinal"):
            waiting.discard(message.get("contextId"))
            if not waiting:
                return messages


async def closed_with(ws: ClientConnection) -> tuple[list[dict], int]:
    """What the server sends before it closes, and its close code."""
    messages = []
    with pytest.raises(ConnectionClosed) as info:
        while True:
            messages.append(await receive(ws))
    return messages, info.value.rcvd.code


def audio_of(messages: list[dict]) -> bytes:
    return b"".join(base64.b64decode(m["audio"]) for m in messages if m.get("audio"))


def check_speech(messages: list[dict], text: str) -> None:
    """Audio (16 kHz), then isFinal; Pipecat rebuilds the text's words, in order, inside the audio."""
    assert messages[-1]["isFinal"] is True and "audio" not in messages[-1]
    assert not any("error" in m for m in messages)
    audio = [m for m in messages if m.get("audio")]
    assert audio and all(m["isFinal"] is False for m in audio)
    pcm = audio_of(messages)
    assert len(pcm) % 2 == 0
    seconds, words = len(pcm) / 2 / 16000, text.split()
    assert len(words) > seconds > 0.1 * len(words)
    rebuilt = pipecat_word_times(audio)
    assert [w for w, _ in rebuilt] == words
    starts = [ms for _, ms in rebuilt]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    assert 0 <= starts[0] and starts[-1] < seconds * 1000


async def server_leftovers(server: RunningServer) -> tuple[int, list[str]]:
    """Open connections and voxflow tasks on the server, read on its own loop."""

    async def probe() -> tuple[int, list[str]]:
        tasks = sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("voxflow-"))
        return len(server.state.context_sets), tasks

    return await asyncio.to_thread(server.call, probe)


async def nothing_left(server: RunningServer) -> None:
    async with asyncio.timeout(30):
        while await server_leftovers(server) != (0, []):
            await asyncio.sleep(0.05)


# -- stream-input -----------------------------------------------------------------------------


async def speak_stream_input(server: RunningServer, output_format: str | None, fragments: list[str]) -> tuple[list[dict], int]:
    async with open_socket(url(server, "stream-input", output_format=output_format, auto_mode="false")) as ws:
        # The messages of ElevenLabs' WebSocket guide: init, text, flush, end of input.
        await send(ws, {
            "text": " ",
            "voice_settings": {"stability": 0.5, "similarity_boost": 0.8, "use_speaker_boost": False},
            "generation_config": {"chunk_length_schedule": [120, 160, 250, 290]},
            "xi_api_key": "not-checked-without-keys",
        })
        await send(ws, *({"text": t, "try_trigger_generation": True} for t in fragments[:-1]))
        await send(ws, {"text": fragments[-1], "flush": True}, {"text": ""})
        return await closed_with(ws)


async def test_stream_input_speaks_then_closes(server):
    messages, code = await speak_stream_input(server, "pcm_16000", gpt_like_tokens(SENTENCE))
    assert code == 1000  # ElevenLabs closes after the end of input's isFinal
    check_speech(messages, SENTENCE)
    assert not any("contextId" in m for m in messages)
    await nothing_left(server)


async def test_output_format_sets_the_sample_rate(server):
    # Same text in one piece (so chunking cannot depend on timing), same seed: the same
    # speech, 1.5 times the samples (frames are padded to 20 ms).
    low = audio_of((await speak_stream_input(server, "pcm_16000", [SENTENCE]))[0])
    high = audio_of((await speak_stream_input(server, "pcm_24000", [SENTENCE]))[0])
    assert abs(len(high) / len(low) - 1.5) < 0.02


async def test_stream_input_inactivity_timeout(server):
    async with open_socket(url(server, "stream-input", inactivity_timeout="1")) as ws:
        await send(ws, {"text": " "})
        messages, code = await closed_with(ws)
    assert code == 1008
    assert messages == [{"message": messages[0]["message"], "error": "input_timeout_exceeded", "code": 1008}]


# -- multi-stream-input -----------------------------------------------------------------------


async def test_two_contexts_interleaved_as_pipecat_drives_them(server):
    first, second = "Good morning to you.", "The weather looks fine."
    async with open_socket(url(server), key="any") as ws:
        await send(ws,
            {"text": " ", "context_id": "a", "voice_settings": {"stability": 0.4, "similarity_boost": 0.75, "speed": 1.1}},
            {"text": " ", "context_id": "b"},
        )
        for one, two in itertools.zip_longest(gpt_like_tokens(first), gpt_like_tokens(second)):
            await send(ws, *({"text": t, "context_id": c} for t, c in ((one, "a"), (two, "b")) if t is not None))
        await send(ws, {"text": "", "context_id": "a"}, {"text": ""})  # keep-alives: nothing happens
        await send(ws, {"context_id": "a", "flush": True}, {"context_id": "a", "close_context": True})
        await send(ws, {"context_id": "b", "flush": True}, {"context_id": "b", "close_context": True})
        messages = await until_final(ws, "a", "b")
        for context, text in (("a", first), ("b", second)):
            mine = [m for m in messages if m["contextId"] == context]
            check_speech(mine, text)
        assert {m["contextId"] for m in messages} == {"a", "b"}
        await send(ws, {"close_socket": True})
        _, code = await closed_with(ws)
    assert code == 1000
    await nothing_left(server)


async def test_alignment_has_the_written_text_and_normalized_alignment_the_spoken(server):
    written = "Sure, **this** is [the link](https://example.com/a) you *asked* for."
    # Tokens without auto_mode, as Pipecat streams them (its token mode turns auto_mode off).
    async with open_socket(url(server, auto_mode="false"), key="any") as ws:
        await send(ws, *({"text": t, "context_id": "md"} for t in gpt_like_tokens(written)))
        await send(ws, {"context_id": "md", "flush": True}, {"context_id": "md", "close_context": True})
        messages = [m for m in await until_final(ws, "md") if "audio" in m]

    def text_of(field: str) -> str:
        return " ".join("".join(c for m in messages if m[field] for c in m[field]["chars"]).split())

    assert text_of("alignment") == written
    assert "*" not in text_of("normalizedAlignment") and "https" not in text_of("normalizedAlignment")
    # Pipecat reads `alignment` (no pronunciation dictionary): the words the LLM wrote, timed.
    assert [w for w, _ in pipecat_word_times(messages)] == written.split()


async def test_close_context_without_flush_stops_at_once_and_the_socket_carries_on(server):
    async with open_socket(url(server, auto_mode="false")) as ws:
        await send(ws, {"text": " ", "context_id": "long"}, {"text": PARAGRAPH * 3, "context_id": "long"})
        while not (await receive(ws)).get("audio"):
            pass
        await send(ws, {"context_id": "long", "close_context": True})  # a barge-in
        rest = await until_final(ws, "long")
        # What was already on its way may still arrive, but not the minutes of speech left.
        assert len(audio_of(rest)) / 2 / 16000 < 10
        await send(ws, {"text": " ", "context_id": "next"}, {"text": SENTENCE, "context_id": "next"})
        await send(ws, {"context_id": "next", "flush": True}, {"context_id": "next", "close_context": True})
        check_speech(await until_final(ws, "next"), SENTENCE)
        await send(ws, {"close_socket": True})
        await closed_with(ws)
    await nothing_left(server)


async def test_bad_input_gets_an_error_and_the_socket_carries_on(server):
    async with open_socket(url(server)) as ws:
        await ws.send("this is not json")
        assert (await receive(ws))["error"] == "invalid_input_message"
        await send(ws, {"text": 5, "context_id": "c"})
        error = await receive(ws)
        assert error["error"] == "invalid_input_message" and "text must be a string" in error["message"]
        assert error["code"] == 1008
        await send(ws, {"text": " ", "context_id": "c", "voice_settings": {"speed": "fast"}})
        assert "voice_settings.speed" in (await receive(ws))["message"]
        await send(ws, {"context_id": "never-opened", "flush": True})
        unknown = {"message": "", "error": "unknown_context", "code": 1008, "contextId": "never-opened"}
        assert (await receive(ws)) | {"message": ""} == unknown
        await send(ws, {"text": "x" * 10_001, "context_id": "big"})  # over max_message_chars
        error = await receive(ws)
        assert error["error"] == "limit_exceeded" and error["contextId"] == "big"
        # Still a working socket.
        await send(ws, {"text": SENTENCE, "context_id": "ok"}, {"context_id": "ok", "flush": True})
        await send(ws, {"context_id": "ok", "close_context": True})
        check_speech(await until_final(ws, "ok"), SENTENCE)
        await send(ws, {"close_socket": True})
        await closed_with(ws)


async def test_unsupported_output_format_is_refused(server):
    for query in ({"output_format": "mp3_44100_100"}, {"output_format": "flac_44100"}):
        async with open_socket(url(server, **query)) as ws:
            messages, code = await closed_with(ws)
        assert code == 1008
        assert [m["error"] for m in messages] == ["unsupported_output_format"] and "pcm_16000" in messages[0]["message"]


@pytest.mark.parametrize("output_format", ["mp3_44100_128", "ulaw_8000", "opus_48000_64", None])
async def test_encoded_output_formats_stream_the_whole_utterance(server, output_format):
    # None: no output_format at all, which is ElevenLabs' default, mp3_44100_128.
    messages, code = await speak_stream_input(server, output_format, [SENTENCE])
    assert code == 1000 and not any("error" in m for m in messages)
    reference, _ = await speak_stream_input(server, "pcm_16000", [SENTENCE])
    seconds = len(audio_of(reference)) / 2 / 16000
    name = output_format or "mp3_44100_128"
    container = {"ulaw": "mulaw"}.get(name[:4])
    rate = int(name.split("_")[1])
    options = {"sample_rate": str(rate)} if container else {}
    with av.open(io.BytesIO(audio_of(messages)), format=container, options=options) as file:
        samples = sum(frame.samples for frame in file.decode(audio=0))
    # The codec's own padding aside, the same utterance.
    assert abs(samples / rate - seconds) < 0.1
    assert [w for w, _ in pipecat_word_times([m for m in messages if "audio" in m])] == SENTENCE.split()


async def test_disconnect_mid_stream_leaves_nothing_running(server):
    ws = await open_socket(url(server, auto_mode="false"))
    await send(ws, {"text": " ", "context_id": "gone"}, {"text": PARAGRAPH * 3, "context_id": "gone"})
    await send(ws, {"context_id": "gone", "flush": True})
    while not (await receive(ws)).get("audio"):
        pass
    assert (await server_leftovers(server))[1]  # synthesis is under way
    ws.transport.abort()  # no closing handshake, as when a client crashes
    await nothing_left(server)


# -- admission: keys and limits ---------------------------------------------------------------


async def test_api_keys(engine):
    with run_server(engine, api_keys=("k",)) as srv:
        # The key in the first message, as ElevenLabs allows when the header has none.
        async with open_socket(url(srv, "stream-input")) as ws:
            await send(ws, {"text": " ", "xi_api_key": "k"}, {"text": "Hi there. "}, {"text": ""})
            messages, code = await closed_with(ws)
        assert code == 1000 and messages[-1] == {"isFinal": True} and audio_of(messages)
        # The header Pipecat sends, and the bearer form.
        for headers in ({"xi-api-key": "k"}, {"Authorization": "Bearer k"}):
            async with connect(url(srv), additional_headers=headers, proxy=None, open_timeout=30) as ws:
                await send(ws, {"text": ""}, {"close_socket": True})
                assert (await closed_with(ws)) == ([], 1000)
        # Wrong or missing keys: ElevenLabs' error, then a 1008 close.
        for key, first in (("wrong", None), (None, {"text": " ", "xi_api_key": "wrong"}), (None, {"text": " "})):
            async with open_socket(url(srv), key=key) as ws:
                if first is not None:
                    await send(ws, first)
                messages, code = await closed_with(ws)
            assert code == 1008
            assert [(m["error"], m["code"]) for m in messages] == [("invalid_api_key", 1008)]
        await nothing_left(srv)


async def test_limits_and_drain(engine):
    with run_server(engine, max_contexts_per_socket=1, max_sockets=1) as srv:
        async with open_socket(url(srv)) as ws:
            await send(ws, {"text": " ", "context_id": "one"}, {"text": " ", "context_id": "two"})
            error, final = await receive(ws), await receive(ws)
            assert error["error"] == "max_active_conversations" and error["contextId"] == "two"
            assert final == {"isFinal": True, "contextId": "two"}
            async with open_socket(url(srv)) as extra:  # one socket too many
                messages, code = await closed_with(extra)
            assert code == 1013 and messages[0]["error"] == "limit_exceeded"
            await send(ws, {"text": SENTENCE, "context_id": "one"}, {"context_id": "one", "flush": True})
            await send(ws, {"context_id": "one", "close_context": True})
            check_speech(await until_final(ws, "one"), SENTENCE)
            srv.state.admission.draining = True
            await send(ws, {"text": " ", "context_id": "late"})
            assert (await receive(ws))["error"] == "draining"
            assert await receive(ws) == {"isFinal": True, "contextId": "late"}
        async with open_socket(url(srv)) as ws:
            messages, code = await closed_with(ws)
        assert code == 1001 and messages[0]["error"] == "draining"
        await nothing_left(srv)


async def test_server_drain_lets_a_flushed_context_finish_then_closes_with_1001(engine):
    with run_server(engine, grace_seconds=60) as srv:
        async with open_socket(url(srv)) as ws:
            await send(ws, {"text": SENTENCE, "context_id": "last"}, {"context_id": "last", "flush": True})
            await send(ws, {"context_id": "last", "close_context": True})
            first = await receive(ws)
            assert first.get("audio")
            drained = asyncio.create_task(asyncio.to_thread(srv.call, srv.state.drain))
            rest, code = await closed_with(ws)
            await drained
        check_speech([first, *rest], SENTENCE)
        assert code == 1001
        await nothing_left(srv)


async def test_slow_reader_loses_its_context_and_the_socket_carries_on(engine):
    with run_server(engine, send_timeout_seconds=1) as srv:
        sock = small_buffer_socket(srv)
        async with connect(url(srv, output_format="pcm_48000"), sock=sock, max_queue=1, proxy=None, compression=None) as ws:

            async def slow_is_open() -> bool:
                return any("slow" in c for c in srv.state.context_sets)

            await shrink_server_send_buffers(srv)
            await send(ws, {"text": PARAGRAPH * 4, "context_id": "slow"}, {"context_id": "slow", "flush": True})
            async with asyncio.timeout(TIMEOUT):  # not reading at all, until the server gives up on the context
                while not await asyncio.to_thread(srv.call, slow_is_open):
                    await asyncio.sleep(0.05)
                while await asyncio.to_thread(srv.call, slow_is_open):
                    await asyncio.sleep(0.05)
            messages = await until_final(ws, "slow")
            await send(ws, {"context_id": "nothing", "flush": True})
            assert (await receive(ws))["error"] == "unknown_context"
    assert [m["error"] for m in messages if "error" in m] == ["slow_consumer"]
    assert len(audio_of(messages)) / 2 / 48000 < 30  # dropped long before the text's ~50 s were spoken
