"""Server latency, concurrency and cache figures over the native WebSocket protocol.

Starts `voxflow serve` as its own process on a free loopback port (cache on, in a temporary
file) and measures from this process, as a client would. Prints a table and writes JSON
(default benchmarks/results/server.json).

    python benchmarks/server.py [--runs 30] [--sweep 1,4,8,16] [--out PATH] [--check]

Underruns: each client plays its audio in real time from the arrival of its first frame plus
a jitter buffer (--jitter-ms, default 60 ms); a frame that arrives after its play-out time
(first arrival + jitter + pts) is an underrun.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
from websockets.asyncio.client import connect

from report import add_check_flag, finish, print_table, stamp, write_json
from serve_process import voxflow_serve
from voxflow.streaming.tokens import gpt_like_tokens, paced
from voxflow.transports.protocols.native_protocol import (
    AudioPacket, Done, End, Error, Start, Text, parse_server, serialize_client,
)

SIX_WORDS = [
    "The quick brown fox jumps high.", "Please close the door behind you.", "I will call you back soon.",
    "Your order ships on Monday morning.", "The meeting starts in ten minutes.", "Let me check that for you.",
    "It looks like rain this afternoon.", "Turn left at the next light.", "Dinner is ready in the kitchen.",
    "We found three results for you.",
]
REPLY = (
    "Sure, I can help with that. Your flight leaves at seven in the morning from gate twelve, "
    "so I would plan to arrive at the airport by half past five. The weather at your destination "
    "looks warm and sunny for the whole week."
)
# No clause boundary early on: the first chunk waits for four words, as most replies do.
FIRST_CLAUSE_LATE = "I checked your calendar and you have a free slot tomorrow afternoon between two and four."
CACHED = "One moment, please."  # a default warm-up phrase: in the cache from startup


@dataclass
class Run:
    first_audio_ms: float | None = None
    underruns: int = 0
    frames: int = 0
    error: str | None = None
    arrivals: list[tuple[float, float]] = field(default_factory=list)  # (arrival, pts)


async def speak(url: str, context: str, fragments, *, flush: bool = False, jitter: float = 0.06, seed: int | None = None) -> Run:
    """Send fragments (a list, or an async iterator for paced tokens); time from the first send."""
    run = Run()
    async with connect(url, max_size=None) as ws:
        await ws.recv()  # ready
        await ws.send(serialize_client(Start(context=context, seed=seed)))
        start = None
        if isinstance(fragments, list):
            # A whole utterance in one message, the way an app sends a canned phrase.
            start = time.perf_counter()
            await ws.send(serialize_client(Text(context=context, text="".join(fragments), flush=flush, end=not flush)))
            if flush:
                await ws.send(serialize_client(End(context=context)))
        else:
            async def feed() -> None:
                nonlocal start
                async for token in fragments:
                    start = start or time.perf_counter()
                    await ws.send(serialize_client(Text(context=context, text=token)))
                await ws.send(serialize_client(End(context=context)))
            feeder = asyncio.create_task(feed())
        first = None
        async for data in ws:
            msg = parse_server(data)
            now = time.perf_counter()
            if isinstance(msg, AudioPacket):
                if first is None:
                    first = now
                    run.first_audio_ms = (now - start) * 1000
                run.frames += 1
                if now > first + jitter + msg.pts:
                    run.underruns += 1
            elif isinstance(msg, Done):
                break
            elif isinstance(msg, Error):
                run.error = f"{msg.code}: {msg.message}"
                break
        if not isinstance(fragments, list):
            await feeder
    return run


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def concurrency(url: str, n: int, tps: float, jitter: float) -> dict:
    runs = await asyncio.gather(*(speak(url, f"c{i}", paced(gpt_like_tokens(REPLY), tps), jitter=jitter) for i in range(n)))
    firsts = [r.first_audio_ms for r in runs if r.first_audio_ms is not None]
    return {
        "streams": n,
        "first_audio_p50_ms": pct(firsts, 50),
        "first_audio_p95_ms": pct(firsts, 95),
        "underruns": sum(r.underruns for r in runs),
        "frames": sum(r.frames for r in runs),
        "errors": [r.error for r in runs if r.error],
    }


async def measure(url: str, args: argparse.Namespace) -> dict:
    for _ in range(3):  # connection and first-request warm-up
        await speak(url, "warm", ["Warming up."], flush=True)
    # A seed of its own per run: the same sentence and seed would be answered from the cache.
    flushed = [
        (await speak(url, "f", [SIX_WORDS[i % len(SIX_WORDS)]], flush=True, seed=1000 + i)).first_audio_ms
        for i in range(args.runs)
    ]
    at_50 = [(await speak(url, "t", paced(gpt_like_tokens(FIRST_CLAUSE_LATE), 50))).first_audio_ms for _ in range(max(5, args.runs // 3))]
    cache_hit = [(await speak(url, "h", [CACHED])).first_audio_ms for _ in range(args.runs)]
    sweep = [await concurrency(url, n, 50, args.jitter_ms / 1000) for n in args.sweep]
    holds = [s["streams"] for s in sweep if s["underruns"] == 0 and not s["errors"] and (s["first_audio_p95_ms"] or 1e9) <= 300]
    return {
        "first_audio_after_flush_6_words_ms": {"p50": pct(flushed, 50), "p95": pct(flushed, 95), "n": len(flushed)},
        "first_audio_after_first_token_50tps_ms": {"p50": pct(at_50, 50), "p95": pct(at_50, 95), "n": len(at_50)},
        "cache_hit_first_audio_ms": {"p50": pct(cache_hit, 50), "p95": pct(cache_hit, 95), "n": len(cache_hit)},
        "concurrency": sweep,
        "largest_count_holding": max(holds) if holds else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--sweep", default="1,4,8,16")
    parser.add_argument("--jitter-ms", type=float, default=60.0)
    parser.add_argument("--out", default="benchmarks/results/server.json")
    add_check_flag(parser)
    args = parser.parse_args()
    args.sweep = [int(n) for n in args.sweep.split(",")]

    cache_dir = tempfile.mkdtemp(prefix="voxflow-bench-")
    cache = {"VOXFLOW_CACHE_PATH": f"{cache_dir}/cache.sqlite3", "VOXFLOW_CACHE_ENABLED": "true"}
    with voxflow_serve(env=cache) as port:
        figures = asyncio.run(measure(f"ws://127.0.0.1:{port}/v1/stream", args))

    result = {
        **stamp(),
        "jitter_buffer_ms": args.jitter_ms,
        **figures,
    }
    f, t, h = (result[k] for k in ("first_audio_after_flush_6_words_ms", "first_audio_after_first_token_50tps_ms", "cache_hit_first_audio_ms"))
    rows = [
        ("first audio byte after flush, 6 words (p50 / p95)", f"{f['p50']:.1f} / {f['p95']:.1f} ms", "<= 60 / 120 ms"),
        ("first audio byte after first token, 50 tok/s (p50)", f"{t['p50']:.1f} ms", "<= 220 ms"),
        ("cache hit: first audio byte (p50 / p95)", f"{h['p50']:.1f} / {h['p95']:.1f} ms", "<= 5 ms"),
    ]
    for s in result["concurrency"]:
        rows.append((f"{s['streams']:>2} concurrent streams at 50 tok/s: p95 first audio, underruns",
                     f"{s['first_audio_p95_ms']:.0f} ms, {s['underruns']} of {s['frames']}" + (f", errors {len(s['errors'])}" if s["errors"] else ""),
                     "8 streams: 0 underruns, p95 <= 300 ms"))
    rows.append(("largest concurrent count holding the target", str(result["largest_count_holding"]), ">= 8"))
    targets = {
        "flush_p50": f["p50"] <= 60,
        "flush_p95": f["p95"] <= 120,
        "first_token_50tps_p50": t["p50"] <= 220,
        "cache_hit_p95": h["p95"] <= 5,
        "eight_streams_real_time": result["largest_count_holding"] >= 8,
    }
    result["targets"] = targets
    print_table(rows)
    write_json(args.out, result)
    finish([name for name, met in targets.items() if not met], args.check)


if __name__ == "__main__":
    main()
