"""Stream an LLM-like reply into voxflow token by token and write what it says to a WAV file.

    .venv/bin/python demos/stream_tokens.py [--tps 50] [-o reply.wav]

Prints when the first audio arrived after the first token, and each word as its timestamp
arrives, the way a caption track or a barge-in handler would consume them.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import wave

from voxflow.streaming.engine import Engine
from voxflow.streaming.events import AudioFrame, StreamEnd, WordTimestamp
from voxflow.streaming.tokens import gpt_like_tokens, paced

REPLY = (
    "Sure! Here's the plan for tomorrow: **breakfast** at eight, a short walk by the river, "
    "and then the museum, which opens at ten. Does that sound good to you?"
)


async def main(tps: float, output: str) -> None:
    engine = Engine()
    await engine.warm_up()
    stream = engine.open_stream()
    start = time.perf_counter()

    async def llm() -> None:
        async for token in paced(gpt_like_tokens(REPLY), tps):
            await stream.push(token)
        await stream.end()

    writer = asyncio.create_task(llm())
    with wave.open(output, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(engine.voice().sample_rate)
        async for event in stream:
            if isinstance(event, AudioFrame):
                if event.seq == 0:
                    print(f"first audio {1000 * (time.perf_counter() - start):.0f} ms after the first token")
                wav.writeframes(event.pcm)
            elif isinstance(event, WordTimestamp):
                print(f"  {event.start:6.2f}-{event.end:6.2f} s  {event.word}")
            elif isinstance(event, StreamEnd):
                print(f"stream ended: {event.reason} {event.message}")
    await writer
    engine.close()
    print(f"wrote {output}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tps", type=float, default=50.0, help="tokens per second")
    parser.add_argument("-o", "--output", default="reply.wav")
    args = parser.parse_args()
    asyncio.run(main(args.tps, args.output))
