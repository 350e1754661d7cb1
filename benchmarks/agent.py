"""Conversation agent: voice-to-voice latency and barge-in stop latency, with the echo responder.

Calls are made with the engine itself (the tests' conversation_audio: engine speech over seeded
background noise) and replayed in real time through the real agent, exactly as
`voxflow agent --input-wav ...` does: webrtcvad, the turn detector, pocketsphinx, the echo
responder, the engine, the playout.

- Voice-to-voice: a call of --turns requests, each followed by silence long enough for the
  echo to finish. Per turn, from the end of the person's speech to the first bot audio, and
  its parts: the end-of-turn wait (turn_end_ms of silence), ASR finalisation, the LLM's first
  text, the engine's first audio.
- Barge-in: a call where the person talks over each long reply --barge-ins times. Stop latency
  is measured twice: as the agent reports it (decision -> end of the last frame handed out)
  and independently from the bot's WAV (decision -> the last non-silent sample of the cut
  reply).

    python benchmarks/agent.py [--turns 12] [--barge-ins 8] [--out PATH] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

from report import add_check_flag, finish, print_table, stamp, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tests' call maker
from conversation_audio import compose, write_wav  # noqa: E402

from voxflow.agent.events import BotStarted, Interrupted, SpeechStarted, TurnMetrics  # noqa: E402
from voxflow.agent.replay import replay  # noqa: E402
from voxflow.config import AgentConfig, EngineConfig  # noqa: E402
from voxflow.streaming.engine import Engine  # noqa: E402

REQUESTS = [
    "please turn on the kitchen lights", "what time is it in london", "set a timer for ten minutes",
    "play some quiet music", "how is the weather tomorrow", "call my sister please",
    "add milk to the shopping list", "turn the heating down a little", "what is on my calendar today",
    "read me the latest news", "open the garage door", "remind me to water the plants",
]
LONG = "the weather today will be sunny in the morning with clouds later and a light wind from the west"
PARTS = ("end_of_turn_ms", "asr_ms", "llm_first_token_ms", "tts_first_audio_ms", "voice_to_voice_ms")
VOICE_TO_VOICE_P50_MS = 900
STOP_MS = 100  # p95 of the barge-in stops, as reported and as measured in the WAV


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1)


def _bot_audio(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as wav:
        return np.frombuffer(wav.readframes(wav.getnframes()), "<i2"), wav.getframerate()


async def voice_to_voice(engine: Engine, turns: int, folder: Path) -> dict:
    parts = [("silence", 1.0)]
    for i in range(turns):
        parts += [("say", REQUESTS[i % len(REQUESTS)]), ("silence", 4.5)]
    call = compose(engine, parts, seed=11)
    write_wav(folder / "v2v.wav", call.audio, call.rate)
    result = await replay(engine, AgentConfig(), folder / "v2v.wav", folder / "v2v-bot.wav")
    metrics = [e for e in result.events if isinstance(e, TurnMetrics) and e.voice_to_voice_ms is not None]
    # The agent's end of speech includes webrtcvad's hang-over; this one runs from the last
    # sample of the utterance as it was laid into the call.
    bot_starts = {e.turn: e.t for e in result.events if isinstance(e, BotStarted)}
    from_sound = [round((bot_starts[turn] - end) * 1000, 1) for turn, (_, end) in enumerate(call.speech_spans, 1) if turn in bot_starts]
    return {
        "turns": turns,
        "answered": len(metrics),
        "from_last_sound_ms": {"p50": _pct(from_sound, 50), "p95": _pct(from_sound, 95)},
        **{name: {"p50": _pct([getattr(m, name) for m in metrics], 50), "p95": _pct([getattr(m, name) for m in metrics], 95)}
           for name in PARTS},
        "per_turn": [{name: getattr(m, name) for name in PARTS} for m in metrics],
    }


async def barge_in(engine: Engine, count: int, folder: Path) -> dict:
    parts = [("silence", 0.5)]
    for _ in range(count):
        # The echo starts about a second after the long sentence; "stop please" comes ~2 s into it.
        parts += [("say", LONG), ("silence", 3.0), ("say", "stop please"), ("silence", 3.5)]
    call = compose(engine, parts, seed=13)
    write_wav(folder / "barge.wav", call.audio, call.rate)
    result = await replay(engine, AgentConfig(), folder / "barge.wav", folder / "barge-bot.wav")
    bot, rate = _bot_audio(folder / "barge-bot.wav")
    starts = {e.turn: e.t for e in result.events if isinstance(e, SpeechStarted)}
    bot_starts = {e.turn: e.t for e in result.events if isinstance(e, BotStarted)}
    reported, measured = [], []
    for cut in (e for e in result.events if isinstance(e, Interrupted)):
        reported.append(cut.stop_ms)
        decision = starts[cut.by_turn]
        # The last audible sample of the cut reply lies between its start and the decision + 1 s.
        window = bot[int(bot_starts[cut.turn] * rate) : int((decision + 1.0) * rate)]
        loud = np.flatnonzero(np.abs(window.astype(np.int32)) > 0)
        last = bot_starts[cut.turn] + (loud[-1] + 1) / rate if len(loud) else decision
        measured.append(round(max(0.0, last - decision) * 1000, 1))
    return {
        "barge_ins": count,
        "interruptions": len(reported),
        "reported_stop_ms": {"p50": _pct(reported, 50), "p95": _pct(reported, 95), "max": max(reported)},
        "measured_stop_ms": {"p50": _pct(measured, 50), "p95": _pct(measured, 95), "max": max(measured)},
        "per_interruption": list(zip(reported, measured)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--barge-ins", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/agent.json")
    add_check_flag(parser)
    args = parser.parse_args()
    engine = Engine(EngineConfig())
    try:
        asyncio.run(engine.warm_up())
        with tempfile.TemporaryDirectory() as tmp:
            v2v = asyncio.run(voice_to_voice(engine, args.turns, Path(tmp)))
            barge = asyncio.run(barge_in(engine, args.barge_ins, Path(tmp)))
    finally:
        engine.close()
    rows = [("turns answered", f"{v2v['answered']} of {v2v['turns']}", "all")]
    for name in PARTS:
        target = f"p50 <= {VOICE_TO_VOICE_P50_MS}" if name == "voice_to_voice_ms" else ""
        rows.append((name.removesuffix("_ms").replace("_", " ") + " (ms)", f"p50 {v2v[name]['p50']}, p95 {v2v[name]['p95']}", target))
    rows.append(("voice to voice from the last sound (ms)", f"p50 {v2v['from_last_sound_ms']['p50']}, p95 {v2v['from_last_sound_ms']['p95']}", ""))
    rows.append(("barge-ins cut", f"{barge['interruptions']} of {barge['barge_ins']}", "all"))
    for name in ("reported_stop_ms", "measured_stop_ms"):
        b = barge[name]
        rows.append((name.removesuffix("_ms").replace("_", " ") + " (ms)", f"p50 {b['p50']}, p95 {b['p95']}, max {b['max']}", f"p95 <= {STOP_MS}"))
    targets = {
        "turns_answered": v2v["answered"] == v2v["turns"],
        "voice_to_voice_p50": v2v["voice_to_voice_ms"]["p50"] <= VOICE_TO_VOICE_P50_MS,
        "barge_ins_cut": barge["interruptions"] == barge["barge_ins"],
        "reported_stop_p95": barge["reported_stop_ms"]["p95"] <= STOP_MS,
        "measured_stop_p95": barge["measured_stop_ms"]["p95"] <= STOP_MS,
    }
    print_table(rows)
    write_json(args.out, {**stamp(), "voice_to_voice": v2v, "barge_in": barge, "targets": targets})
    finish([name for name, met in targets.items() if not met], args.check)


if __name__ == "__main__":
    main()
