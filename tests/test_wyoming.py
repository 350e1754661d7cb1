"""The Wyoming server, driven by the `wyoming` package's own client, as Home Assistant drives it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped, SynthesizeVoice

from server_harness import RunningServer, free_port, run_server
from voxflow.streaming.engine import Engine
from voxflow.transports.wyoming_protocol import VoiceChoice, choose_voice
from voxflow.voices.voice import VoiceInfo

VOICE = "en_US-joe-medium"
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def wyoming(engine: Engine) -> Iterator[tuple[RunningServer, int]]:
    port = free_port()
    with run_server(engine, wyoming_url=f"tcp://127.0.0.1:{port}") as running:
        yield running, port


async def read(client: AsyncTcpClient) -> Event:
    event = await asyncio.wait_for(client.read_event(), TIMEOUT)
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


async def test_disconnect_cancels_synthesis(wyoming: tuple[RunningServer, int]) -> None:
    server, port = wyoming
    long_text = " ".join(["This sentence keeps the voice busy for a while."] * 20)

    async def voxflow_tasks() -> list[str]:
        return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("voxflow-")]

    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Synthesize(long_text).event())
        await read_until(client, "audio-chunk")
        assert await asyncio.to_thread(server.call, voxflow_tasks)  # synthesis is running
    for _ in range(50):
        left = await asyncio.to_thread(server.call, voxflow_tasks)
        if not left:
            break
        await asyncio.sleep(0.1)
    assert left == []


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
