"""ElevenLabs-compatible endpoints: `/v1/text-to-speech/{voice_id}/stream-input` and
`/v1/text-to-speech/{voice_id}/multi-stream-input`, socket <-> ContextSet.

The wire format lives in elevenlabs_protocol and the contexts in ContextSet; this module admits
connections, turns messages into ContextSet calls and events into audio messages. What voxflow
decides where ElevenLabs leaves room is in docs/compatibility.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import FastAPI, WebSocket

from ..errors import LimitExceeded, StreamClosed, VoxflowError
from ..streaming.events import AudioFrame, StreamEnd, StreamEvent, WordTimestamp
from .core.admission import Draining, Identity, Ticket
from .core.auth import Unauthorized, presented_key
from .core.contexts import ContextRequest, ContextSet, Disconnected, UnknownContext
from .core.websocket import CLOSE_GOING_AWAY, CLOSE_NORMAL, SocketCarrier, close_code_for
from .protocols.elevenlabs_protocol import (
    DEFAULT_CONTEXT,
    INTERNAL_ERROR,
    POLICY_VIOLATION,
    AudioPacker,
    ClientMessage,
    ConnectionOptions,
    ElevenLabsError,
    VoiceSettings,
    WrittenWords,
    audio_message,
    ends_sentence,
    error_message,
    final_message,
    parse_message,
    parse_query,
    resolve_voice,
)

if TYPE_CHECKING:
    from .app import ServerState  # app imports this module to install it

_LOGGER = logging.getLogger(__name__)


_SINGLE = "stream-input"  # the one context of a stream-input socket
# Audio one context may have waiting for the socket before its pump waits too; past
# send_timeout of waiting, ContextSet drops the context as a slow consumer.
_HIGH_WATER_SECONDS = 2.0
# Error messages waiting for a client that sends but does not read; past this, they are dropped.
_MAX_QUEUED_MESSAGES = 256


def _resolve(sent: asyncio.Future[bool], value: bool) -> None:
    if not sent.done():  # its waiter may have given up (ContextSet's send_timeout) and cancelled it
        sent.set_result(value)


@dataclass
class _Finish:
    end: StreamEnd
    close_code: int | None
    sent: asyncio.Future[bool]


@dataclass
class _Close:
    code: int
    reason: str
    sent: asyncio.Future[bool]


class _Sender:
    """The socket's only writer, a task of its own.

    Frames and words are buffered per context; the writer runs when the loop is free, which
    is once the pumps have taken every event that was ready. So a decoded block goes out as
    one burst, cut into messages by AudioPacker, and nothing waits for audio still to come:
    the first audio goes out as soon as it exists.
    """

    def __init__(self, socket: SocketCarrier, options: ConnectionOptions, *, multi: bool) -> None:
        self._socket = socket
        self._options = options
        self._multi = multi
        self._send_timeout = socket.send_timeout
        self._packers: dict[str, AudioPacker] = {}
        self._written: dict[str, WrittenWords] = {}  # per context, what the client sent
        self._discarded: set[str] = set()  # cancelled contexts: their remaining audio must not go out
        self._queue: deque[dict | _Finish | _Close] = deque()
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()  # replaced after each pass; set wakes who waits for room
        self._open = True
        self._task = asyncio.get_running_loop().create_task(self._run(), name="voxflow-elevenlabs-sender")

    def _new_packer(self) -> AudioPacker:
        fmt = self._options.output_format
        return AudioPacker(fmt.sample_rate, fmt.audio.encoder(fmt.sample_rate), context_times=self._options.sync_alignment)

    def _label(self, context_id: str) -> str | None:
        return context_id if self._multi else None

    def _check(self) -> None:
        if not self._open:
            raise Disconnected("the connection is closed")

    async def event(self, event: AudioFrame | WordTimestamp) -> None:
        self._check()
        if event.context_id in self._discarded:
            return
        packer = self._packers.get(event.context_id)
        if packer is None:
            packer = self._packers[event.context_id] = self._new_packer()
        if isinstance(event, WordTimestamp):
            written = self._written.get(event.context_id)
            packer.add_word(event.word, event.start, event.end, written.match(event.word) if written else None)
            return
        packer.add_audio(event.pts, event.pcm)
        self._wake.set()
        while packer.buffered_seconds > _HIGH_WATER_SECONDS and self._packers.get(event.context_id) is packer:
            await self._progress.wait()
            self._check()

    def text(self, context_id: str, text: str) -> None:
        """Text the client sent a context, for the `alignment` of its words."""
        self._written.setdefault(context_id, WrittenWords()).feed(text)

    def send(self, payload: dict) -> None:
        self._check()
        if len(self._queue) >= _MAX_QUEUED_MESSAGES:
            # The client sends but does not read. Dropping a message could drop the isFinal it
            # waits for, so it is treated as gone instead.
            self._stop()
            raise Disconnected("the client stopped reading")
        self._queue.append(payload)
        self._wake.set()

    def discard(self, context_id: str) -> None:
        self._discarded.add(context_id)
        self._packers.pop(context_id, None)
        self._written.pop(context_id, None)

    async def finish(self, end: StreamEnd, close_code: int | None) -> None:
        """The context's remaining audio (none unless it ended well), then isFinal, then on
        stream-input a close."""
        if end.reason != "done":
            self.discard(end.context_id)
        if not await self._enqueue(_Finish(end, close_code, asyncio.get_running_loop().create_future())):
            raise Disconnected("the connection is closed")

    async def close(self, code: int, reason: str) -> None:
        """After what is queued; a client that reads nothing gets send_timeout to take it all,
        after which the session ends anyway and the server drops the connection."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._send_timeout):
                await self._enqueue(_Close(code, reason, asyncio.get_running_loop().create_future()))

    async def _enqueue(self, item: _Finish | _Close) -> bool:
        if not self._open:
            return False
        self._queue.append(item)
        self._wake.set()
        return await item.sent

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._stop()

    def _stop(self) -> None:
        self._open = False
        for item in self._queue:
            if not isinstance(item, dict):
                _resolve(item.sent, False)
        self._queue.clear()
        self._progress.set()

    async def _run(self) -> None:
        try:
            while self._open:
                await self._wake.wait()
                self._wake.clear()
                await self._send_audio()
                while self._queue and self._open:
                    item = self._queue.popleft()
                    if isinstance(item, _Finish):
                        await self._finish(item)
                    elif isinstance(item, _Close):
                        await self._close(item)
                    else:
                        await self._send(item)
                self._progress.set()
                self._progress = asyncio.Event()
        except Disconnected:
            pass
        finally:
            self._stop()

    async def _send_audio(self) -> None:
        for context_id, packer in list(self._packers.items()):
            for chunk in packer.take():
                if context_id in self._discarded:
                    break
                await self._send(audio_message(chunk, self._label(context_id), sync_alignment=self._options.sync_alignment))

    async def _finish(self, item: _Finish) -> None:
        end, label = item.end, self._label(item.end.context_id)
        packer = self._packers.pop(end.context_id, None)
        self._written.pop(end.context_id, None)
        self._discarded.discard(end.context_id)
        if packer is not None:
            for chunk in packer.take(final=True):
                await self._send(audio_message(chunk, label, sync_alignment=self._options.sync_alignment))
        if end.reason == "error":
            code = INTERNAL_ERROR if end.code == "internal_error" else POLICY_VIOLATION
            await self._send(error_message(end.code, end.message, code=code, context_id=label))
        await self._send(final_message(label))
        _resolve(item.sent, True)
        if item.close_code is not None:
            await self._close(_Close(item.close_code, "", asyncio.get_running_loop().create_future()))

    async def _close(self, item: _Close) -> None:
        self._open = False
        await self._socket.close(item.code, item.reason)
        _resolve(item.sent, True)

    async def _send(self, payload: dict) -> None:
        # Unbounded here: a context whose audio waits too long is ContextSet's to drop (its
        # pump waits for room in the packer), and the rest wait their turn on the one socket.
        await self._socket.send(json.dumps(payload, ensure_ascii=False, separators=(",", ":")))


@dataclass
class _ContextState:
    last_input: float  # loop time of the last message naming the context
    flushed: bool = False  # everything pushed so far was flushed: a close lets it finish
    closing: bool = False
    ended: bool = False  # its stream has ended; its isFinal is on the way


class _Session:
    # Set once the connection is admitted (run).
    options: ConnectionOptions
    sender: _Sender
    contexts: ContextSet

    def __init__(self, ws: WebSocket, state: ServerState, voice_id: str, *, multi: bool) -> None:
        self.socket = SocketCarrier(ws, state.settings.server.send_timeout_seconds)
        self.state = state
        self.config = state.settings.server
        self.multi = multi
        self.voice = resolve_voice(voice_id, [i.name for i in state.engine.voices.infos()], state.voice_for)
        self.loop = asyncio.get_running_loop()
        self.last_input = self.loop.time()
        self.identity: Identity | None = None  # set once admitted
        self.ended = False  # stream-input: the end of input ({"text": ""}) arrived
        self.started = False  # stream-input: its context was opened
        self.open: dict[str, _ContextState] = {}

    async def _close_after_drain(self) -> None:
        # Only a server drain closes the socket here; a context set closing on its own does not.
        if self.state.draining:
            await self.sender.close(CLOSE_GOING_AWAY, "server shutting down")

    async def run(self) -> None:
        await self.socket.ws.accept()
        try:
            self.options = parse_query(self.socket.ws.query_params)
            admitted = await self._admit()
        except VoxflowError as exc:
            await self._refuse(exc)
            return
        if admitted is None:  # gone before it sent its key
            return
        ticket, first = admitted
        with ticket:
            self.sender = _Sender(self.socket, self.options, multi=self.multi)
            self.contexts = self.state.connection_contexts(self.deliver, after_drain=self._close_after_drain)
            try:
                async with self.state.serving(self.contexts):
                    await self._receive_loop(first)
            except Disconnected:
                pass
            finally:
                await self.sender.aclose()

    async def _admit(self) -> tuple[Ticket, ClientMessage | None] | None:
        """The socket's place, and the first message when that is what carried the key.

        ElevenLabs lets the key come in the first message. Until it does, the socket holds a
        place in the small handshake pool only, for at most auth_timeout_seconds, so clients
        that never send a key cannot take the places of those that do.
        """
        admission = self.state.admission
        key = presented_key(self.socket.ws.headers) or self.options.api_key
        if key is not None or not admission.keys:
            return self._admit_key(key), None
        with admission.admit(admission.anonymous(self.socket.peer, self.socket.forwarded_for), "handshake", rate=False):
            try:
                async with asyncio.timeout(self.config.auth_timeout_seconds):
                    raw = await self.socket.receive()
            except TimeoutError:
                raise self._unauthorized(f"no API key within {self.config.auth_timeout_seconds:g} s") from None
            if raw is None:
                return None
            try:
                first = parse_message(raw)
            except VoxflowError as exc:  # a message that cannot be read carries no key
                raise self._unauthorized(f"the first message could not be read ({exc})") from None
            return self._admit_key(first.api_key), first

    def _admit_key(self, key: str | None) -> Ticket:
        try:
            self.identity, ticket = self.socket.admit(self.state.admission, key)
        except Unauthorized:
            raise self._unauthorized("invalid or missing API key") from None
        return ticket

    @staticmethod
    def _unauthorized(problem: str) -> ElevenLabsError:
        return ElevenLabsError(
            f"{problem}: send it as the xi-api-key header, Authorization: Bearer, or xi_api_key in the first message",
            error="invalid_api_key",
        )

    async def _refuse(self, exc: VoxflowError) -> None:
        """Before the session is set up: the error, then the close, straight on the socket."""
        self.state.metrics.errors.labels(exc.code).inc()
        await self.socket.refuse(json.dumps(error_message(exc.code, str(exc)), ensure_ascii=False), exc)

    def _report(self, exc: VoxflowError, context_id: str | None = None) -> None:
        self.state.metrics.errors.labels(exc.code).inc()
        code = INTERNAL_ERROR if exc.code == "internal_error" else POLICY_VIOLATION
        self.sender.send(error_message(exc.code, str(exc), code=code, context_id=context_id if self.multi else None))

    async def _fail(self, exc: VoxflowError) -> None:
        """ElevenLabs' way with errors it cannot carry on from: the error, then a close."""
        self._report(exc)
        await self.sender.close(close_code_for(exc), str(exc))

    # -- input ----------------------------------------------------------------------------

    def _deadline(self) -> float | None:
        timeout = self.options.inactivity_timeout
        if not self.multi:
            return None if self.ended else self.last_input + timeout
        idle = [s.last_input + timeout for s in self.open.values() if not s.closing]
        return min([self.last_input + timeout, *idle])

    async def _receive_loop(self, first: ClientMessage | None) -> None:
        if first is not None and await self._handle(first):
            return
        while True:
            try:
                async with asyncio.timeout_at(self._deadline()):
                    raw = await self.socket.receive()
            except TimeoutError:
                if await self._on_idle():
                    return
                continue
            if raw is None:
                return
            self.last_input = self.loop.time()
            try:
                msg = parse_message(raw)
            except VoxflowError as exc:
                self._report(exc)
                continue
            if await self._handle(msg):
                return

    async def _handle(self, msg: ClientMessage) -> bool:
        """One message; True when the session is over."""
        try:
            return await (self._handle_multi(msg) if self.multi else self._handle_single(msg))
        except Disconnected:
            raise
        except VoxflowError as exc:
            self._report(exc, msg.context_id or DEFAULT_CONTEXT)
        except Exception:  # one bad message must not take the other contexts down
            _LOGGER.exception("elevenlabs stream: a message failed")
            self._report(VoxflowError("internal error", code="internal_error"), msg.context_id or DEFAULT_CONTEXT)
        return False

    async def _on_idle(self) -> bool:
        """An inactivity deadline passed; True when the socket was closed for it."""
        now, timeout = self.loop.time(), self.options.inactivity_timeout
        if self.multi:
            for context_id, state in list(self.open.items()):
                if not state.closing and now >= state.last_input + timeout:
                    await self._close_context(context_id)
            if self.open:  # contexts still speaking keep the connection open
                self.last_input = max(self.last_input, now)
                return False
        if now < self.last_input + timeout:
            return False
        await self._fail(ElevenLabsError(
            f"no input within inactivity_timeout ({timeout} s); send text, a keep-alive, or the end of input",
            error="input_timeout_exceeded",
        ))
        return True

    def _check_size(self, text: str | None) -> None:
        if text is not None and len(text) > self.config.max_message_chars:
            raise LimitExceeded(f"text of {len(text)} characters in one message; at most {self.config.max_message_chars}")

    async def _handle_single(self, msg: ClientMessage) -> bool:
        self._check_size(msg.text)
        text = msg.text
        if not self.started:
            self.started = True
            try:
                self._open_context(_SINGLE, msg.voice_settings)
            except VoxflowError as exc:
                await self._fail(exc)
                return True
            if text and not text.strip():  # the initial " " opens the stream without speaking
                text = None
        elif msg.text is None and not msg.flush:
            raise ElevenLabsError('a stream-input message needs "text" (or "flush": true)')
        if text == "" and not msg.flush:
            # End of input: the rest is spoken, then isFinal and a close (see deliver).
            self.ended = True
            await self.contexts.end(_SINGLE)
            return False
        await self._speak(_SINGLE, text, msg.flush)
        return False

    async def _handle_multi(self, msg: ClientMessage) -> bool:
        if msg.close_socket:
            await self._close_socket()
            return True
        context_id = msg.context_id or DEFAULT_CONTEXT
        self._check_size(msg.text)
        if msg.close_context:
            await self._close_context(context_id)
            return False
        state = self.open.get(context_id)
        text = msg.text
        if state is None:
            if not text:  # a connection keep-alive; a context's own would name an open one
                if msg.flush:
                    raise UnknownContext(f"no open context {context_id!r} to flush")
                return False
            try:
                self._open_context(context_id, msg.voice_settings)
            except VoxflowError as exc:
                # Fatal to the context only: isFinal lets a waiting client move on.
                self._report(exc, context_id)
                self.sender.send(final_message(context_id))
                return False
            if not text.strip():  # the initial " " opens the context without speaking
                text = None
        elif state.ended:
            # Its end and isFinal are on the way (maybe stuck behind a client that does not
            # read): more input for it is moot, and an error per message would pile up.
            return False
        elif state.closing:
            if text:
                raise StreamClosed(f"context {context_id!r} is closing; open a new one")
            return False
        else:
            state.last_input = self.loop.time()
        await self._speak(context_id, text, msg.flush)
        return False

    async def _speak(self, context_id: str, text: str | None, flush: bool) -> None:
        state = self.open.get(context_id)
        if state is None or state.ended:
            raise StreamClosed("the stream has ended")
        if text:
            self.sender.text(context_id, text)  # before its words can come back
            await self.contexts.push(context_id, text)
            state.flushed = False
        if flush or (text and self.options.auto_mode and ends_sentence(text)):
            await self.contexts.flush(context_id)
            state.flushed = True

    def _open_context(self, context_id: str, settings: VoiceSettings | None) -> None:
        if self.multi:  # a stream-input socket's one context was paid for when it connected
            self.state.admission.check_new_work(self.identity)
        elif self.state.draining:
            raise Draining("the server is shutting down; no new contexts")
        request = ContextRequest(
            context_id,
            voice=self.voice,
            style=(settings or VoiceSettings()).to_style(),
            seed=self.options.seed,
            sample_rate=self.options.sample_rate,
        )
        try:
            self.contexts.open(request)
        except LimitExceeded as exc:
            raise ElevenLabsError(f"{exc}; close one (close_context) first", error="max_active_conversations") from None
        self.open[context_id] = _ContextState(self.loop.time())

    async def _close_context(self, context_id: str) -> None:
        """Flushed text is spoken to the end, then isFinal; unflushed text is dropped at once.
        A second close (a barge-in during the rest of a flushed answer) stops it too."""
        state = self.open.get(context_id)
        if state is None or state.ended:
            return
        if state.flushed and not state.closing:
            state.closing = True
            await self.contexts.end(context_id)
            return
        state.closing = True
        self.contexts.cancel(context_id)
        self.sender.discard(context_id)

    async def _close_socket(self) -> None:
        for context_id in list(self.open):
            await self._close_context(context_id)
        await self.contexts.drain(self.config.grace_seconds)
        await self.sender.close(CLOSE_NORMAL, "")

    # -- output ---------------------------------------------------------------------------

    async def deliver(self, event: StreamEvent) -> None:
        """ContextSet's callback; it bounds the time this may take (send_timeout)."""
        if not isinstance(event, StreamEnd):
            await self.sender.event(event)
            return
        state = self.open.get(event.context_id)
        if state is not None:
            state.ended = True
        # stream-input carries one context: ElevenLabs closes the socket after its isFinal.
        close_code = None if self.multi else CLOSE_GOING_AWAY if self.state.draining else CLOSE_NORMAL
        try:
            await self.sender.finish(event, close_code)
        finally:  # its isFinal is out, or the pump gave up waiting: the id may be used again
            if self.open.get(event.context_id) is state:
                self.open.pop(event.context_id, None)


def install(app: FastAPI, state: ServerState) -> None:
    @app.websocket("/v1/text-to-speech/{voice_id}/stream-input")
    async def elevenlabs_stream_input(ws: WebSocket, voice_id: str) -> None:
        await _Session(ws, state, voice_id, multi=False).run()

    @app.websocket("/v1/text-to-speech/{voice_id}/multi-stream-input")
    async def elevenlabs_multi_stream_input(ws: WebSocket, voice_id: str) -> None:
        await _Session(ws, state, voice_id, multi=True).run()
