"""The MQTT bridge: requests from a broker become engine streams, their audio and events go
back to the broker as they are made (docs/mqtt.md; the payloads live in mqtt_protocol and
hermes_protocol).

Every device shares the one broker connection, so the loop that reads it never waits on a
request: it parses, admits and queues, nothing more. Each request's text reaches its stream
through a task of its own (waiting for room there holds up that request alone), its audio and
events are published by its context's pump, and the errors the loop answers are published by
tasks it does not wait for. Places are counted by the server's admission, pool "mqtt": per
device (or Hermes site) and for the whole bridge. Each device gets a ContextSet of its own,
registered with the server while the device has requests in flight.

The connection is re-made with exponential backoff whenever the broker goes away; requests in
flight then end, later ones are served.
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
from enum import Enum
from typing import TYPE_CHECKING, Any, AsyncIterator, Coroutine, Literal

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..errors import StreamClosed, VoxflowError
from ..streaming.events import AudioFrame, StreamEnd, StreamEvent, WordTimestamp
from ..streaming.stream import SynthesisStream
from ..voices.styles import Style
from ..wav import wav_file
from .core.admission import Ticket
from .core.contexts import ContextRequest, ContextSet, UnknownContext
from .protocols import hermes_protocol as hermes
from .protocols.mqtt_protocol import (
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
# Text messages of one request waiting for room in its stream (whose own queue holds 1024
# more): MQTT cannot slow a sender down, so a request whose text outruns its speech this far
# is dropped rather than buffered without end.
_INBOX_MESSAGES = 1024
# Error replies the reading loop has handed off and not yet seen published; beyond this the
# broker is not keeping up and further ones are dropped (and logged).
_MAX_PENDING_REPLIES = 256

_Key = tuple[str, str]  # (namespace, device)


class _Mark(Enum):
    FLUSH = "flush"
    END = "end"


@dataclass(frozen=True)
class _ReplyTo:
    """An MQTT 5 request's response topic: every reply to that request goes there instead."""

    topic: str | None = None
    correlation: bytes | None = None


@dataclass
class _Route:
    """One request in flight: where its audio and events go, and its text on the way in."""

    key: _Key
    request_id: str
    stream: SynthesisStream
    ticket: Ticket
    sample_rate: int
    reply: _ReplyTo
    hermes: hermes.HermesSay | None = None
    batcher: AudioBatcher = field(default_factory=AudioBatcher)
    pcm: bytearray = field(default_factory=bytearray)  # Hermes answers with one WAV
    # How the request ends when it is stopped early (cancel, dropped, broker lost); from then
    # on none of its audio is published.
    stopped: StreamEnd | None = None
    # Audio waits until `started` is out, so a client sees `started` first on a response topic.
    started: asyncio.Event = field(default_factory=asyncio.Event)
    inbox: asyncio.Queue[str | _Mark] = field(default_factory=lambda: asyncio.Queue(_INBOX_MESSAGES))
    waiting_chars: int = 0
    text_ended: bool = False
    feeder: asyncio.Task[None] | None = None

    @property
    def device(self) -> str:
        return self.key[1]


@dataclass
class _Device:
    contexts: ContextSet
    routes: dict[str, _Route] = field(default_factory=dict)


class Unavailable(VoxflowError):
    """The broker connection is down or a publish did not complete."""

    code = "disconnected"


def _failure(exc: Exception, what: str) -> tuple[str, str]:
    """(code, message) that answers `what` (a message, a request) failing with `exc`; a bug is
    logged here, once."""
    if isinstance(exc, VoxflowError):
        return exc.code, str(exc)
    _LOGGER.error("MQTT %s failed", what, exc_info=exc)
    return "internal_error", "internal error"


class MqttBridge:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.config = state.settings.server
        self.topics = Topics(self.config.mqtt_prefix)
        self.broker = BrokerAddress.parse(self.config.mqtt_url)
        self._client: aiomqtt.Client | None = None
        self._devices: dict[_Key, _Device] = {}
        self._replies: set[asyncio.Task[None]] = set()
        self._replies_dropping = False
        self.connected = asyncio.Event()  # set while subscribed and `online` is published

    # -- lifecycle ----------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[MqttBridge]:
        task = asyncio.get_running_loop().create_task(self._run(), name="voxflow-mqtt")
        self.state.drain_hooks.append(self._stop_taking_requests)
        try:
            yield self
        finally:
            self.state.drain_hooks.remove(self._stop_taking_requests)
            # Stop reading first (the task says `offline` as it leaves), then end what is left.
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            devices, routes = list(self._devices.values()), self._routes()
            await asyncio.gather(*(device.contexts.close() for device in devices), return_exceptions=True)
            for route in routes:  # their pumps were cancelled, maybe before delivering the end
                self._end(route)
            tasks = [*self._replies, *(route.feeder for route in routes if route.feeder is not None)]
            for pending in tasks:
                pending.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stop_taking_requests(self) -> None:
        """Unsubscribe from new requests so the broker hands them to the group's other workers;
        what follows requests already taken (stream text and end, cancel) still arrives."""
        client = self._client
        new_requests = [f for f in self._filters() if f.endswith(("/say", "/stream/start"))]
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                await client.unsubscribe(new_requests, timeout=5)
                # Requests the broker had already assigned to this worker can still be queued
                # for it behind the acknowledgement (QoS 1 in-flight window); let them land
                # before the drain refuses new work.
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
                    try:
                        for topic_filter in self._filters():
                            await client.subscribe(topic_filter, qos=_CONTROL_QOS)
                        self._client = client
                        await client.publish(self.topics.status, b"online", qos=_CONTROL_QOS, retain=True)
                        self.connected.set()
                        delay = _BACKOFF_START
                        _LOGGER.info("MQTT bridge on %s:%d, prefix %s", self.broker.host, self.broker.port, self.topics.prefix)
                        async for message in client.messages:
                            self._on_message(message)
                    except aiomqtt.MqttError:
                        raise  # the connection is broken: the broker sends the last will
                    except BaseException:
                        # Leaving a working connection (shutdown, a failure of ours): a clean
                        # disconnect fires no last will, so say `offline` ourselves.
                        with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                            await client.publish(self.topics.status, b"offline", qos=_CONTROL_QOS, retain=True, timeout=5)
                        raise
            except aiomqtt.MqttError as exc:
                _LOGGER.warning("MQTT broker %s:%d: %s; reconnecting in %.1f s", self.broker.host, self.broker.port, exc, delay)
            except Exception:
                _LOGGER.exception("MQTT bridge failed; reconnecting in %.1f s", delay)
            finally:
                self._client = None
                self.connected.clear()
                for route in self._routes():
                    self._stop(route, "error", "disconnected", "the connection to the MQTT broker was lost")
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX)

    # -- requests (synchronous: nothing here may wait on one request) ---------------------------

    def _on_message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload or "").encode()
        if topic == hermes.SAY_TOPIC:
            self._on_hermes(payload)
        elif (parsed := self.topics.parse(topic)) is not None:
            self._on_request(*parsed, payload, message.properties)

    def _on_request(self, device: str, kind: str, payload: bytes, properties: Properties | None) -> None:
        reply, refusal = self._reply_to(properties)
        request_id = None
        try:
            request = parse_request(device, kind, payload, self._limits(), lambda: secrets.token_hex(8))
            request_id = request.id
            if refusal is not None:
                raise MqttProtocolError(refusal.code, str(refusal), request_id)
            self._handle(request, reply)
        except Exception as exc:  # one bad message must not stop the bridge
            code, message = _failure(exc, f"message on {self.topics.prefix}/{device}/{kind}")
            rid = exc.request_id if isinstance(exc, MqttProtocolError) else request_id
            self._spawn(self._error(device, code, message, rid, reply))

    def _reply_to(self, properties: Properties | None) -> tuple[_ReplyTo, MqttProtocolError | None]:
        """Where replies go, and why the requested response topic is refused (then they go to
        the device's own topics)."""
        topic = getattr(properties, "ResponseTopic", None)
        if topic is None:
            return _ReplyTo(), None
        try:
            self.topics.check_response_topic(topic)
        except MqttProtocolError as exc:
            return _ReplyTo(), exc
        return _ReplyTo(topic, getattr(properties, "CorrelationData", None)), None

    def _limits(self) -> RequestLimits:
        aliases = {pair.split("=", 1)[0] for pair in self.config.voice_aliases if "=" in pair}
        names = {info.name for info in self.state.engine.voices.infos()}
        return RequestLimits(self.config.max_message_chars, frozenset(names | aliases))

    def _handle(self, request: Request, reply: _ReplyTo) -> None:
        key = ("", request.device)
        match request:
            case Say():
                route = self._open(key, request.id, request.voice, request.style, request.sample_rate, reply)
                # Text and end together: a canned phrase reaches the stream whole (audio cache).
                self._queue(route, request.text)
                self._queue(route, _Mark.END)
            case StartStream():
                self._open(key, request.id, request.voice, request.style, request.sample_rate, reply)
            case StreamText():
                route = self._route(key, request.id)
                if route is None:
                    if self._shared:
                        return  # another worker of the group holds (or refused) this stream
                    route = self._open(key, request.id, None, Style(), None, reply)
                self._queue(route, request.text)
                if request.end or request.flush:
                    self._queue(route, _Mark.END if request.end else _Mark.FLUSH)
            case EndStream() | CancelRequest() if self._shared and self._route(key, request.id) is None:
                return  # another worker of the group holds this request
            case EndStream():
                self._queue(self._known(key, request.id), _Mark.END)
            case CancelRequest():
                route = self._known(key, request.id)
                self._stop(route, "cancelled")

    @property
    def _shared(self) -> bool:
        return bool(self.config.mqtt_share_group)

    def _route(self, key: _Key, request_id: str) -> _Route | None:
        device = self._devices.get(key)
        return device.routes.get(request_id) if device is not None else None

    def _known(self, key: _Key, request_id: str) -> _Route:
        route = self._route(key, request_id)
        if route is None:
            raise UnknownContext(f"no open request {request_id!r} on {key[1]!r}")
        return route

    def _open(
        self, key: _Key, request_id: str, voice: str | None, style: Style, sample_rate: int | None,
        reply: _ReplyTo, say: hermes.HermesSay | None = None,
    ) -> _Route:
        # Raises draining, rate_limited or limit_exceeded (per device, or the whole bridge).
        ticket = self.state.admission.admit(self.state.admission.device(key[1]), "mqtt")
        device = self._devices.get(key) or _Device(ContextSet(
            self.state.engine, lambda event: self._deliver(key, event),
            # Admission caps the device first; this only sizes the set.
            max_contexts=self.config.mqtt_max_per_device, send_timeout=self.config.send_timeout_seconds,
            metrics=self.state.metrics, on_closed=lambda request_id: self._closed(key, request_id),
        ))
        try:
            stream = device.contexts.open(ContextRequest(request_id, voice=self.state.voice_for(voice), style=style, sample_rate=sample_rate))
        except BaseException:
            ticket.release()
            raise
        if key not in self._devices:
            self._devices[key] = device
            self.state.context_sets.add(device.contexts)
        route = device.routes[request_id] = _Route(key, request_id, stream, ticket, sample_rate or stream.info.sample_rate, reply, say)
        if say is not None:
            route.started.set()  # Hermes has no `started`
        route.feeder = asyncio.get_running_loop().create_task(self._feed(route), name=f"voxflow-mqtt-{key[1]}-{request_id}")
        return route

    def _queue(self, route: _Route, item: str | _Mark) -> None:
        """Hand text (or a flush, the end) to the request's feeder without waiting."""
        if route.stopped is not None:
            return  # its end (an error or `cancelled`) is on the way
        if route.text_ended:
            raise StreamClosed(f"request {route.request_id!r} has already ended its text")
        chars = len(item) if isinstance(item, str) else 0
        if route.inbox.full() or route.waiting_chars + chars > self.state.engine.config.max_text_chars:
            self._stop(route, "error", "limit_exceeded", (
                f"text arrives faster than it is spoken ({route.inbox.qsize()} messages, {route.waiting_chars} "
                f"characters waiting); request {route.request_id!r} dropped"
            ))
            return
        route.text_ended = item is _Mark.END
        route.waiting_chars += chars
        route.inbox.put_nowait(item)

    def _stop(self, route: _Route, reason: Literal["cancelled", "error"], code: str = "", message: str = "") -> None:
        """End a request early; one whose synthesis already finished keeps its audio and `done`."""
        if route.stopped is None and not route.stream.done:
            route.stopped = StreamEnd(route.request_id, reason, code, message)
            route.stream.cancel()

    def _routes(self) -> list[_Route]:
        return [route for device in self._devices.values() for route in device.routes.values()]

    def _on_hermes(self, payload: bytes) -> None:
        say = None
        try:
            say = hermes.parse_say(payload, self.config.max_message_chars)
            style = Style(volume=say.volume) if say.volume is not None else Style()
            route = self._open((_HERMES, say.site_id), say.id or secrets.token_hex(8), None, style, None, _ReplyTo(), say)
            self._queue(route, say.text)
            self._queue(route, _Mark.END)
        except Exception as exc:  # one bad message must not stop the bridge
            code, message = _failure(exc, f"message on {hermes.SAY_TOPIC}")
            if isinstance(exc, hermes.HermesError):
                where = (exc.site_id, exc.session_id, None)
            else:
                where = (say.site_id, say.session_id, say.text) if say else (hermes.DEFAULT_SITE, None, None)
            self._spawn(self._hermes_error(code, message, *where))

    def _spawn(self, reply: Coroutine[Any, Any, None]) -> None:
        """Publish a reply without the reading loop waiting for it."""
        if len(self._replies) >= _MAX_PENDING_REPLIES:
            reply.close()
            if not self._replies_dropping:
                _LOGGER.warning("MQTT replies are not published as fast as they are made; dropping error replies")
            self._replies_dropping = True
            return
        self._replies_dropping = False
        task = asyncio.get_running_loop().create_task(reply)
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    # -- one request's own tasks --------------------------------------------------------------

    async def _feed(self, route: _Route) -> None:
        """Hand the request's text to its stream, in order; waiting for room there (the stream
        speaks slower than text arrives) holds up this request alone."""
        try:
            if route.hermes is None:
                try:
                    await self._event(route, Started(route.request_id, route.stream.info.name, route.sample_rate))
                finally:
                    route.started.set()
            while True:
                item = await route.inbox.get()
                try:
                    if item is _Mark.END:
                        await route.stream.end()
                        return
                    if item is _Mark.FLUSH:
                        await route.stream.flush()
                    else:
                        route.waiting_chars -= len(item)
                        await route.stream.push(item)
                except StreamClosed:
                    return  # stopped or failed meanwhile: its pump reports how it ended
                except VoxflowError as exc:  # this text refused (the stream's limits); the request goes on
                    await self._error(route.device, exc.code, str(exc), route.request_id, route.reply)
        except Exception as exc:
            code, message = _failure(exc, f"request {route.request_id!r} of {route.device!r}")
            self._stop(route, "error", code, message)

    async def _deliver(self, key: _Key, event: StreamEvent) -> None:
        """The context's pump hands each event here; it bounds the time this takes (send_timeout)."""
        device = self._devices.get(key)
        route = device.routes.get(event.context_id) if device is not None else None
        if route is None:
            return
        if isinstance(event, StreamEnd):
            try:
                await route.started.wait()
                end = route.stopped or event
                if route.hermes is not None:
                    await self._finish_hermes(route, end)
                else:
                    await self._finish(route, end)
            except Unavailable:
                pass  # nobody is left to tell
            finally:  # also when the pump gives up on this delivery
                self._end(route)
            return
        if route.stopped is not None:
            return
        await route.started.wait()
        try:
            if isinstance(event, AudioFrame):
                if route.hermes is not None:
                    route.pcm += event.pcm
                    return
                for message in route.batcher.add(event.pcm, event.sample_rate):
                    await self._audio(route, message)
            elif isinstance(event, WordTimestamp) and route.hermes is None:
                await self._event(route, Word(route.request_id, event.word, round(event.start, 3), round(event.end, 3)))
        except Unavailable as exc:
            # Nothing more of this request can reach its client: stop synthesizing it.
            self._stop(route, "error", exc.code, str(exc))

    def _closed(self, key: _Key, request_id: str) -> None:
        # A drain or a shutdown may cancel a pump before it delivers the end.
        device = self._devices.get(key)
        if device is not None and (route := device.routes.get(request_id)) is not None:
            self._end(route)

    def _end(self, route: _Route) -> None:
        """The request is over, however it ended: give its place back and forget it (and its
        device, once the device has no request left)."""
        device = self._devices.get(route.key)
        if device is not None and device.routes.get(route.request_id) is route:
            del device.routes[route.request_id]
            if not device.routes:
                del self._devices[route.key]
                self.state.context_sets.discard(device.contexts)
        route.ticket.release()
        if route.feeder is not None:
            route.feeder.cancel()

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
            wav = wav_file(bytes(route.pcm), route.sample_rate)  # the payload playBytes expects
            await self._publish(hermes.play_bytes_topic(say.site_id, route.request_id), wav, _CONTROL_QOS, _ReplyTo(), AUDIO_CONTENT_TYPE)
        else:
            await self._hermes_error(end.code or end.reason, end.message, say.site_id, say.session_id, say.text)
        # Sent after an error too: a dialogue manager waits for it before going on.
        await self._publish(hermes.SAY_FINISHED_TOPIC, hermes.say_finished(say), _CONTROL_QOS, _ReplyTo(), JSON_CONTENT_TYPE)

    # -- publishing ---------------------------------------------------------------------------

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

    async def _hermes_error(self, code: str, message: str, site_id: str, session_id: str | None, context: str | None = None) -> None:
        with contextlib.suppress(Unavailable):
            await self._publish(hermes.ERROR_TOPIC, hermes.error_payload(f"{code}: {message}", site_id, session_id, context),
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
    """Run the bridge beside the HTTP server (the app installs it when a broker is configured)."""
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
