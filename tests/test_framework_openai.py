"""The OpenAI speech endpoint driven by the framework plugins our users run, unmodified but for
their base URL: Pipecat's OpenAITTSService, LiveKit's openai.TTS (whole text) and LiveKit's
StreamAdapter around it (LLM tokens in, one request per sentence)."""

from __future__ import annotations

import asyncio

import numpy as np
from livekit.agents import APIConnectOptions, tokenize, tts
from livekit.plugins import openai as livekit_openai
from openai import AsyncOpenAI
from pipecat.services.openai.tts import OpenAITTSService

from pipecat_runner import speak_through
from voxflow.streaming.tokens import gpt_like_tokens

RATE = 24_000  # OpenAI's rate, which every one of these clients assumes
SENTENCE = "The weather tomorrow looks mild, with a light breeze in the morning."
REPLY = "Sure, I can help with that. " + SENTENCE + " A thin jacket should be enough."
TIMEOUT = 180  # generous: the suite shares two cores
NO_RETRY = APIConnectOptions(max_retry=0, timeout=60)


async def reference_seconds(server, text: str) -> float:
    """The same text through the official SDK, as raw PCM: how long it should last."""
    client = AsyncOpenAI(base_url=f"{server.http}/v1", api_key="unused-without-keys", max_retries=0)
    response = await client.audio.speech.create(model="tts-1", voice="alloy", input=text, response_format="pcm")
    return len(response.content) / 2 / RATE


def loud(pcm: np.ndarray) -> bool:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) > 300


async def test_pipecat_openai_service(server):
    service = OpenAITTSService(
        api_key="unused-without-keys", base_url=f"{server.http}/v1", sample_rate=RATE,
        settings=OpenAITTSService.Settings(voice="alloy"),
    )
    pcm = np.frombuffer(await speak_through(service, SENTENCE, RATE, TIMEOUT), "<i2")
    assert abs(len(pcm) / RATE - await reference_seconds(server, SENTENCE)) < 0.05
    assert loud(pcm)


async def collect(stream: tts.ChunkedStream | tts.SynthesizeStream) -> np.ndarray:
    chunks = []
    async with asyncio.timeout(TIMEOUT):
        async for event in stream:
            assert event.frame.sample_rate == RATE
            chunks.append(event.frame.data.tobytes())
    return np.frombuffer(b"".join(chunks), "<i2")


async def test_livekit_openai_tts_synthesize(server):
    # Its default response format is mp3, decoded by LiveKit.
    plugin = livekit_openai.TTS(base_url=f"{server.http}/v1", api_key="unused-without-keys", voice="alloy")
    async with plugin.synthesize(SENTENCE, conn_options=NO_RETRY) as stream:
        pcm = await collect(stream)
    await plugin.aclose()
    # mp3 decoding adds the encoder's delay and padding: a few tens of ms.
    assert abs(len(pcm) / RATE - await reference_seconds(server, SENTENCE)) < 0.15
    assert loud(pcm)


async def test_livekit_stream_adapter_over_openai_tts(server):
    adapter = tts.StreamAdapter(
        tts=livekit_openai.TTS(base_url=f"{server.http}/v1", api_key="unused-without-keys", voice="alloy"),
        sentence_tokenizer=tokenize.basic.SentenceTokenizer(),
    )
    stream = adapter.stream(conn_options=NO_RETRY)
    for token in gpt_like_tokens(REPLY):
        stream.push_text(token)
    stream.end_input()
    pcm = await collect(stream)
    await stream.aclose()
    await adapter.aclose()
    # One request per sentence, each its own mp3: three sentences' worth of speech.
    expected = sum([await reference_seconds(server, s) for s in ("Sure, I can help with that.", SENTENCE, "A thin jacket should be enough.")])
    assert abs(len(pcm) / RATE - expected) < 0.4
    assert loud(pcm)
