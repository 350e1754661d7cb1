"""The MQTT bridge: requests from a broker become engine streams, their audio and events go
back to the broker as they are made (docs/mqtt.md; the payloads live in mqtt_protocol and
hermes_protocol).

Each device (and each Hermes site) gets a ContextSet of its own, so one busy device cannot
take another's slots beyond the bridge-wide limit. The connection is re-made with exponential
backoff whenever the broker goes away; requests in flight then end, later ones are served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import ssl
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..errors import LimitExceeded, VoxflowError
from ..streaming.events import AudioFrame, StreamEnd, StreamEvent, WordTimestamp
from ..voices.styles import Style
from . import hermes_protocol as hermes
from .contexts import ContextRequest, ContextSet, UnknownContext
from .mqtt_protocol import (
    AUDIO_CONTENT_TYPE,
    JSON_CONTENT_TYPE,
    AudioBatcher,
    BrokerAddress,
    CancelRequest,
    Cancelled,
    Done,
    EndStream,
    Error,
    Event,
    MqttProtocolError,
    Request,
    RequestLimits,
    Say,
    Started,
    StartStream,
    StreamText,
    Topics,
    Word,
    encode_event,
    parse_request,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..config import Settings
    from .app import ServerState

_LOGGER = logging.getLogger(__name__)

_BACKOFF_START = 0.5  # seconds before the first reconnection attempt
_BACKOFF_MAX = 30.0
_LEAVE_SETTLE_SECONDS = 1.0
_CONTROL_QOS = 1  # requests, events, errors, availability
_HERMES = "hermes"  # device-key namespace of Hermes sites (voxflow devices use "")


@dataclass(frozen=True)
class _ReplyTo:
    """An MQTT 5 request's response topic: every reply to that request goes there instead."""

    topic: str | None = None
    correlation: bytes | None = None


@dataclass
class _Route:
    """Where one request's audio and events go."""

    device: str
    request_id: str
    sample_rate: int
    reply: _ReplyTo
    hermes: hermes.HermesSay | None = None
    batcher: AudioBatcher = field(default_factory=AudioBatcher)
    pcm: bytearray = field(default_factory=bytearray)  # Hermes answers with one WAV
    cancelled: bool = False
    # Audio waits until `started` is out, so a client sees `started` first on a response topic.
    started: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Device:
    contexts: ContextSet
    routes: dict[str, _Route] = field(default_factory=dict)


class Unavailable(VoxflowError):
    """The broker connection is down; a pump that gets this ends quietly."""

    code = "disconnected"


class MqttBridge:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.config = state.settings.server
        self.topics = Topics(self.config.mqtt_prefix)
        self.broker = BrokerAddress.parse(self.config.mqtt_url)
        self._client: aiomqtt.Client | None = None
        self._devices: dict[tuple[str, str], _Device] = {}
        self.connected = asyncio.Event()  # set while subscribed and `online` is published
        self._left_group = False  # unsubscribed from new requests (draining)

    # -- lifecycle ----------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[MqttBridge]:
        task = asyncio.get_running_loop().create_task(self._run(), name="voxflow-mqtt")
        self.state.drain_hooks.append(self._stop_taking_requests)
        try:
            yield self
        finally:
            self.state.drain_hooks.remove(self._stop_taking_requests)
            await asyncio.gather(*(d.contexts.close() for d in list(self._devices.values())), return_exceptions=True)
            if self._client is not None:
                # A clean disconnect does not fire the last will, so say it ourselves.
                with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                    await self._client.publish(self.topics.status, b"offline", qos=_CONTROL_QOS, retain=True, timeout=5)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for device in self._devices.values():
                self.state.connections.discard(device.contexts)
            self._devices.clear()

    async def _stop_taking_requests(self) -> None:
        """Unsubscribe from new requests so the broker hands them to the group's other workers;
        what follows requests already taken (stream text and end, cancel) still arrives."""
        client = self._client
        new_requests = [f for f in self._filters() if f.endswith(("/say", "/stream/start"))]
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                await client.unsubscribe(new_requests, timeout=5)
                self._left_group = True
                # Requests the broker had already assigned to this worker can still be queued
                # for it behind the acknowledgement (QoS 1 in-flight window); let them land.
                await asyncio.sleep(_LEAVE_SETTLE_SECONDS)

    def _new_client(self) -> aiomqtt.Client:
        b, c = self.broker, self.config
        return aiomqtt.Client(
            b.host,
            b.port,
            username=c.mqtt_username or b.username,
            password=c.mqtt_password or b.password,
            identifier=f"voxflow-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}",
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,
            will=aiomqtt.Will(self.topics.status, b"offline", qos=_CONTROL_QOS, retain=True),
            tls_context=ssl.create_default_context() if (c.mqtt_tls or b.tls) else None,
            keepalive=30,
            # Replies are many small messages: Nagle's algorithm held each ~40 ms.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )

    def _filters(self) -> list[str]:
        group = self.config.mqtt_share_group
        filters = list(self.topics.request_filters(group))
        if self.config.mqtt_hermes:
            filters.append(f"$share/{group}/{hermes.SAY_TOPIC}" if group else hermes.SAY_TOPIC)
        return filters

    async def _run(self) -> None:
        delay = _BACKOFF_START
        while True:
            try:
                async with self._new_client() as client:
                    for topic_filter in self._filters():
                        await client.subscribe(topic_filter, qos=_CONTROL_QOS)
                    self._client = client
                    await client.publish(self.topics.status, b"online", qos=_CONTROL_QOS, retain=True)
                    self.connected.set()
                    delay = _BACKOFF_START
                    _LOGGER.info("MQTT bridge on %s:%d, prefix %s", self.broker.host, self.broker.port, self.topics.prefix)
                    async for message in client.messages:
                        await self._on_message(message)
            except aiomqtt.MqttError as exc:
                _LOGGER.warning("MQTT broker %s:%d: %s; reconnecting in %.1f s", self.broker.host, self.broker.port, exc, delay)
            finally:
                self._client = None
                self.connected.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX)

    # -- requests -----------------------------------------------------------------------------

    async def _on_message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload or "").encode()
        if topic == hermes.SAY_TOPIC:
            await self._on_hermes(payload)
            return
        parsed = self.topics.parse(topic)
        if parsed is None:
            return
        device, kind = parsed
        props = message.properties
        reply = _ReplyTo(getattr(props, "ResponseTopic", None), getattr(props, "CorrelationData", None))
        request_id = None
        try:
            request = parse_request(device, kind, payload, self._limits(), lambda: secrets.token_hex(8))
            request_id = request.id
            await self._handle(request, reply)
        except MqttProtocolError as exc:
            await self._error(device, exc.code, str(exc), exc.request_id, reply)
        except VoxflowError as exc:
            await self._error(device, exc.code, str(exc), request_id, reply)
        except Exception:  # one bad request must not stop the bridge
            _LOGGER.exception("MQTT request on %s failed", topic)
            await self._error(device, "internal_error", "internal error", request_id, reply)

    def _limits(self) -> RequestLimits:
        aliases = {pair.split("=", 1)[0] for pair in self.config.voice_aliases if "=" in pair}
        names = {info.name for info in self.state.engine.voices.infos()}
        return RequestLimits(self.config.max_message_chars, frozenset(names | aliases))

    async def _handle(self, request: Request, reply: _ReplyTo) -> None:
        key = ("", request.device)
        match request:
            case Say():
                device = await self._open(key, request.id, request.voice, request.style, request.sample_rate, reply)
                # Text and end together: a canned phrase reaches the stream whole (audio cache).
                await device.contexts.push(request.id, request.text)
                await device.contexts.end(request.id)
            case StartStream():
                await self._open(key, request.id, request.voice, request.style, request.sample_rate, reply)
            case StreamText():
                device = self._devices.get(key)
                if device is None or request.id not in device.contexts:
                    if self._shared:
                        return  # another worker of the group holds (or refused) this stream
                    device = await self._open(key, request.id, None, Style(), None, reply)
                await device.contexts.push(request.id, request.text)
                if request.end:
                    await device.contexts.end(request.id)
                elif request.flush:
                    await device.contexts.flush(request.id)
            case EndStream() | CancelRequest() if self._shared and not self._holds(key, request.id):
                return  # another worker of the group holds this request
            case EndStream():
                await self._known(key, request.id).contexts.end(request.id)
            case CancelRequest():
                device = self._known(key, request.id)
                # A stream whose synthesis already finished keeps its audio and `done`.
                finished = device.contexts.stream(request.id).done
                device.contexts.cancel(request.id)
                if not finished and request.id in device.routes:
                    device.routes[request.id].cancelled = True

    @property
    def _shared(self) -> bool:
        return bool(self.config.mqtt_share_group)

    def _holds(self, key: tuple[str, str], request_id: str) -> bool:
        device = self._devices.get(key)
        return device is not None and request_id in device.contexts

    def _known(self, key: tuple[str, str], request_id: str) -> _Device:
        device = self._devices.get(key)
        if device is None or request_id not in device.contexts:
            raise UnknownContext(f"no open request {request_id!r} on {key[1]!r}")
        return device

    async def _open(
        self, key: tuple[str, str], request_id: str, voice: str | None, style: Style, sample_rate: int | None,
        reply: _ReplyTo, say: hermes.HermesSay | None = None,
    ) -> _Device:
        # After leaving the share group only requests the broker had already handed over
        # arrive; they are served. Before that, draining means no new work.
        if self.state.draining and not self._left_group:
            raise VoxflowError("the server is shutting down; no new requests", code="draining")
        self.state.limiter.check(f"mqtt:{key[1]}")
        in_flight = sum(len(d.contexts) for d in self._devices.values())
        if in_flight >= self.config.mqtt_max_in_flight:
            raise LimitExceeded(f"{in_flight} requests in flight on this server; at most {self.config.mqtt_max_in_flight}")
        device = self._devices.get(key)
        if device is None:
            device = self._devices[key] = _Device(ContextSet(
                self.state.engine, lambda event: self._deliver(key, event),
                max_contexts=self.config.mqtt_max_per_device, send_timeout=self.config.send_timeout_seconds,
                metrics=self.state.metrics,
            ))
            self.state.connections.add(device.contexts)
        stream = device.contexts.open(ContextRequest(request_id, voice=self.state.voice_for(voice), style=style, sample_rate=sample_rate))
        route = device.routes[request_id] = _Route(key[1], request_id, sample_rate or stream.voice.sample_rate, reply, say)
        try:
            if say is None:
                await self._event(route, Started(request_id, stream.voice.info.name, route.sample_rate))
        finally:
            route.started.set()
        return device

    async def _on_hermes(self, payload: bytes) -> None:
        try:
            say = hermes.parse_say(payload, self.config.max_message_chars)
        except hermes.HermesError as exc:
            await self._hermes_error(str(exc), exc.site_id, exc.session_id)
            return
        request_id = say.id or secrets.token_hex(8)
        try:
            style = Style(volume=say.volume) if say.volume is not None else Style()
            device = await self._open((_HERMES, say.site_id), request_id, None, style, None, _ReplyTo(), say)
            await device.contexts.push(request_id, say.text)
            await device.contexts.end(request_id)
        except VoxflowError as exc:
            await self._hermes_error(f"{exc.code}: {exc}", say.site_id, say.session_id, say.text)

    # -- replies ------------------------------------------------------------------------------

    async def _deliver(self, key: tuple[str, str], event: StreamEvent) -> None:
        device = self._devices[key]
        route = device.routes.get(event.context_id)
        if route is None:
            return
        await route.started.wait()
        if isinstance(event, AudioFrame):
            if route.cancelled:
                return
            if route.hermes is not None:
                route.pcm += event.pcm
                return
            for message in route.batcher.add(event.pcm, event.sample_rate):
                await self._audio(route, message)
        elif isinstance(event, WordTimestamp):
            if route.hermes is None and not route.cancelled:
                await self._event(route, Word(route.request_id, event.word, round(event.start, 3), round(event.end, 3)))
        elif isinstance(event, StreamEnd):
            device.routes.pop(event.context_id, None)
            asyncio.get_running_loop().call_soon(self._forget_if_idle, key)
            if route.hermes is not None:
                await self._finish_hermes(route, event)
            else:
                await self._finish(route, event)

    async def _finish(self, route: _Route, end: StreamEnd) -> None:
        await self._audio(route, route.batcher.finish(route.sample_rate, keep_audio=end.reason == "done"))
        if end.reason == "done":
            await self._event(route, Done(route.request_id, round(route.batcher.samples / route.sample_rate, 3)))
        elif end.reason == "cancelled":
            await self._event(route, Cancelled(route.request_id))
        else:
            await self._error(route.device, end.code, end.message, route.request_id, route.reply)

    async def _finish_hermes(self, route: _Route, end: StreamEnd) -> None:
        say = route.hermes
        assert say is not None
        if end.reason == "done":
            wav = hermes.wav_bytes(bytes(route.pcm), route.sample_rate)
            await self._publish(hermes.play_bytes_topic(say.site_id, route.request_id), wav, _CONTROL_QOS, _ReplyTo(), AUDIO_CONTENT_TYPE)
        else:
            await self._hermes_error(f"{end.code or end.reason}: {end.message}", say.site_id, say.session_id, say.text)
        # Sent after an error too: a dialogue manager waits for it before going on.
        await self._publish(hermes.SAY_FINISHED_TOPIC, hermes.say_finished(say), _CONTROL_QOS, _ReplyTo(), JSON_CONTENT_TYPE)

    def _forget_if_idle(self, key: tuple[str, str]) -> None:
        device = self._devices.get(key)
        if device is not None and not len(device.contexts) and not device.routes:
            del self._devices[key]
            self.state.connections.discard(device.contexts)

    async def _audio(self, route: _Route, message: bytes) -> None:
        topic = self.topics.audio(route.device, route.request_id)
        await self._publish(topic, message, self.config.mqtt_audio_qos, route.reply, AUDIO_CONTENT_TYPE)

    async def _event(self, route: _Route, event: Event) -> None:
        await self._publish(self.topics.event(route.device), encode_event(event), _CONTROL_QOS, route.reply, JSON_CONTENT_TYPE)

    async def _error(self, device: str, code: str, message: str, request_id: str | None, reply: _ReplyTo) -> None:
        self.state.metrics.errors.labels(code).inc()
        payload = encode_event(Error(code, message, request_id))
        try:
            await self._publish(self.topics.error(device), payload, _CONTROL_QOS, reply, JSON_CONTENT_TYPE)
        except Unavailable:
            _LOGGER.warning("MQTT error for %s/%s could not be sent: %s", device, request_id, message)

    async def _hermes_error(self, message: str, site_id: str, session_id: str | None, context: str | None = None) -> None:
        with contextlib.suppress(Unavailable):
            await self._publish(hermes.ERROR_TOPIC, hermes.error_payload(message, site_id, session_id, context),
                                _CONTROL_QOS, _ReplyTo(), JSON_CONTENT_TYPE)

    async def _publish(self, topic: str, payload: bytes, qos: int, reply: _ReplyTo, content_type: str) -> None:
        client = self._client
        if client is None:
            raise Unavailable("not connected to the MQTT broker")
        properties = Properties(PacketTypes.PUBLISH)
        properties.ContentType = content_type
        if reply.topic:
            topic = reply.topic
            if reply.correlation is not None:
                properties.CorrelationData = reply.correlation
        try:
            await client.publish(topic, payload, qos=qos, properties=properties)
        except aiomqtt.MqttError as exc:
            raise Unavailable(f"MQTT publish failed: {exc}") from exc


def install(app: FastAPI, state: ServerState) -> None:
    """Run the bridge beside the HTTP server when an MQTT broker is configured."""
    if state.settings.server.mqtt_url:
        state.services.append(lambda s: MqttBridge(s).running())


async def serve_mqtt(settings: Settings) -> None:
    """The bridge on its own (no HTTP): until SIGINT/SIGTERM, then drain and go offline."""
    from ..streaming.engine import Engine
    from .app import ServerState

    engine = Engine(settings.engine, concurrent=True)
    try:
        state = ServerState(settings, engine)
        await engine.warm_up(settings.engine.voice)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with MqttBridge(state).running():
            state.ready = True
            await stop.wait()
            await state.drain()
    finally:
        await asyncio.get_running_loop().run_in_executor(None, engine.close)
