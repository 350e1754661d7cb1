"""Two `voxflow mqtt` workers in one share group behind a real mosquitto: each `say` is answered
by exactly one of them, both take a share, and the requests keep being answered when one
worker is stopped mid-run."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import aiomqtt

from mosquitto_harness import Broker, start_mosquitto
from test_mqtt_bridge import Reply, _check_audio, _client
from voxflow.transports.protocols.mqtt_protocol import unpack_audio

TIMEOUT = 60.0
DEVICES = ("kitchen", "hall", "den", "porch", "attic")
TEXT = "The lights are off."


def _worker(broker: Broker, seed: int, log: Path) -> subprocess.Popen:
    # The seed fingerprints a worker: the same text and seed give the same audio, so every
    # reply's PCM tells which worker spoke it. Audio at QoS 1 keeps the fingerprints whole, and
    # steps taken alone (max_batch 1) keep them bit-identical however many requests overlap.
    env = {**os.environ, "VOXFLOW_MQTT_AUDIO_QOS": "1", "VOXFLOW_REQUESTS_PER_SECOND": "0",
           "VOXFLOW_MQTT_MAX_PER_DEVICE": "32", "VOXFLOW_MAX_BATCH": "1"}
    return subprocess.Popen([sys.executable, "-m", "voxflow.cli", "mqtt", "--broker", broker.url, "--seed", str(seed)],
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"), env=env)


class Listener:
    """Every reply on the device topics, by request id."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.replies: dict[str, Reply] = defaultdict(Reply)
        self.changed = asyncio.Event()

    async def run(self) -> None:
        async for message in self.client.messages:
            topic, payload = message.topic.value, bytes(message.payload)
            if "/audio/" in topic:
                self.replies[topic.rsplit("/", 1)[1]].audio.append(unpack_audio(payload))
            elif topic.endswith(("/event", "/error")):
                body = json.loads(payload)
                reply = self.replies[body["id"]]
                (reply.errors if body["type"] == "error" else reply.events).append(body)
            self.changed.set()

    def finished(self, request_id: str) -> bool:
        reply = self.replies.get(request_id)
        if reply is None or not (reply.errors or "done" in reply.types()):
            return False
        # A request refused before `started` gets its error alone; any other ends its audio.
        return "started" not in reply.types() or bool(reply.audio and reply.audio[-1].last)

    async def wait_all(self, ids: list[str]) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not all(self.finished(i) for i in ids):
                self.changed.clear()
                await self.changed.wait()


async def _say(client: aiomqtt.Client, request_id: str, n: int) -> None:
    device = DEVICES[n % len(DEVICES)]
    await client.publish(f"voxflow/{device}/say", json.dumps({"text": TEXT, "id": request_id}), qos=1)


def _answered_once(listener: Listener, ids: list[str]) -> list[str]:
    """The audio fingerprint of each request, after checking it got one whole answer."""
    fingerprints = []
    for request_id in ids:
        reply = listener.replies[request_id]
        assert not reply.errors, (request_id, reply.errors)
        assert reply.types() == ["started", "done"], (request_id, reply.events)
        _check_audio(reply)
        fingerprints.append(hashlib.sha1(reply.pcm).hexdigest())
    return fingerprints


async def test_two_workers_split_requests_and_survive_losing_one(tmp_path: Path) -> None:
    broker = start_mosquitto()
    workers: list[subprocess.Popen] = []
    try:
        async with _client(broker) as client:
            await client.subscribe("voxflow/status", qos=1)
            workers = [_worker(broker, seed, tmp_path / f"worker{seed}.log") for seed in (1, 2)]
            online = 0
            async with asyncio.timeout(120):  # two engines warming up on shared cores
                async for message in client.messages:
                    online += message.payload == b"online"
                    if online == 2:
                        break
            await client.unsubscribe("voxflow/status")
            for kind in ("event", "error", "audio/+"):
                await client.subscribe(f"voxflow/+/{kind}", qos=1)
            listener = Listener(client)
            listening = asyncio.create_task(listener.run())
            try:
                first = [f"a{n}" for n in range(20)]
                for n, request_id in enumerate(first):
                    await _say(client, request_id, n)
                await listener.wait_all(first)
                by_worker = set(_answered_once(listener, first))
                assert len(by_worker) == 2, "one worker answered every request"

                # Stop one worker while requests are in flight on both: it finishes its own
                # and the broker hands the rest to the other.
                second = [f"b{n}" for n in range(10)]
                for n, request_id in enumerate(second):
                    await _say(client, request_id, n)
                    if n == 4:
                        workers[0].send_signal(signal.SIGTERM)
                await listener.wait_all(second)
                assert set(_answered_once(listener, second)) <= by_worker
                assert workers[0].wait(timeout=30) == 0
                await asyncio.sleep(0.5)  # duplicates would arrive by now
            finally:
                listening.cancel()
            assert set(listener.replies) == set(first + second)
            done = [e["id"] for r in listener.replies.values() for e in r.events if e["type"] == "done"]
            assert sorted(done) == sorted(first + second)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait()
        broker.stop()
        shutil.rmtree(broker.directory, ignore_errors=True)
