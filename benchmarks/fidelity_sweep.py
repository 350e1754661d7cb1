"""The measurements behind the streaming defaults: lookahead, left context, first chunk, settle.

Each setting is a point `LOOKAHEAD,CONTEXT,FIRST_WORDS,SETTLE_S` (lookahead and left context in
phonemes, words in the first chunk, seconds of audio a say settles while its sentence goes on).
For each, every second reply of benchmarks/fidelity.py is streamed with noise off at 20 and
50 tokens/s and compared with its whole rendering: the share of equal phoneme durations, the
total-duration ratio, MCD after DTW, F0 correlation and first audio (the same measures as
fidelity.py, on half the items, without the recognizer, so a point takes about a minute).
--check exits 1 when a point misses fidelity.py's noise-off or first-audio targets.

    python benchmarks/fidelity_sweep.py [--out PATH] [--check] POINT [POINT ...]
    e.g. python benchmarks/fidelity_sweep.py 0,96,3,0.3 4,96,3,0.3 8,96,3,0.3 8,48,3,0.3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from dataclasses import dataclass

from fidelity import FIRST_AUDIO_P50_MS, ITEMS, MAX_DURATION_DRIFT, MIN_EQUAL_DURATIONS, QUIET, RATES, equal_durations, recorded_durations, render_streamed, render_whole, signal_distance
from report import add_check_flag, finish, stamp, write_json
from voxflow.config import EngineConfig
from voxflow.streaming.acoustic import AcousticOptions
from voxflow.streaming.chunker import ChunkerOptions
from voxflow.streaming.engine import Engine
from voxflow.streaming.stream import StreamOptions


@dataclass(frozen=True)
class Point:
    lookahead: int
    context: int
    first_words: int
    settle_s: float

    @classmethod
    def parse(cls, text: str) -> "Point":
        lookahead, context, first_words, settle_s = text.split(",")
        return cls(int(lookahead), int(context), int(first_words), float(settle_s))

    def options(self) -> StreamOptions:
        return StreamOptions(
            settle_audio_s=self.settle_s,
            acoustic=AcousticOptions(context_phonemes=self.context, lookahead_phonemes=self.lookahead),
            chunker=ChunkerOptions(first_chunk_words=self.first_words),
        )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("points", nargs="+", type=Point.parse)
    parser.add_argument("--out", default="benchmarks/results/fidelity-sweep.json")
    add_check_flag(parser)
    args = parser.parse_args()

    engine = Engine(EngineConfig())
    await engine.warm_up()
    wholes = []
    for _, text in ITEMS[::2]:
        with recorded_durations() as trace:
            audio, rate = render_whole(engine, text, QUIET)
        wholes.append((text, trace, audio, rate))

    rows = []
    for point in args.points:
        for tps in RATES:
            equal = total = 0
            ratios, mcds, f0s, firsts = [], [], [], []
            for text, whole_trace, whole, rate in wholes:
                with recorded_durations() as trace:
                    streamed, _, first_ms = await render_streamed(engine, text, QUIET, tps, point.options())
                equal += equal_durations(whole_trace, trace)
                total += len(whole_trace.ids)
                ratios.append(trace.frames / whole_trace.frames)
                mcd, f0 = signal_distance(whole, streamed, rate)
                mcds.append(mcd)
                if f0 is not None:
                    f0s.append(f0)
                firsts.append(first_ms)
            row = {
                **vars(point), "tokens_per_second": tps, "equal_durations": round(equal / total, 3),
                "duration_ratio": round(sum(ratios) / len(ratios), 4), "mcd": round(statistics.mean(mcds), 2),
                "f0_corr": round(statistics.mean(f0s), 3), "first_audio_p50_ms": round(statistics.median(firsts), 1),
            }
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr)
    engine.close()

    print(f"{'lookahead':>9} {'context':>7} {'first':>5} {'settle':>6} {'tok/s':>5} {'equal dur':>9} {'ratio':>7} {'MCD':>6} {'F0 r':>6} {'first ms':>8}")
    for r in rows:
        print(
            f"{r['lookahead']:>9} {r['context']:>7} {r['first_words']:>5} {r['settle_s']:>6} {r['tokens_per_second']:>5} "
            f"{r['equal_durations']:>9} {r['duration_ratio']:>7} {r['mcd']:>6} {r['f0_corr']:>6} {r['first_audio_p50_ms']:>8}"
        )
    # A point is admissible when it meets fidelity.py's noise-off and latency targets.
    missed = [
        f"{r['lookahead']},{r['context']},{r['first_words']},{r['settle_s']}@{r['tokens_per_second']}"
        for r in rows
        if r["equal_durations"] < MIN_EQUAL_DURATIONS
        or abs(r["duration_ratio"] - 1) > MAX_DURATION_DRIFT
        or r["first_audio_p50_ms"] > FIRST_AUDIO_P50_MS[r["tokens_per_second"]]
    ]
    write_json(args.out, {**stamp(), "rows": rows, "points_missing_targets": missed})
    finish(missed, args.check)


if __name__ == "__main__":
    asyncio.run(main())
