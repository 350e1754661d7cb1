"""Speak an LLM's reply through a voxflow server while the reply is still being generated.

    .venv/bin/voxflow serve                       # in another terminal
    .venv/bin/python demos/ws_client.py [--server ws://127.0.0.1:8765/v1/stream] [-o reply.wav]

`llm_reply()` stands in for a chat model: it yields GPT-like tokens at about 50 per second.
To speak a real OpenAI-compatible model's reply, replace it with:

    from openai import AsyncOpenAI

    async def llm_reply() -> AsyncIterator[str]:
        stream = await AsyncOpenAI().chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Plan my day."}], stream=True
        )
        async for chunk in stream:
            yield chunk.choices[0].delta.content or ""

(`AsyncOpenAI(base_url=...)` points it at any compatible server.)
"""

from __future__ import annotations

import argparse
import asyncio
import time
import wave
from typing import AsyncIterator

from voxflow.client import AsyncVoxflowClient, Audio, Error, Metrics, Word
from voxflow.streaming.tokens import gpt_like_tokens, paced

REPLY = (
    "Sure! Here's the plan for tomorrow: breakfast at eight, a short walk by the river, "
    "and then the museum, which opens at ten. Does that sound good to you?"
)


async def llm_reply() -> AsyncIterator[str]:
    async for token in paced(gpt_like_tokens(REPLY), 50):
        yield token


async def main(server: str, output: str) -> None:
    async with AsyncVoxflowClient(server) as client, client.context() as ctx:
        start = time.perf_counter()

        async def speak_reply() -> None:
            async for token in llm_reply():
                ctx.push(token)
            ctx.end()

        reply = asyncio.create_task(speak_reply())
        pcm = bytearray()
        async for event in ctx:
            if isinstance(event, Audio):
                if event.seq == 0:
                    print(f"first audio {1000 * (time.perf_counter() - start):.0f} ms after the first token")
                pcm += event.pcm
            elif isinstance(event, Word):
                print(f"  {event.start:6.2f}-{event.end:6.2f} s  {event.word}")
            elif isinstance(event, Metrics):
                print(f"server: first audio {event.first_audio_ms or 0:.0f} ms, real-time factor {event.rtf or 0:.2f}")
            elif isinstance(event, Error):
                raise SystemExit(f"error [{event.code}]: {event.message}")
        await reply

    rate = ctx.sample_rate or 0  # the server's `started` reply set it before any audio
    with wave.open(output, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm)
    print(f"wrote {len(pcm) / 2 / rate:.1f} s of audio to {output}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="ws://127.0.0.1:8765/v1/stream")
    parser.add_argument("-o", "--output", default="reply.wav")
    args = parser.parse_args()
    asyncio.run(main(args.server, args.output))
