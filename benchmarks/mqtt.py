"""MQTT latency: a `say` request to its first audio message, through a real mosquitto.

Starts mosquitto (tests/mosquitto_harness.py) and `voxflow serve --mqtt URL` as their own
processes (audio cache off, so every run synthesizes), waits for /health and the bridge's
`online`, then measures from this process: publish a 6-word `say`, time until the first audio
message of that request arrives; the next run starts after its `done`. Prints a table and
writes JSON (default benchmarks/results/mqtt.json).

    python benchmarks/mqtt.py [--runs 30] [--out PATH] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import sys
import time
from pathlib import Path

import aiomqtt
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from mosquitto_harness import Broker, start_mosquitto  # noqa: E402
from report import add_check_flag, finish, stamp, write_json
from serve_process import voxflow_serve  # noqa: E402

SIX_WORDS = [
    "The quick brown fox jumps high.", "Please close the door behind you.", "I will call you back soon.",
    "Your order ships on Monday morning.", "The meeting starts in ten minutes.", "Let me check that for you.",
    "It looks like rain this afternoon.", "Turn left at the next light.", "Dinner is ready in the kitchen.",
    "We found three results for you.",
]
DEVICE = "bench"
FIRST_AUDIO_P50_MS = 150


async def first_audio_ms(client: aiomqtt.Client, request_id: str, text: str) -> float:
    t0 = time.perf_counter()
    await client.publish(f"voxflow/{DEVICE}/say", json.dumps({"text": text, "id": request_id}), qos=1)
    first = None
    async with asyncio.timeout(30):
        async for message in client.messages:
            if "/audio/" in message.topic.value:
                if first is None:
                    first = (time.perf_counter() - t0) * 1000
                continue
            event = json.loads(bytes(message.payload))
            if event["type"] == "error":
                raise RuntimeError(f"server error: {event}")
            if event["type"] == "done" and event["id"] == request_id:
                break
    if first is None:
        raise RuntimeError("no audio")
    return first


async def measure(broker: Broker, runs: int) -> list[float]:
    # A speaker's client should not hold small messages back either (Nagle, ~40 ms a hop).
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5, socket_options=nodelay) as client:
        await client.subscribe("voxflow/status", qos=1)
        async with asyncio.timeout(60):
            async for message in client.messages:
                if message.payload == b"online":
                    break
        await client.unsubscribe("voxflow/status")
        for kind in ("event", "error", "audio/+"):
            await client.subscribe(f"voxflow/{DEVICE}/{kind}", qos=1)
        await first_audio_ms(client, "warmup", "Warming up the connection path.")
        return [await first_audio_ms(client, f"run{i}", SIX_WORDS[i % len(SIX_WORDS)]) for i in range(runs)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/mqtt.json")
    add_check_flag(parser)
    args = parser.parse_args()

    broker = start_mosquitto()
    try:
        with voxflow_serve("--mqtt", broker.url, env={"VOXFLOW_CACHE_ENABLED": "false"}):
            samples = asyncio.run(measure(broker, args.runs))
    finally:
        broker.stop()
        shutil.rmtree(broker.directory, ignore_errors=True)

    p50, p95 = (float(np.percentile(samples, q)) for q in (50, 95))
    targets = {"first_audio_p50": p50 <= FIRST_AUDIO_P50_MS}
    result = {
        **stamp(),
        "runs": args.runs,
        "say_request_to_first_audio_message_6_words_ms": {"p50": round(p50, 1), "p95": round(p95, 1)},
        "targets": targets,
    }
    print("## MQTT\n")
    print("| measure | p50 | p95 | target |")
    print("|---|---|---|---|")
    print(f"| say -> first audio message, 6 words ({args.runs} runs) | {p50:.1f} ms | {p95:.1f} ms | p50 <= {FIRST_AUDIO_P50_MS} ms |")
    write_json(args.out, result)
    finish([name for name, met in targets.items() if not met], args.check)


if __name__ == "__main__":
    main()
