"""Replicas behind HAProxy on one machine: streams held per replica count, a rolling restart and
a kill -9, measured through the load balancer as SDK clients see them.

Each replica count (--replicas, default 1,2,3) gets a cluster of its own from tests/cluster_harness.py:
mosquitto, that many `voxflow serve` processes (API keys on, HAProxy's address trusted, audio
cache off) and HAProxy on deploy/haproxy.cfg as shipped, all on loopback and all sharing this
machine's cores. Then:

1. Streams held. For each count in --streams, that many SDK clients (one connection and one
   key each, least-connections spreads them) connect, then all speak one paragraph at once as
   LLM tokens (--tps) and play it through a 100 ms jitter buffer, as benchmarks/throughput.py
   measures one server: a frame not there when due is a stall, and a count holds with no
   stall, no error and p95 first audio <= 400 ms. The replicas' CPU seconds per second of
   speech come from /proc.
2. On the largest cluster only: --speakers clients speak one short sentence after another in
   real time (tests/cluster_scenarios.py) while each replica in turn gets SIGTERM, is started
   again and taken back by HAProxy; then one replica is killed with SIGKILL and the time its
   clients take to be connected, and speaking, again through the others is measured.

Prints a table and writes JSON (default benchmarks/results/cluster.json).

    python benchmarks/cluster.py [--replicas 1,2,3] [--streams 1,2,4,6,8,12,16] [--speakers 6] [--out PATH] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path


from report import add_check_flag, conclude, stamp
from throughput import JITTER_S, PARAGRAPHS, RATE, Playback, cpu_seconds, largest_holding, streams_row

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from cluster_harness import Cluster, running_cluster  # noqa: E402
from cluster_scenarios import crash, drained_cleanly, rolling_restart, speaking  # noqa: E402
from voxflow.client import AsyncVoxflowClient, Audio, Error  # noqa: E402
from voxflow.streaming.tokens import gpt_like_tokens, paced  # noqa: E402

KEYS = tuple(f"bench-key-{n}" for n in range(64))
RECONNECT_S = 2.0  # a crashed replica's clients connected again through the others


async def stream_paragraph(client: AsyncVoxflowClient, text: str, tps: float) -> Playback:
    out = Playback()
    async with client.context(sample_rate=RATE) as ctx:
        start = time.perf_counter()

        async def feed() -> None:
            async for token in paced(gpt_like_tokens(text), tps):
                ctx.push(token)
            ctx.end()

        feeder = asyncio.create_task(feed())
        async for event in ctx:
            now = time.perf_counter()
            if isinstance(event, Audio):
                if out.first_audio_ms is None:
                    out.first_audio_ms = (now - start) * 1000
                out.arrivals.append((now, event.pts))
                out.audio_s = event.pts + event.duration
            elif isinstance(event, Error):
                out.error = f"{event.code}: {event.message}"
        await feeder
    out.play()
    return out


async def streams_at(cluster: Cluster, n: int, tps: float) -> dict:
    clients = [AsyncVoxflowClient(cluster.ws_url, api_key=key) for key in KEYS[:n]]
    try:
        await asyncio.gather(*(c.connect() for c in clients))
        spread = await asyncio.to_thread(cluster.connections)
        pids = [r.process.pid for r in cluster.replicas]
        cpu_before = sum(cpu_seconds(pid) for pid in pids)
        runs = await asyncio.gather(*(stream_paragraph(c, PARAGRAPHS[i % len(PARAGRAPHS)], tps) for i, c in enumerate(clients)))
        cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
    finally:
        for client in clients:
            await client.aclose()
    return streams_row(runs, cpu, "replicas_cpu_per_audio_s", connections_per_replica=spread)


async def capacity(cluster: Cluster, counts: list[int], tps: float) -> list[dict]:
    for replica in cluster.replicas:  # first-call costs out of the way, on each replica directly
        async with AsyncVoxflowClient(f"ws://{replica.address}/v1/stream", api_key=KEYS[0]) as client:
            for text in PARAGRAPHS:
                await stream_paragraph(client, text, tps)
    rows = []
    for n in counts:
        rows.append(await streams_at(cluster, n, tps))
        await asyncio.sleep(1.0)  # let the replicas settle between counts
    return rows


async def faults(cluster: Cluster, speakers: int) -> dict:
    async with speaking(cluster.ws_url, list(KEYS[:speakers])) as rolling:
        restarts = await rolling_restart(cluster, rolling)
    async with speaking(cluster.ws_url, list(KEYS[:speakers])) as crashing:
        crashed = await crash(cluster, crashing, cluster.replicas[len(cluster.replicas) // 2])
    return {
        "rolling_restart": {
            "restarts": [asdict(r) for r in restarts],
            "utterances": sum(len(s.spoken) for s in rolling),
            "cut": [c for s in rolling for c in s.cut],
            "retried_before_audio": [c for s in rolling for c in s.retried],
            "clients_moved": sum(1 for s in rolling if len(s.connections) > 1),
        },
        "crash": asdict(crashed) | {"others_disturbed": sum(
            1 for i, s in enumerate(crashing) if i not in crashed.moved and (s.cut or s.retried or len(s.connections) > 1)
        )},
    }


def report(result: dict) -> tuple[list[tuple[str, str, str]], dict[str, bool]]:
    rows: list[tuple[str, str, str]] = []
    targets: dict[str, bool] = {}
    for size, sweep in result["capacity"].items():
        for row in sweep:
            figures = f"{row['stalls']} ({row['streams_stalled']}), {row['first_audio_p95_ms'] or 0:.0f} ms, {row['replicas_cpu_per_audio_s'] or 0:.3f}"
            figures += f", spread {'/'.join(str(c) for c in row['connections_per_replica'].values())}"
            figures += f", errors {len(row['errors'])}" if row["errors"] else ""
            rows.append((f"{size} replica(s), {row['streams']:>2} streams: stalls (streams), p95 first audio, CPU/s", figures, "0 stalls, p95 <= 400 ms"))
    held = result["streams_held"] = {size: largest_holding(sweep) for size, sweep in result["capacity"].items()}
    rows.append(("streams held per replica count", ", ".join(f"{size}: {n}" for size, n in held.items()), "reported"))
    spreads = [row["connections_per_replica"].values() for sweep in result["capacity"].values() for row in sweep]
    targets["least_connections_spread"] = all(max(counts) - min(counts) <= 1 for counts in spreads)
    rows.append(("connections per replica, most minus fewest, worst count", str(max(max(c) - min(c) for c in spreads)), "<= 1"))
    if faults := result.get("faults"):
        rolling, crashed = faults["rolling_restart"], faults["crash"]
        drained = ", ".join(f"{r['drained_s']:.1f}/{r['back_s']:.1f}" for r in rolling["restarts"])
        rows.append(("rolling restart: SIGTERM to exit / exit to back in HAProxy, per replica", drained + " s", ""))
        figures = f"{len(rolling['cut'])} of {rolling['utterances']} ({len(rolling['retried_before_audio'])} said again, {rolling['clients_moved']} clients moved)"
        rows.append(("rolling restart: utterances cut or failed", figures, "0"))
        targets["rolling_restart_nothing_lost"] = not rolling["cut"] and all(drained_cleanly(r["exit_status"]) for r in rolling["restarts"])
        reconnect = max(crashed["reconnect_s"], default=float("inf"))
        figures = f"{reconnect:.2f} s for {len(crashed['moved'])} clients (speaking again {max(crashed['spoke_again_s'], default=float('inf')):.2f} s)"
        rows.append(("kill -9: its clients connected again through the others, slowest", figures, f"<= {RECONNECT_S} s"))
        rows.append(("kill -9: other clients disturbed", str(crashed["others_disturbed"]), "0"))
        targets["crash_reconnect"] = len(crashed["moved"]) == crashed["on_replica"] > 0 and reconnect <= RECONNECT_S
        targets["crash_others_undisturbed"] = crashed["others_disturbed"] == 0
    return rows, targets


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", default="1,2,3", help="replica counts, each its own cluster (at most 3)")
    parser.add_argument("--streams", default="1,2,4,6,8,12,16")
    parser.add_argument("--tps", type=float, default=30.0, help="LLM token rate of the streams")
    parser.add_argument("--speakers", type=int, default=6, help="clients during the rolling restart and the kill")
    parser.add_argument("--out", default="benchmarks/results/cluster.json")
    add_check_flag(parser)
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.replicas.split(","))
    counts = sorted(int(n) for n in args.streams.split(","))

    result: dict = {**stamp(), "cores": len(os.sched_getaffinity(0)), "jitter_s": JITTER_S, "tps": args.tps, "capacity": {}}
    with tempfile.TemporaryDirectory(prefix="voxflow-cluster-") as directory:
        for size in sizes:
            with running_cluster(Path(directory) / str(size), size, KEYS) as cluster:
                print(f"{size} replica(s) up", flush=True)
                result["capacity"][str(size)] = asyncio.run(capacity(cluster, counts, args.tps))
                if size == sizes[-1]:
                    result["faults"] = asyncio.run(faults(cluster, args.speakers))
    rows, targets = report(result)
    conclude(rows, result, targets, args.out, args.check)


if __name__ == "__main__":
    main()
