"""The MQTT bridge against a real mosquitto: voxflow topics, MQTT 5 request/response, Hermes,
bad payloads, availability and reconnection."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
import uuid
import wave
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace

import aiomqtt
import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mosquitto_harness import Broker, start_mosquitto
from server_harness import RunningServer, run_server
from voxflow.config import ServerConfig, Settings
from voxflow.streaming.engine import Engine
from voxflow.transports.app import ServerState
from voxflow.transports.mqtt_bridge import MqttBridge
from voxflow.transports.protocols.mqtt_protocol import MAX_MESSAGE_MS, AudioMessage, unpack_audio
from waiting import until

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def bridged(engine: Engine, mosquitto: Broker) -> Iterator[RunningServer]:
    with run_server(engine, mqtt_url=mosquitto.url) as running:
        _wait_online(mosquitto, "voxflow")
        yield running


def _client(broker: Broker) -> aiomqtt.Client:
    return aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5, identifier=f"test-{uuid.uuid4().hex[:8]}")


async def _wait_status(client: aiomqtt.Client, wanted: str, prefix: str = "voxflow") -> None:
    await client.subscribe(f"{prefix}/status", qos=1)
    async with asyncio.timeout(TIMEOUT):
        async for message in client.messages:
            if message.topic.value == f"{prefix}/status" and message.payload == wanted.encode():
                return


def _wait_online(broker: Broker, prefix: str) -> None:
    """The bridge connects beside the HTTP server's start, so a server that answers HTTP may not
    have subscribed yet, and a request published before it has is lost (MQTT keeps none).
    `online` is published once every subscription is in place, as a device would wait for it."""

    async def wait() -> None:
        async with _client(broker) as client:
            await _wait_status(client, "online", prefix)

    asyncio.run(wait())


@dataclass
class Reply:
    """Everything one request got back."""

    audio: list[AudioMessage] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    correlations: set = field(default_factory=set)

    @property
    def pcm(self) -> bytes:
        return b"".join(m.pcm for m in self.audio)

    def types(self) -> list[str]:
        """Event types but `word`."""
        return [e["type"] for e in self.events if e["type"] != "word"]

    def words(self) -> list[str]:
        return [e["word"] for e in self.events if e["type"] == "word"]


async def _collect(client: aiomqtt.Client, request_id: str, *, until_error: bool = False) -> Reply:
    """Messages of `request_id` until its last audio message and its final event."""
    reply = Reply()
    async with asyncio.timeout(TIMEOUT):
        async for message in client.messages:
            topic, payload = message.topic.value, bytes(message.payload)
            correlation = getattr(message.properties, "CorrelationData", None)
            if correlation is not None:
                reply.correlations.add(correlation)
            if payload[:1] == b"{":
                body = json.loads(payload)
                if body.get("id") != request_id or "type" not in body:  # another request's, or a request itself
                    continue
                (reply.errors if body["type"] == "error" else reply.events).append(body)
            elif topic.endswith(f"/audio/{request_id}") or "/audio/" not in topic:
                reply.audio.append(unpack_audio(payload))
            final = reply.events and reply.events[-1]["type"] in ("done", "cancelled")
            if (until_error and reply.errors) or ((final or reply.errors) and reply.audio and reply.audio[-1].last):
                return reply
    raise AssertionError("unreachable")


def _check_audio(reply: Reply) -> None:
    assert reply.audio, "no audio messages"
    assert [m.seq for m in reply.audio] == list(range(len(reply.audio)))
    first = reply.audio[0]
    assert first.first and first.format is not None
    assert first.format.encoding == "pcm_s16le" and first.format.channels == 1
    assert not any(m.first for m in reply.audio[1:])
    assert reply.audio[-1].last and not any(m.last for m in reply.audio[:-1])
    limit = first.format.sample_rate * MAX_MESSAGE_MS // 1000 * 2
    assert all(len(m.pcm) <= limit for m in reply.audio)


def _loud(pcm: bytes) -> float:
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


async def test_say_streams_audio_then_done(bridged: RunningServer, mosquitto: Broker) -> None:
    async with _client(mosquitto) as client:
        await _wait_status(client, "online")
        await client.subscribe("voxflow/kitchen/#", qos=1)
        await client.publish("voxflow/kitchen/say", json.dumps({"text": "Hello from the kitchen speaker.", "id": "s1"}), qos=1)
        reply = await _collect(client, "s1")
    assert reply.types() == ["started", "done"], reply.events
    assert reply.words()[-1] == "speaker."
    assert reply.events[0]["sample_rate"] == reply.audio[0].format.sample_rate == 22050
    _check_audio(reply)
    assert len(reply.audio) >= 3  # ~1.7 s of speech cannot fit in two 200 ms messages
    assert len(reply.audio[0].pcm) == 22050 * 20 // 1000 * 2  # the first frame goes out on its own
    assert _loud(reply.pcm) > 300
    assert reply.events[-1]["audio_seconds"] == pytest.approx(len(reply.pcm) / 2 / 22050, abs=0.001)


async def test_say_honours_sample_rate_and_generates_an_id(bridged: RunningServer, mosquitto: Broker) -> None:
    async with _client(mosquitto) as client:
        await client.subscribe("voxflow/den/event", qos=1)
        await client.subscribe("voxflow/den/audio/+", qos=1)
        await client.publish("voxflow/den/say", json.dumps({"text": "Hi.", "sample_rate": 16000, "style": "calm"}), qos=1)
        async with asyncio.timeout(TIMEOUT):
            async for message in client.messages:
                started = json.loads(message.payload)
                break
        assert started["type"] == "started" and started["sample_rate"] == 16000 and started["id"]
        reply = await _collect(client, started["id"])
    _check_audio(reply)
    assert reply.audio[0].format.sample_rate == 16000
    assert reply.types() == ["done"]


async def test_streaming_start_text_end(bridged: RunningServer, mosquitto: Broker) -> None:
    async with _client(mosquitto) as client:
        await client.subscribe("voxflow/car/#", qos=1)
        await client.publish("voxflow/car/stream/start", json.dumps({"id": "c1"}), qos=1)
        for token in ["Turn ", "left ", "at the ", "next ", "light, ", "then ", "keep going."]:
            await client.publish("voxflow/car/stream/text", json.dumps({"id": "c1", "text": token}), qos=1)
        await client.publish("voxflow/car/stream/end", json.dumps({"id": "c1"}), qos=1)
        reply = await _collect(client, "c1")
    assert reply.types()[0] == "started" and reply.types()[-1] == "done"
    assert reply.types() == ["started", "done"]
    assert "left" in reply.words()
    _check_audio(reply)
    assert len(reply.pcm) / 2 / 22050 > 1.0


async def test_cancel_ends_the_request(bridged: RunningServer, mosquitto: Broker) -> None:
    async with _client(mosquitto) as client:
        await client.subscribe("voxflow/hall/#", qos=1)
        # No end: the stream cannot finish by itself, so the cancel always lands.
        await client.publish("voxflow/hall/stream/start", json.dumps({"id": "x"}), qos=1)
        await client.publish("voxflow/hall/stream/text", json.dumps({"id": "x", "text": "This is a long sentence that keeps going, " * 4}), qos=1)
        await client.publish("voxflow/hall/cancel", json.dumps({"id": "x"}), qos=1)
        reply = await _collect(client, "x")
    assert reply.types()[0] == "started" and reply.types()[-1] == "cancelled"
    assert "done" not in reply.types()
    _check_audio(reply)


async def test_response_topic_and_correlation_data(bridged: RunningServer, mosquitto: Broker) -> None:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "voxflow/replies/me"
    props.CorrelationData = b"corr-42"
    async with _client(mosquitto) as client:
        await client.subscribe("voxflow/replies/me", qos=1)
        await client.subscribe("voxflow/office/#", qos=1)
        await client.publish("voxflow/office/say", json.dumps({"text": "Reply to me.", "id": "r1"}), qos=1, properties=props)
        reply = await _collect(client, "r1")
        await client.publish("voxflow/office/say", json.dumps({"text": 5, "id": "r2"}), qos=1, properties=props)
        failed = await _collect(client, "r2", until_error=True)
        # Nothing of either went to the device's own topics.
        await client.unsubscribe("voxflow/replies/me")
        await client.publish("voxflow/office/say", json.dumps({"text": "Plain.", "id": "r3"}), qos=1)
        plain = await _collect(client, "r3")
    assert reply.types() == ["started", "done"]
    _check_audio(reply)
    assert reply.correlations == {b"corr-42"}
    assert failed.errors[0]["code"] == "invalid_request" and failed.correlations == {b"corr-42"}
    assert plain.types() == ["started", "done"] and not plain.correlations


async def test_hermes_say_plays_a_wav_and_finishes(bridged: RunningServer, mosquitto: Broker) -> None:
    async with _client(mosquitto) as client:
        await client.subscribe("hermes/audioServer/bedroom/playBytes/+", qos=1)
        await client.subscribe("hermes/tts/sayFinished", qos=1)
        say = {"text": "Good night.", "siteId": "bedroom", "id": "h1", "sessionId": "sess", "lang": "en"}
        await client.publish("hermes/tts/say", json.dumps(say), qos=1)
        wav = finished = None
        async with asyncio.timeout(TIMEOUT):
            async for message in client.messages:
                if message.topic.value == "hermes/audioServer/bedroom/playBytes/h1":
                    wav = bytes(message.payload)
                elif message.topic.value == "hermes/tts/sayFinished":
                    finished = json.loads(message.payload)
                    break
    assert finished == {"id": "h1", "siteId": "bedroom", "sessionId": "sess"}
    assert wav is not None
    with wave.open(io.BytesIO(wav)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 22050)
        pcm = w.readframes(w.getnframes())
    assert len(pcm) / 2 / 22050 > 0.4
    assert _loud(pcm) > 300


async def test_hermes_errors_go_to_the_error_topic(bridged: RunningServer, mosquitto: Broker) -> None:
    async with _client(mosquitto) as client:
        await client.subscribe("hermes/error/tts", qos=1)
        await client.publish("hermes/tts/say", json.dumps({"text": "", "siteId": "attic", "sessionId": "s9"}), qos=1)
        async with asyncio.timeout(TIMEOUT):
            async for message in client.messages:
                error = json.loads(message.payload)
                break
    assert error["siteId"] == "attic" and error["sessionId"] == "s9" and error["error"]


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"not json", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (json.dumps({"text": ["a"], "id": "bad"}).encode(), "invalid_request"),
        (json.dumps({"text": "x" * 20_000, "id": "big"}).encode(), "limit_exceeded"),
        (json.dumps({"text": "Hi.", "id": "v", "voice": "nobody"}).encode(), "unknown_voice"),
        (json.dumps({"text": "Hi.", "id": "s", "sample_rate": 12345}).encode(), "invalid_request"),
        (b"\xff\xfe{}", "invalid_json"),
        (b'{"text": "\\ud800", "id": "lone"}', "invalid_json"),
        (b'{"text": "Hi.", "id": "\\udfff"}', "invalid_json"),
        (b"{" + b" " * 70_000 + b"}", "limit_exceeded"),
        (json.dumps({"text": "Hi.", "id": 5}).encode(), "invalid_request"),
        (json.dumps({"text": "Hi.", "id": "st", "style": 3}).encode(), "invalid_request"),
    ],
)
async def test_malformed_requests_get_errors_and_the_bridge_keeps_serving(
    bridged: RunningServer, mosquitto: Broker, payload: bytes, code: str
) -> None:
    async with _client(mosquitto) as client:
        await client.subscribe("voxflow/garage/error", qos=1)
        await client.subscribe("voxflow/garage/event", qos=1)
        await client.publish("voxflow/garage/say", payload, qos=1)
        async with asyncio.timeout(TIMEOUT):
            async for message in client.messages:
                error = json.loads(message.payload)
                break
        assert error["type"] == "error" and error["code"] == code and error["message"]
        await client.subscribe("voxflow/garage/audio/ok", qos=1)
        await client.publish("voxflow/garage/say", json.dumps({"text": "Still here.", "id": "ok"}), qos=1)
        reply = await _collect(client, "ok")
    assert reply.types() == ["started", "done"]


async def test_a_response_topic_outside_the_prefix_is_refused(bridged: RunningServer, mosquitto: Broker) -> None:
    async with _client(mosquitto) as client:
        await client.subscribe("elsewhere/#", qos=1)
        await client.subscribe("voxflow/yard/#", qos=1)
        for request_id, topic in (("o1", "elsewhere/x"), ("o2", "voxflow/yard/say"), ("o3", "voxflow/a/+")):
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = topic
            props.CorrelationData = b"c"
            await client.publish("voxflow/yard/say", json.dumps({"text": "Not there.", "id": request_id}), qos=1, properties=props)
        await client.publish("voxflow/yard/say", json.dumps({"text": "Here.", "id": "o4"}), qos=1)
        errors, stray = [], []
        async with asyncio.timeout(TIMEOUT):
            async for message in client.messages:
                topic, body = message.topic.value, json.loads(message.payload) if message.payload[:1] == b"{" else None
                if topic == "voxflow/yard/error":
                    errors.append((body["code"], body["id"]))
                elif topic.startswith("elsewhere/") or (topic == "voxflow/yard/say" and "type" in body):
                    stray.append(topic)
                if topic == "voxflow/yard/event" and body == {**body, "type": "done", "id": "o4"}:
                    break
    assert sorted(errors) == [("invalid_request", "o1"), ("invalid_request", "o2"), ("invalid_request", "o3")]
    assert stray == []


@pytest.fixture(scope="module")
def unshared(engine: Engine, mosquitto: Broker) -> Iterator[RunningServer]:
    """A worker that is not part of a share group: it alone answers, so it can tell unknown ids."""
    with run_server(engine, mqtt_url=mosquitto.url, mqtt_prefix="solo", mqtt_share_group="") as running:
        _wait_online(mosquitto, "solo")
        yield running


async def test_in_a_share_group_messages_for_requests_held_elsewhere_are_ignored(bridged: RunningServer, mosquitto: Broker) -> None:
    replies = ("/event", "/error", "/audio/")
    async with _client(mosquitto) as client:
        await client.subscribe("voxflow/attic/#", qos=1)
        # Another worker of the group may hold "elsewhere": no error, no implicit start.
        for kind, body in (("stream/text", {"id": "elsewhere", "text": "Hello there."}), ("stream/end", {"id": "elsewhere"}), ("cancel", {"id": "elsewhere"})):
            await client.publish(f"voxflow/attic/{kind}", json.dumps(body), qos=1)
        await client.publish("voxflow/attic/say", json.dumps({"text": "Only this.", "id": "mine"}), qos=1)
        about_elsewhere, mine_done = [], False
        async with asyncio.timeout(TIMEOUT):
            async for message in client.messages:
                topic, payload = message.topic.value, bytes(message.payload)
                if any(r in topic for r in replies) and (b"elsewhere" in payload or topic.endswith("/audio/elsewhere")):
                    about_elsewhere.append(topic)
                if topic.endswith("/event") and json.loads(payload) == {**json.loads(payload), "type": "done", "id": "mine"}:
                    mine_done = True
                    break
    assert mine_done
    assert about_elsewhere == []


async def test_unknown_context_for_end_and_cancel(unshared: RunningServer, mosquitto: Broker) -> None:
    async with _client(mosquitto) as client:
        await client.subscribe("solo/porch/error", qos=1)
        await client.publish("solo/porch/stream/end", json.dumps({"id": "nope"}), qos=1)
        await client.publish("solo/porch/cancel", json.dumps({"id": "nope"}), qos=1)
        codes = []
        async with asyncio.timeout(TIMEOUT):
            async for message in client.messages:
                codes.append(json.loads(message.payload)["code"])
                if len(codes) == 2:
                    break
    assert codes == ["unknown_context", "unknown_context"]


async def test_reused_ids_and_text_after_the_end_get_typed_errors(unshared: RunningServer, mosquitto: Broker) -> None:
    long_text = "This is a long sentence that keeps going, " * 3
    async with _client(mosquitto) as client:
        await client.subscribe("solo/deck/#", qos=1)
        for kind, body in (
            ("stream/start", {"id": "dup"}),
            ("stream/start", {"id": "dup"}),
            ("stream/text", {"id": "dup", "text": long_text, "end": True}),
            ("stream/text", {"id": "dup", "text": "more"}),
            ("stream/end", {"id": "dup"}),
            ("cancel", {"id": "ghost"}),
            ("cancel", {"id": "dup"}),
        ):
            await client.publish(f"solo/deck/{kind}", json.dumps(body), qos=1)
        errors, events = [], []
        async with asyncio.timeout(TIMEOUT):
            async for message in client.messages:
                topic = message.topic.value
                if topic.endswith(("/error", "/event")):
                    body = json.loads(message.payload)
                    (errors if body["type"] == "error" else events).append(body)
                if {"type": "cancelled", "id": "dup"} in events:
                    break
        await client.publish("solo/deck/say", json.dumps({"text": "Still fine.", "id": "fine"}), qos=1)
        reply = await _collect(client, "fine")
    assert sorted((e["code"], e["id"]) for e in errors) == [
        ("context_exists", "dup"), ("stream_closed", "dup"), ("stream_closed", "dup"), ("unknown_context", "ghost"),
    ]
    assert [e["type"] for e in events if e["type"] != "word"] == ["started", "cancelled"]
    assert reply.types() == ["started", "done"]


async def test_availability_and_reconnect_after_broker_restart(engine: Engine) -> None:
    broker = start_mosquitto()
    try:
        with run_server(engine, mqtt_url=broker.url, mqtt_prefix="home/tts"):
            async with _client(broker) as client:
                await _wait_status(client, "online", "home/tts")
            broker.restart()
            async with _client(broker) as client:
                # A fresh broker keeps nothing: `online` is there again only if the bridge
                # reconnected and republished it.
                await _wait_status(client, "online", "home/tts")
                await client.subscribe("home/tts/lounge/#", qos=1)
                await client.publish("home/tts/lounge/say", json.dumps({"text": "Back again.", "id": "b1"}), qos=1)
                reply = await _collect(client, "b1")
                assert reply.types() == ["started", "done"]
                _check_audio(reply)
        async with _client(broker) as client:
            await _wait_status(client, "offline", "home/tts")
    finally:
        broker.stop()
        shutil.rmtree(broker.directory, ignore_errors=True)


def test_standalone_bridge_with_mosquitto_clients_and_last_will(mosquitto: Broker) -> None:
    """`voxflow mqtt` in its own process, driven by mosquitto_pub / mosquitto_sub; killed, its
    last will marks it offline."""
    port = str(mosquitto.port)
    prefix = f"cli{uuid.uuid4().hex[:6]}"
    bridge = subprocess.Popen([sys.executable, "-m", "voxflow.cli", "mqtt", "--broker", mosquitto.url, "--prefix", prefix],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        status = subprocess.run(["mosquitto_sub", "-p", port, "-t", f"{prefix}/status", "-C", "1", "-W", "120"],
                                capture_output=True, timeout=130)
        assert status.stdout.strip() == b"online", status
        sub = subprocess.Popen(["mosquitto_sub", "-p", port, "-t", f"{prefix}/pi/event", "-W", "60"], stdout=subprocess.PIPE)
        try:
            time.sleep(0.5)  # mosquitto_sub has no "subscribed" signal
            subprocess.run(["mosquitto_pub", "-p", port, "-q", "1", "-t", f"{prefix}/pi/say",
                            "-m", json.dumps({"text": "Hello from a shell.", "id": "sh"})], check=True, timeout=30)
            events = []
            for line in sub.stdout:  # ends by itself after -W seconds
                events.append(json.loads(line))
                if events[-1]["type"] == "done":
                    break
        finally:
            sub.kill()
            sub.wait()
        assert [e["type"] for e in events if e["type"] != "word"] == ["started", "done"]
        assert events[-1]["id"] == "sh"
    finally:
        bridge.send_signal(signal.SIGKILL)
        bridge.wait(timeout=30)
    will = subprocess.run(["mosquitto_sub", "-p", port, "-t", f"{prefix}/status", "-C", "1", "-W", "30"],
                          capture_output=True, timeout=40)
    assert will.stdout.strip() == b"offline"


# -- a bridge in the test's own loop, for tests that look inside it --------------------------


@dataclass
class Local:
    bridge: MqttBridge
    state: ServerState
    prefix: str

    def idle(self) -> bool:
        """Nothing of any request is left: no device entry, context set or admitted place."""
        return not self.bridge._devices and not self.state.context_sets and self.state.admission.counts()["mqtt"] == 0

    async def wait_idle(self) -> None:
        await until(self.idle, TIMEOUT, poll=0.01)


@contextlib.asynccontextmanager
async def _local_bridge(engine: Engine, broker: Broker, **server_options) -> AsyncIterator[Local]:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    # Its own share group, so the module's bridge never takes its Hermes says; a generous send
    # timeout, so on a busy machine no request ends as a slow consumer.
    options = {"mqtt_url": broker.url, "mqtt_prefix": prefix, "mqtt_share_group": prefix, "cache_enabled": False,
               "send_timeout_seconds": TIMEOUT, **server_options}
    state = ServerState(Settings(engine=engine.config, server=replace(ServerConfig(), **options)), engine)
    bridge = MqttBridge(state)
    async with bridge.running():
        async with asyncio.timeout(TIMEOUT):
            await bridge.connected.wait()
        yield Local(bridge, state, prefix)


async def test_many_devices_leave_no_trace(engine: Engine, mosquitto: Broker) -> None:
    async with _local_bridge(engine, mosquitto) as local, _client(mosquitto) as client:
        await client.subscribe(f"{local.prefix}/+/event", qos=1)
        await client.subscribe(f"{local.prefix}/+/error", qos=1)
        await client.subscribe("hermes/tts/sayFinished", qos=1)

        async def ask(requests: list[tuple[str, str, dict]]) -> set[str]:
            """Publish the requests, then wait until each has finished (done or an error): the
            names of those that got `done` / `sayFinished`."""
            for topic, _, body in requests:
                await client.publish(topic, json.dumps(body), qos=1)
            waiting, done = {name for _, name, _ in requests}, set()
            async with asyncio.timeout(TIMEOUT):
                async for message in client.messages:
                    body, topic = json.loads(message.payload), message.topic.value
                    if topic == "hermes/tts/sayFinished":
                        name = body["siteId"] if body["id"] == local.prefix else None
                    else:
                        name = topic.split("/")[1] if body.get("type") in ("done", "error") else None
                    if name in waiting:
                        waiting.discard(name)
                        if body.get("type", "done") == "done":
                            done.add(name)
                    if not waiting:
                        return done
            raise AssertionError("unreachable")

        # Few at a time: it is the number of names that matters, not how many at once.
        devices = [f"d{n}" for n in range(66)]
        sites = [f"{local.prefix}site{n}" for n in range(3)]
        answered = set()
        for batch in range(0, len(devices), 11):
            answered |= await ask([(f"{local.prefix}/{d}/say", d, {"text": "Hi.", "id": "r"}) for d in devices[batch:batch + 11]])
        answered |= await ask([("hermes/tts/say", s, {"text": "Hi.", "siteId": s, "id": local.prefix}) for s in sites])
        await local.wait_idle()
    assert answered == set(devices) | set(sites)
    assert local.idle()


async def test_a_flooding_stream_is_dropped_and_others_are_served(engine: Engine, mosquitto: Broker) -> None:
    async with _local_bridge(engine, mosquitto) as local, _client(mosquitto) as client:
        p = local.prefix
        await client.subscribe(f"{p}/+/error", qos=1)
        await client.subscribe(f"{p}/+/event", qos=1)
        await client.subscribe(f"{p}/calm/audio/+", qos=1)
        await client.publish(f"{p}/flood/stream/start", json.dumps({"id": "f"}), qos=1)
        # Far more text than is spoken meanwhile, as fast as the broker takes it: the stream's
        # queue and the request's own take 2 x 1024 messages, the rest overflows them.
        for _ in range(4000):
            await client.publish(f"{p}/flood/stream/text", json.dumps({"id": "f", "text": "word "}), qos=0)
        await client.publish(f"{p}/calm/say", json.dumps({"text": "Still served.", "id": "c"}), qos=1)
        flood_errors, calm = [], Reply()
        async with asyncio.timeout(TIMEOUT):
            async for message in client.messages:
                topic, payload = message.topic.value, bytes(message.payload)
                if topic.startswith(f"{p}/flood/"):
                    body = json.loads(payload)
                    if body["type"] == "error":
                        flood_errors.append(body)
                elif "/audio/" in topic:
                    calm.audio.append(unpack_audio(payload))
                else:
                    body = json.loads(payload)
                    (calm.errors if body["type"] == "error" else calm.events).append(body)
                if flood_errors and "done" in calm.types() and calm.audio and calm.audio[-1].last:
                    break
        await local.wait_idle()
    assert [(e["code"], e["id"]) for e in flood_errors] == [("limit_exceeded", "f")]
    assert calm.types() == ["started", "done"] and not calm.errors
    _check_audio(calm)


async def test_a_bug_while_handling_one_message_is_answered_and_logged_once(
    engine: Engine, mosquitto: Broker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with _local_bridge(engine, mosquitto) as local, _client(mosquitto) as client:
        handle = local.bridge._handle

        def buggy(request, reply) -> None:
            if request.id == "bug":
                raise RuntimeError("a bug")
            handle(request, reply)

        monkeypatch.setattr(local.bridge, "_handle", buggy)
        await client.subscribe(f"{local.prefix}/lab/#", qos=1)
        with caplog.at_level(logging.ERROR, logger="voxflow.transports.mqtt_bridge"):
            await client.publish(f"{local.prefix}/lab/say", json.dumps({"text": "Hi.", "id": "bug"}), qos=1)
            failed = await _collect(client, "bug", until_error=True)
            await client.publish(f"{local.prefix}/lab/say", json.dumps({"text": "Still here.", "id": "ok"}), qos=1)
            reply = await _collect(client, "ok")
        await local.wait_idle()
    assert [(e["code"], e["id"]) for e in failed.errors] == [("internal_error", "bug")]
    assert reply.types() == ["started", "done"]
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [RuntimeError]


async def test_a_failing_bridge_goes_offline_and_comes_back(engine: Engine, mosquitto: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    async with _local_bridge(engine, mosquitto) as local, _client(mosquitto) as client:
        on_message, crashed = local.bridge._on_message, []

        def crash_once(message: aiomqtt.Message) -> None:
            if not crashed:
                crashed.append(message.topic.value)
                raise RuntimeError("a bug outside any one request")
            on_message(message)

        monkeypatch.setattr(local.bridge, "_on_message", crash_once)
        status = f"{local.prefix}/status"
        await client.subscribe(status, qos=1)
        await client.subscribe(f"{local.prefix}/lab/#", qos=1)
        seen = []
        async with asyncio.timeout(TIMEOUT):
            async for message in client.messages:
                if message.topic.value == status:
                    seen.append(message.payload.decode())
                    if seen == ["online"]:  # the retained status: now make it fail
                        await client.publish(f"{local.prefix}/lab/say", json.dumps({"text": "Boom.", "id": "boom"}), qos=1)
                    if seen[-2:] == ["offline", "online"]:
                        break
        await client.publish(f"{local.prefix}/lab/say", json.dumps({"text": "Back.", "id": "back"}), qos=1)
        reply = await _collect(client, "back")
    assert crashed == [f"{local.prefix}/lab/say"]
    assert reply.types() == ["started", "done"]


async def test_requests_in_flight_end_when_the_broker_restarts(engine: Engine) -> None:
    broker = start_mosquitto()
    try:
        async with _local_bridge(engine, broker) as local:
            async with _client(broker) as client:
                await client.publish(f"{local.prefix}/porch/stream/start", json.dumps({"id": "open"}), qos=1)
                await until(lambda: local.bridge._devices, TIMEOUT, poll=0.01)
            await asyncio.to_thread(broker.restart)
            await local.wait_idle()  # the request ended with the connection and gave its place back
            async with asyncio.timeout(TIMEOUT):
                await local.bridge.connected.wait()
            async with _client(broker) as client:
                await client.subscribe(f"{local.prefix}/porch/#", qos=1)
                await client.publish(f"{local.prefix}/porch/say", json.dumps({"text": "Back again.", "id": "b1"}), qos=1)
                reply = await _collect(client, "b1")
    finally:
        broker.stop()
        shutil.rmtree(broker.directory, ignore_errors=True)
    assert reply.types() == ["started", "done"]
    _check_audio(reply)


async def test_shutdown_gives_back_every_place(engine: Engine, mosquitto: Broker) -> None:
    async with _local_bridge(engine, mosquitto) as local, _client(mosquitto) as client:
        await client.publish(f"{local.prefix}/porch/stream/start", json.dumps({"id": "open"}), qos=1)
        await client.publish(f"{local.prefix}/hall/stream/start", json.dumps({"id": "open"}), qos=1)
        await until(lambda: local.state.admission.counts()["mqtt"] >= 2, TIMEOUT, poll=0.01)
        assert len(local.state.context_sets) == 2
    assert local.idle()
