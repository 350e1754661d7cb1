"""Client SDK for voxflow's native WebSocket protocol (`docs/protocol.md`, voxflow.v1).

Async::

    async with AsyncVoxflowClient("ws://127.0.0.1:8765/v1/stream") as client:
        async with client.context(style="happy") as ctx:
            ctx.push("Hello ")
            ctx.push("there.")
            ctx.end()
            async for event in ctx:
                ...  # Audio, Word, Metrics, then Done (or Cancelled / Error)

Blocking: `VoxflowClient`, the same surface without `await`.

One WebSocket carries every context of a client. A single reader task per connection parses
frames with `voxflow.transports.protocols.native_protocol` and routes each one to its context's queue.
Those queues are bounded (`queue_size` events, 256 by default: about five seconds of 20 ms
frames plus their words). When a consumer stops reading, its queue fills and the reader waits
for it; the connection's other contexts wait too, the socket stops being read, and the server
sees TCP backpressure. Nothing is dropped on the client. A consumer that keeps reading at any
pace (real-time playback, say) only slows the connection down; one that stops for longer than
the server's `send_timeout_seconds` (5 s by default) makes the server drop the context it was
sending (`slow_consumer`) or, if it was stuck sending a reply, the connection. A context left
through `async with` (or `detach()`) is cancelled and its queue emptied, so it never stalls
the others.

A failed connect is retried with exponential backoff and jitter (`backoff_delay`). When an open
connection drops, its in-flight contexts end with an `Error` whose code is `connection_lost`,
and the client reconnects in the background; contexts started afterwards use the new
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from .errors import StreamClosed, VoxflowError
from .transports.protocols.native_protocol import (
    PROTOCOL,
    AudioPacket,
    Cancel,
    Cancelled,
    Done,
    End,
    Error,
    Flush,
    Metrics,
    ProtocolError,
    Ready,
    Start,
    Started,
    StyleSpec,
    Text,
    Word,
    parse_server,
    serialize_client,
)

__all__ = [
    "AsyncVoxflowClient", "Audio", "Cancelled", "ConnectionFailed", "Context", "Done", "Error", "Event",
    "Metrics", "Speech", "StyleSpec", "SyncContext", "Unauthorized", "VoxflowClient", "Word", "backoff_delay",
]

_LOGGER = logging.getLogger(__name__)

DEFAULT_URL = "ws://127.0.0.1:8765/v1/stream"
DEFAULT_QUEUE_SIZE = 256
_UNAUTHORIZED_CLOSE = 4001
_T = TypeVar("_T")


class ConnectionFailed(VoxflowError):
    """Every connection attempt failed."""

    code = "connection_failed"


class Unauthorized(VoxflowError):
    """The server refused the API key; retrying with the same key cannot help."""

    code = "unauthorized"


class _Refused(VoxflowError):
    """The server turned the connection away for a while (busy, rate limited, restarting)."""


@dataclass(frozen=True, slots=True)
class Audio:
    """A frame of PCM signed 16-bit little-endian mono; pts is its start in seconds."""

    pcm: bytes
    seq: int
    pts: float
    sample_rate: int
    context: str

    @property
    def duration(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate


Event = Audio | Word | Metrics | Done | Cancelled | Error
_TERMINAL = (Done, Cancelled, Error)


@dataclass(frozen=True)
class Speech:
    """What `Context.collect` gathered from a context that finished."""

    pcm: bytes
    sample_rate: int
    words: list[Word] = field(default_factory=list)
    metrics: Metrics | None = None

    @property
    def duration(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate if self.sample_rate else 0.0


def backoff_delay(attempt: int, initial: float, maximum: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry `attempt` (0 for the first retry).

    The ceiling doubles from `initial` up to `maximum`; the delay is drawn from the ceiling's
    upper half, so clients dropped together by a restarting server spread their reconnects
    out, yet none retries in a tight loop.
    """
    ceiling = min(maximum, initial * 2.0 ** min(attempt, 64))
    return ceiling / 2 + rand() * ceiling / 2


def _raise_for(event: Error) -> None:
    raise VoxflowError(event.message, code=event.code)


def _refusal(greeting: object) -> VoxflowError:
    """Why a server's first message is not a usable greeting."""
    if isinstance(greeting, Error):
        # A refusal (an error, then a close): only a wrong key is final.
        if greeting.code == "unauthorized":
            return Unauthorized(greeting.message)
        return _Refused(greeting.message, code=greeting.code)
    if isinstance(greeting, Ready):
        return VoxflowError(f"the server speaks {greeting.protocol}, this client {PROTOCOL}", code="unsupported_protocol")
    return VoxflowError(f"expected the server's ready greeting, got {greeting!r:.200}", code="unexpected_message")


class _Connection:
    """One open socket: its greeting, its contexts, and the tasks that read and write it."""

    def __init__(self, ws: ClientConnection, ready: Ready) -> None:
        self.ws = ws
        self.ready = ready
        self.contexts: dict[str, Context] = {}
        # Sends go through a queue so that push()/end() need no await and keep their order.
        self.outgoing: asyncio.Queue[str] = asyncio.Queue()
        self.reader: asyncio.Task[None] | None = None
        self.writer: asyncio.Task[None] | None = None

    def send(self, message: Start | Text | Flush | End | Cancel) -> None:
        self.outgoing.put_nowait(serialize_client(message))

    async def write(self) -> None:
        try:
            while True:
                await self.ws.send(await self.outgoing.get())
        except ConnectionClosed:
            pass  # the reader sees the close too and ends the contexts


class Context:
    """One utterance on a client's connection; iterate it for its events.

    `push`, `flush`, `end` and `cancel` only queue a message, so they can be called from any
    code on the client's loop without awaiting. After `end()`, pushing raises StreamClosed;
    after the context has finished otherwise (cancelled, an error, the connection lost) text
    is ignored, so a producer such as an LLM stream needs no extra checks.

    An `Error` event ends the context: the iteration stops after it.
    """

    def __init__(self, client: AsyncVoxflowClient, start: Start) -> None:
        self.id = start.context
        self.voice: str | None = None  # as the server resolved it, once `started` arrived
        self.sample_rate: int | None = None
        self._client = client
        self._start = start
        self._conn: _Connection | None = None
        self._queue: asyncio.Queue[Event] = asyncio.Queue(client.queue_size)
        self._overflow: Error | None = None  # an end the reader could not queue (queue full)
        self._ended = False  # the caller sent `end`
        self._over = False  # the server side is finished; nothing more will be queued
        self._finished = False  # the caller has seen the last event
        self._detached = False  # the caller left; further events are dropped
        self._cancel_sent = False

    async def start(self) -> Self:
        if self._conn is not None:
            raise VoxflowError(f"context {self.id!r} was already started", code="context_exists")
        conn = await self._client._connection()
        if self.id in conn.contexts:
            raise VoxflowError(f"context {self.id!r} is already open", code="context_exists")
        conn.contexts[self.id] = self
        self._conn = conn
        conn.send(self._start)
        return self

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.detach()

    def push(self, text: str) -> None:
        """Send a text fragment (a token or more); empty fragments are skipped."""
        conn = self._open_connection("push")
        if conn is not None and text:
            self._send_text(conn, text)

    def flush(self) -> None:
        """Speak what was pushed so far without waiting for a clause boundary."""
        if conn := self._open_connection("flush"):
            conn.send(Flush(self.id))

    def end(self) -> None:
        """No more text: the context finishes with `Done` after its last audio."""
        if conn := self._open_connection("end"):
            conn.send(End(self.id))
            self._ended = True

    def cancel(self) -> None:
        """Stop now; the iteration ends with `Cancelled`."""
        if self._conn is not None and not self._over and not self._cancel_sent:
            self._conn.send(Cancel(self.id))
            self._cancel_sent = True

    def detach(self) -> None:
        """Stop listening: cancel the context if it is still going and drop what it still sends."""
        self.cancel()
        self._detached = True
        # Emptying the queue releases a reader waiting for room in it.
        while not self._queue.empty():
            self._queue.get_nowait()

    def _send_text(self, conn: _Connection, text: str) -> None:
        frame = serialize_client(Text(self.id, text))
        if len(frame) > conn.ready.limits.max_message_chars and len(text) > 1:
            # The server's limit counts the whole frame, escapes included; halving until each
            # piece fits is exact and costs nothing for the usual token-sized text.
            half = len(text) // 2
            self._send_text(conn, text[:half])
            self._send_text(conn, text[half:])
        else:
            conn.outgoing.put_nowait(frame)

    def _open_connection(self, action: str) -> _Connection | None:
        if self._conn is None:
            raise VoxflowError(f"{action} before the context was started", code="invalid_request")
        if self._ended:
            raise StreamClosed(f"{action} after end() on context {self.id!r}")
        return None if self._over else self._conn

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        if self._finished:
            raise StopAsyncIteration
        if self._conn is None:
            raise VoxflowError("iterating a context that was not started", code="invalid_request")
        if self._overflow is not None and self._queue.empty():
            event: Event = self._overflow
            self._overflow = None
        else:
            event = await self._queue.get()
        if isinstance(event, _TERMINAL):
            self._finished = True
        return event

    async def audio(self) -> AsyncIterator[bytes]:
        """The PCM of each Audio event; stops at Done or Cancelled, raises VoxflowError on Error."""
        async for event in self:
            if isinstance(event, Audio):
                yield event.pcm
            elif isinstance(event, Error):
                _raise_for(event)

    async def collect(self) -> Speech:
        """Everything up to the end: all PCM, the words and the server's metrics.

        Raises VoxflowError on an Error event; after Cancelled returns what had arrived.
        """
        pcm = bytearray()
        words: list[Word] = []
        metrics: Metrics | None = None
        async for event in self:
            if isinstance(event, Audio):
                pcm += event.pcm
            elif isinstance(event, Word):
                words.append(event)
            elif isinstance(event, Metrics):
                metrics = event
            elif isinstance(event, Error):
                _raise_for(event)
        return Speech(bytes(pcm), self.sample_rate or 0, words, metrics)

    # Called by the reader task.

    async def _deliver(self, message: Started | Word | Metrics | Done | Cancelled | Error | AudioPacket) -> None:
        if isinstance(message, Started):
            self.voice, self.sample_rate = message.voice, message.sample_rate
            return
        if isinstance(message, _TERMINAL):
            assert self._conn is not None
            self._conn.contexts.pop(self.id, None)
            if isinstance(message, Error):
                # An error about one message (text over a limit, say) can leave the server's
                # context open; the caller sees the context end, so release it there too.
                self.cancel()
            self._over = True
        if self._detached:
            return
        if isinstance(message, AudioPacket):
            event: Event = Audio(message.pcm, message.seq, message.pts, self.sample_rate or 0, self.id)
        else:
            event = message
        await self._queue.put(event)

    def _lose(self, reason: str) -> None:
        if self._over:
            return
        self._over = True
        error = Error(self.id, "connection_lost", reason)
        try:
            self._queue.put_nowait(error)
        except asyncio.QueueFull:
            self._overflow = error


class AsyncVoxflowClient:
    """A connection to a voxflow server that any number of contexts share.

    `max_retries` is the number of retries after a failed connect (so up to max_retries + 1
    attempts), each preceded by `backoff_delay(attempt, backoff_initial, backoff_max)` seconds.
    `connect_timeout` bounds each attempt, greeting included. `queue_size` bounds each
    context's event queue (see the module docstring for what a full queue does).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        connect_timeout: float = 10,
        max_retries: int = 5,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        self.url = url
        self.api_key = api_key
        self.connect_timeout = connect_timeout
        self.max_retries = max_retries
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.queue_size = queue_size
        self._conn: _Connection | None = None
        self._lock = asyncio.Lock()
        self._reconnect: asyncio.Task[None] | None = None
        self._closed = False
        self._ids = itertools.count(1)

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def ready(self) -> Ready | None:
        """The server's greeting on the current connection (voices, limits)."""
        return self._conn.ready if self._conn else None

    async def connect(self) -> Self:
        """Connect now (otherwise the first context does); raises ConnectionFailed or Unauthorized."""
        await self._connection()
        return self

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection; contexts still in flight end with `connection_lost`."""
        self._closed = True
        if self._reconnect is not None:
            self._reconnect.cancel()
        conn, self._conn = self._conn, None
        if conn is None:
            return
        # The reader goes first: it may be waiting for room in a queue nobody reads any more.
        if conn.reader is not None:
            conn.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await conn.reader
        await conn.ws.close()

    def context(
        self,
        voice: str | None = None,
        style: str | StyleSpec | None = None,
        sample_rate: int | None = None,
        frame_ms: int = 20,
        speaker: str | int | None = None,
        seed: int | None = None,
        context_id: str | None = None,
    ) -> Context:
        """A new context; start it with `async with` or `await ctx.start()`."""
        start = Start(
            context=context_id or f"ctx-{next(self._ids)}", voice=voice, style=style, speaker=speaker,
            seed=seed, sample_rate=sample_rate, frame_ms=frame_ms,
        )
        return Context(self, start)

    async def speak(
        self,
        text: str | Iterable[str] | AsyncIterable[str],
        voice: str | None = None,
        style: str | StyleSpec | None = None,
        sample_rate: int | None = None,
        frame_ms: int = 20,
        speaker: str | int | None = None,
        seed: int | None = None,
    ) -> Speech:
        """Speak a text, or tokens as they arrive, and return everything collected.

        Tokens can come straight from an LLM; with the OpenAI SDK::

            stream = await openai.chat.completions.create(model=..., messages=..., stream=True)
            tokens = (chunk.choices[0].delta.content or "" async for chunk in stream)
            speech = await client.speak(tokens, style="calm")

        Audio is synthesized while the tokens still arrive. To play it as it comes instead of
        collecting it, use a context directly::

            async with client.context() as ctx:
                async def feed() -> None:
                    async for chunk in stream:
                        ctx.push(chunk.choices[0].delta.content or "")
                    ctx.end()
                feeder = asyncio.create_task(feed())
                async for pcm in ctx.audio():
                    play(pcm)
        """
        async with self.context(voice, style, sample_rate, frame_ms, speaker, seed) as ctx:
            collector = asyncio.create_task(ctx.collect())
            try:
                if isinstance(text, str):
                    ctx.push(text)
                elif isinstance(text, AsyncIterable):
                    async for token in text:
                        if collector.done():
                            break
                        ctx.push(token)
                else:
                    for token in text:
                        ctx.push(token)
                if not collector.done():
                    ctx.end()
                return await collector
            finally:
                collector.cancel()

    async def _connection(self) -> _Connection:
        async with self._lock:
            if self._closed:
                raise VoxflowError("the client is closed", code="closed")
            if self._conn is None:
                self._conn = await self._connect_with_retries()
            return self._conn

    async def _connect_with_retries(self) -> _Connection:
        last: BaseException | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(backoff_delay(attempt - 1, self.backoff_initial, self.backoff_max))
            try:
                return await self._open()
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed, _Refused) as exc:
                last = exc
                _LOGGER.debug("connect to %s failed (attempt %d): %s", self.url, attempt + 1, exc)
        raise ConnectionFailed(f"could not connect to {self.url} in {self.max_retries + 1} attempts: {last}") from last

    async def _open(self) -> _Connection:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        try:
            ws = await ws_connect(self.url, additional_headers=headers, open_timeout=self.connect_timeout)
        except InvalidURI as exc:
            raise VoxflowError(str(exc), code="invalid_request") from None
        except InvalidStatus as exc:
            if exc.response.status_code in (401, 403):
                raise Unauthorized(f"{self.url} refused the API key") from exc
            raise
        try:
            async with asyncio.timeout(self.connect_timeout):
                greeting = parse_server(await ws.recv())
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == _UNAUTHORIZED_CLOSE:
                raise Unauthorized(f"{self.url} refused the API key: {exc.rcvd.reason}") from exc
            raise
        except BaseException:
            await ws.close()
            raise
        if not isinstance(greeting, Ready) or greeting.protocol != PROTOCOL:
            await ws.close()
            raise _refusal(greeting)
        conn = _Connection(ws, greeting)
        conn.reader = asyncio.create_task(self._read(conn), name="voxflow-client-reader")
        conn.writer = asyncio.create_task(conn.write(), name="voxflow-client-writer")
        return conn

    async def _read(self, conn: _Connection) -> None:
        reason = "connection closed"
        try:
            async for data in conn.ws:
                try:
                    message = parse_server(data)
                except ProtocolError as exc:
                    _LOGGER.warning("ignoring a malformed server message: %s", exc)
                    continue
                context_id = getattr(message, "context", None)
                if context_id is None:
                    if isinstance(message, Error):
                        _LOGGER.warning("server error: [%s] %s", message.code, message.message)
                    continue
                if (ctx := conn.contexts.get(context_id)) is not None:
                    await ctx._deliver(message)
            reason = f"the server closed the connection ({conn.ws.close_code} {conn.ws.close_reason or ''})".rstrip()
        except ConnectionClosed as exc:
            reason = f"connection lost: {exc}"
        finally:
            self._lost(conn, reason)

    def _lost(self, conn: _Connection, reason: str) -> None:
        if conn.writer is not None:
            conn.writer.cancel()
        for ctx in conn.contexts.values():
            ctx._lose("the client was closed" if self._closed else reason)
        conn.contexts.clear()
        if self._conn is conn:
            self._conn = None
            if not self._closed:
                self._reconnect = asyncio.create_task(self._reconnect_in_background(), name="voxflow-client-reconnect")

    async def _reconnect_in_background(self) -> None:
        # Jittered from the first try: every client of a draining or crashed server loses its
        # connection at the same moment, and must not come back in the same one.
        await asyncio.sleep(backoff_delay(0, self.backoff_initial, self.backoff_max))
        # Until the server is back or the client is closed: a restarting server may take longer
        # than one round of retries, and a context started meanwhile waits for this connection
        # (it holds the lock) rather than failing. Only a refused key is final.
        while not self._closed:
            try:
                await self._connection()
                return
            except ConnectionFailed as exc:
                _LOGGER.warning("reconnect to %s failed, trying on: %s", self.url, exc)
            except VoxflowError as exc:
                _LOGGER.warning("reconnect to %s given up: %s", self.url, exc)
                return


async def _next_or_end(iterator: AsyncIterator[_T]) -> tuple[bool, _T | None]:
    try:
        return True, await anext(iterator)
    except StopAsyncIteration:
        return False, None


class SyncContext:
    """A Context driven from blocking code; see Context for the semantics."""

    def __init__(self, client: VoxflowClient, context: Context) -> None:
        self._client = client
        self._context = context

    @property
    def id(self) -> str:
        return self._context.id

    @property
    def sample_rate(self) -> int | None:
        return self._context.sample_rate

    def start(self) -> Self:
        self._client._run(self._context.start())
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._client._call(self._context.detach)

    def push(self, text: str) -> None:
        self._client._call(self._context.push, text)

    def flush(self) -> None:
        self._client._call(self._context.flush)

    def end(self) -> None:
        self._client._call(self._context.end)

    def cancel(self) -> None:
        self._client._call(self._context.cancel)

    def __iter__(self) -> Iterator[Event]:
        return self._client._iterate(self._context)

    def audio(self) -> Iterator[bytes]:
        return self._client._iterate(self._context.audio())

    def collect(self) -> Speech:
        return self._client._run(self._context.collect())


class VoxflowClient:
    """The blocking client: an AsyncVoxflowClient on a private event loop in a daemon thread.

    Takes the same arguments as AsyncVoxflowClient. Use it as a context manager or call close().
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._client = AsyncVoxflowClient(*args, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="voxflow-client-loop", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._client.connected

    def connect(self) -> Self:
        self._run(self._client.connect())
        return self

    def __enter__(self) -> Self:
        try:
            return self.connect()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def context(
        self,
        voice: str | None = None,
        style: str | StyleSpec | None = None,
        sample_rate: int | None = None,
        frame_ms: int = 20,
        speaker: str | int | None = None,
        seed: int | None = None,
        context_id: str | None = None,
    ) -> SyncContext:
        return SyncContext(self, self._client.context(voice, style, sample_rate, frame_ms, speaker, seed, context_id))

    def speak(
        self,
        text: str | Iterable[str],
        voice: str | None = None,
        style: str | StyleSpec | None = None,
        sample_rate: int | None = None,
        frame_ms: int = 20,
        speaker: str | int | None = None,
        seed: int | None = None,
    ) -> Speech:
        """Speak a text, or tokens from an iterable (e.g. a blocking OpenAI stream), and collect it.

        The tokens are read on the calling thread, so a blocking source never stalls the
        client's loop::

            stream = openai.chat.completions.create(model=..., messages=..., stream=True)
            speech = client.speak(chunk.choices[0].delta.content or "" for chunk in stream)
        """
        with self.context(voice, style, sample_rate, frame_ms, speaker, seed) as ctx:
            collected = asyncio.run_coroutine_threadsafe(ctx._context.collect(), self._loop)
            try:
                for token in [text] if isinstance(text, str) else text:
                    if collected.done():
                        break
                    ctx.push(token)
                if not collected.done():
                    ctx.end()
                return collected.result()
            finally:
                collected.cancel()

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        async def call() -> _T:
            return fn(*args)

        return self._run(call())

    def _iterate(self, iterator: AsyncIterator[_T]) -> Iterator[_T]:
        while True:
            more, item = self._run(_next_or_end(iterator))
            if not more:
                return
            yield item  # type: ignore[misc]
