"""The ElevenLabs WebSocket endpoint driven by the framework plugins our users run, unmodified
but for their base URL: Pipecat's ElevenLabsTTSService and LiveKit's elevenlabs.TTS.stream().

Each client rebuilds word times from the alignment it receives, in its own way (see
elevenlabs_protocol.AudioPacker); every rebuilt word must land within one 20 ms frame of the
time the server spoke it, counted from the context's first audio.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp
import numpy as np
import pytest
from livekit.agents import APIConnectOptions
from livekit.plugins import elevenlabs as livekit_elevenlabs
from pipecat.services.elevenlabs.tts import ElevenLabsTTSService

from pipecat_runner import RecordsWordTimes, assert_words_match, speak_through
from voxflow.transports.protocols import elevenlabs_protocol
from voxflow.transports.protocols.elevenlabs_protocol import AudioPacker

VOICE_ID = "21m00Tcm4TlvDq8ikWCM"  # ElevenLabs' "Rachel": not a voice here, so the default voice speaks
REPLY = (
    "Sure, I can help with that. The weather tomorrow looks mild, with a light breeze in the "
    "morning and some sun in the afternoon. If you are heading out, a thin jacket should be enough."
)
TIMEOUT = 180  # generous: the suite shares two cores


@dataclass
class SpokenContext:
    """What the server's packer for one context was given: the truth the clients must rebuild."""

    first_audio: float | None = None
    words: list[tuple[str, float]] = field(default_factory=list)

    def word_times(self) -> list[tuple[str, float]]:
        assert self.first_audio is not None
        return [(w, start - self.first_audio) for w, start in self.words]


@pytest.fixture
def spoken(monkeypatch) -> dict[int, SpokenContext]:
    """Records, per packer (one per context), the words and first audio it was handed."""
    contexts: dict[int, SpokenContext] = {}
    add_word, add_audio = AudioPacker.add_word, AudioPacker.add_audio

    def recorded(packer: AudioPacker) -> SpokenContext:
        return contexts.setdefault(id(packer), SpokenContext())

    def spy_word(self, word, start, end, written=None):
        recorded(self).words.append((written or word, start))
        add_word(self, word, start, end, written)

    def spy_audio(self, pts, pcm):
        context = recorded(self)
        context.first_audio = pts if context.first_audio is None else context.first_audio
        add_audio(self, pts, pcm)

    monkeypatch.setattr(elevenlabs_protocol.AudioPacker, "add_word", spy_word)
    monkeypatch.setattr(elevenlabs_protocol.AudioPacker, "add_audio", spy_audio)
    return contexts


# -- Pipecat ----------------------------------------------------------------------------------


class _TimedElevenLabs(RecordsWordTimes, ElevenLabsTTSService):
    pass


async def test_pipecat_elevenlabs_service_gets_audio_and_word_times(server, spoken):
    tts = _TimedElevenLabs(
        api_key="unused-without-keys",
        url=server.ws,
        settings=ElevenLabsTTSService.Settings(voice=VOICE_ID, model="eleven_flash_v2_5"),
    )
    audio = await speak_through(tts, REPLY, 24000, TIMEOUT)

    [context] = spoken.values()
    seconds = len(audio) / 2 / 24000
    assert seconds > 5
    truth = context.word_times()
    assert truth[-1][1] < seconds
    assert_words_match(tts.word_times, truth)


# -- LiveKit ----------------------------------------------------------------------------------


async def livekit_stream(server, encoding: str) -> tuple[np.ndarray, int, list[tuple[str, float]]]:
    """LiveKit's plugin as an agent uses it: tokens pushed into stream(), audio and the aligned
    transcript (TimedString words on its frames) read back."""
    async with aiohttp.ClientSession() as session:
        tts = livekit_elevenlabs.TTS(
            api_key="unused-without-keys", base_url=f"{server.http}/v1", voice_id=VOICE_ID,
            encoding=encoding, http_session=session,
        )
        stream = tts.stream(conn_options=APIConnectOptions(max_retry=0, timeout=60))
        for token in REPLY.split(" "):
            stream.push_text(token + " ")
        stream.end_input()
        chunks, words = [], []
        async with asyncio.timeout(TIMEOUT):
            async for event in stream:
                chunks.append(event.frame.data.tobytes())
                words += [(str(t).strip(), t.start_time) for t in event.frame.userdata.get("lk.timed_transcripts", [])]
        await stream.aclose()
        await tts.aclose()
    pcm = np.frombuffer(b"".join(chunks), "<i2")
    return pcm, tts.sample_rate, [(w, t) for w, t in words if w]


@pytest.mark.parametrize("encoding", ["pcm_24000", "mp3_22050_32"])
async def test_livekit_elevenlabs_stream_gets_audio_and_word_times(server, spoken, encoding):
    # mp3_22050_32 is the plugin's default, decoded by LiveKit itself.
    pcm, rate, words = await livekit_stream(server, encoding)
    [context] = spoken.values()
    truth = context.word_times()
    seconds = len(pcm) / rate
    assert seconds > 5 and truth[-1][1] < seconds
    assert_words_match(words, truth)
