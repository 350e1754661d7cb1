"""Wyoming latency: request to first audio-chunk, as Home Assistant sends a streaming request.

Starts `voxflow serve --wyoming tcp://127.0.0.1:PORT` as its own process (audio cache off, so
every run synthesizes) and measures from this process with the `wyoming` package's client:
synthesize-start, one synthesize-chunk holding a 6-word sentence, synthesize-stop, all sent
at once; the time runs from the first write to the first audio-chunk. Prints a table and
writes JSON (default benchmarks/results/wyoming.json).

    python benchmarks/wyoming_latency.py [--runs 30] [--out PATH] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np
from wyoming.client import AsyncTcpClient
from wyoming.tts import SynthesizeChunk, SynthesizeStart, SynthesizeStop
from report import add_check_flag, finish, stamp, write_json
from serve_process import free_port, voxflow_serve

FIRST_AUDIO_P50_MS = 150.0

SIX_WORDS = [
    "The quick brown fox jumps high.", "Please close the door behind you.", "I will call you back soon.",
    "Your order ships on Monday morning.", "The meeting starts in ten minutes.", "Let me check that for you.",
    "It looks like rain this afternoon.", "Turn left at the next light.", "Dinner is ready in the kitchen.",
    "We found three results for you.",
]


async def first_chunk_ms(port: int, text: str) -> float:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        t0 = time.perf_counter()
        await client.write_event(SynthesizeStart().event())
        await client.write_event(SynthesizeChunk(text).event())
        await client.write_event(SynthesizeStop().event())
        first = None
        while (event := await asyncio.wait_for(client.read_event(), 30)) is not None:
            if first is None and event.type == "audio-chunk":
                first = (time.perf_counter() - t0) * 1000
            if event.type == "error":
                raise RuntimeError(f"server error: {event.data}")
            if event.type == "synthesize-stopped":
                break
    if first is None:
        raise RuntimeError("no audio")
    return first


async def measure(port: int, runs: int) -> list[float]:
    await first_chunk_ms(port, "Warming up the connection path.")
    return [await first_chunk_ms(port, SIX_WORDS[i % len(SIX_WORDS)]) for i in range(runs)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/wyoming.json")
    add_check_flag(parser)
    args = parser.parse_args()

    wyoming_port = free_port()
    with voxflow_serve("--wyoming", f"tcp://127.0.0.1:{wyoming_port}", env={"VOXFLOW_CACHE_ENABLED": "false"}):
        samples = asyncio.run(measure(wyoming_port, args.runs))

    p50, p95 = (float(np.percentile(samples, q)) for q in (50, 95))
    # The smart-speaker budget the MQTT path has: a speaker on either protocol waits the same.
    targets = {"first_audio_p50": p50 <= FIRST_AUDIO_P50_MS}
    result = {
        **stamp(),
        "runs": args.runs,
        "streaming_request_to_first_audio_chunk_6_words_ms": {"p50": round(p50, 1), "p95": round(p95, 1)},
        "targets": targets,
    }
    print("## Wyoming\n")
    print("| measure | p50 | p95 | target |")
    print("|---|---|---|---|")
    print(f"| synthesize-start/chunk/stop -> first audio-chunk, 6 words ({args.runs} runs) | {p50:.1f} ms | {p95:.1f} ms | p50 <= {FIRST_AUDIO_P50_MS:.0f} ms |")
    write_json(args.out, result)
    finish([name for name, met in targets.items() if not met], args.check)


if __name__ == "__main__":
    main()
