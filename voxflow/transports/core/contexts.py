"""The synthesis contexts of one connection, shared by every streaming wire protocol.

A protocol adapter parses messages into calls on a ContextSet and serializes what `deliver`
receives. The set owns one pump task per context that hands the stream's events, in order, to
`deliver`; a delivery that cannot finish within `send_timeout` (a reader that stopped reading)
drops that context with a `slow_consumer` error while the others carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from ...errors import InvalidRequest, LimitExceeded, VoxflowError
from ...streaming.engine import Engine
from ...streaming.events import AudioFrame, StreamEnd, StreamEvent
from ...streaming.stream import StreamOptions, SynthesisStream
from ...voices.styles import Style
from .metrics import ServerMetrics

_LOGGER = logging.getLogger(__name__)

Deliver = Callable[[StreamEvent], Awaitable[None]]


class Disconnected(VoxflowError):
    """A carrier can no longer take messages (the client is gone or stopped reading). A
    VoxflowError, so a context's pump ends quietly on it."""

    code = "disconnected"


class UnknownContext(InvalidRequest):
    code = "unknown_context"


@dataclass(frozen=True)
class ContextRequest:
    context_id: str
    voice: str | None = None
    style: Style = field(default_factory=Style)
    speaker: str | int | None = None
    seed: int | None = None
    sample_rate: int | None = None
    frame_ms: int = 20


@dataclass
class _Context:
    stream: SynthesisStream
    pump: asyncio.Task[None]
    first_sent: float | None = None


class ContextSet:
    def __init__(
        self,
        engine: Engine,
        deliver: Deliver,
        *,
        max_contexts: int,
        send_timeout: float,
        metrics: ServerMetrics | None = None,
        after_drain: Callable[[], Awaitable[None]] | None = None,
        on_closed: Callable[[str], None] | None = None,
    ) -> None:
        self.engine = engine
        self._deliver = deliver
        self._after_drain = after_drain  # how the connection closes once a server drain is over
        # Told each context id once its context is gone, however it ended (its end delivered
        # or not), so a carrier can give back what it holds for it.
        self._on_closed = on_closed
        self.max_contexts = max_contexts
        self.send_timeout = send_timeout
        self.metrics = metrics
        self._contexts: dict[str, _Context] = {}

    def __contains__(self, context_id: str) -> bool:
        return context_id in self._contexts

    def __len__(self) -> int:
        return len(self._contexts)

    def open(self, request: ContextRequest) -> SynthesisStream:
        if request.context_id in self._contexts:
            raise InvalidRequest(f"context {request.context_id!r} is already open", code="context_exists")
        if len(self._contexts) >= self.max_contexts:
            raise LimitExceeded(f"at most {self.max_contexts} contexts per connection")
        options = StreamOptions(
            sample_rate=request.sample_rate,
            frame_ms=request.frame_ms,
            max_text_chars=self.engine.config.max_text_chars,
        )
        stream = self.engine.open_stream(
            voice=request.voice, style=request.style, speaker=request.speaker,
            seed=request.seed, context_id=request.context_id, options=options,
        )
        context = _Context(stream, asyncio.get_running_loop().create_task(self._pump(stream), name=f"voxflow-pump-{request.context_id}"))
        self._contexts[request.context_id] = context
        return stream

    def stream(self, context_id: str) -> SynthesisStream:
        try:
            return self._contexts[context_id].stream
        except KeyError:
            raise UnknownContext(f"no open context {context_id!r}") from None

    async def push(self, context_id: str, text: str) -> None:
        await self.stream(context_id).push(text)

    async def flush(self, context_id: str) -> None:
        await self.stream(context_id).flush()

    async def end(self, context_id: str) -> None:
        await self.stream(context_id).end()

    def cancel(self, context_id: str) -> None:
        self.stream(context_id).cancel()

    async def drain(self, timeout: float) -> None:
        """Let contexts finish for up to `timeout` seconds, then cancel the rest.

        Contexts opened while draining (work a transport had already accepted) get the same
        deadline, not a cancel.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._contexts and (left := deadline - loop.time()) > 0:
            await asyncio.wait([c.pump for c in self._contexts.values()], timeout=left)
        await self.close()
        if self._after_drain is not None:
            await self._after_drain()

    async def close(self) -> None:
        """Cancel every context and wait until their tasks are gone (the connection closed)."""
        contexts = list(self._contexts.values())
        for context in contexts:
            context.stream.cancel()
            context.pump.cancel()
        # One pump failing must not keep the others' streams from being closed.
        await asyncio.gather(*(c.pump for c in contexts), return_exceptions=True)
        await asyncio.gather(*(c.stream.aclose() for c in contexts), return_exceptions=True)

    async def _pump(self, stream: SynthesisStream) -> None:
        context = None
        reason, code = "done", ""
        # Counted here, not in open(): a pump cancelled before its first step never runs its
        # finally, and the gauge must come back down exactly as often as it went up.
        if self.metrics:
            self.metrics.active_streams.inc()
        try:
            async for event in stream:
                context = context or self._contexts.get(stream.context_id)
                try:
                    async with asyncio.timeout(self.send_timeout):
                        await self._deliver(event)
                except TimeoutError:
                    stream.cancel()
                    reason, code = "error", "slow_consumer"
                    await self._best_effort(
                        StreamEnd(stream.context_id, "error", code, f"audio could not be sent for {self.send_timeout:g} s; context dropped")
                    )
                    return
                if isinstance(event, AudioFrame):
                    if context is not None and context.first_sent is None:
                        context.first_sent = time.perf_counter()
                    if self.metrics:
                        self.metrics.frames_sent.inc()
                elif isinstance(event, StreamEnd):
                    reason, code = event.reason, event.code
        except VoxflowError as exc:  # deliver refused the event (the connection is closing)
            reason, code = "error", exc.code
        except Exception:  # a carrier's bug must end this context visibly, not silently
            _LOGGER.exception("delivering context %s failed", stream.context_id)
            reason, code = "error", "internal_error"
            await self._best_effort(StreamEnd(stream.context_id, "error", code, "internal error while sending"))
        finally:
            stream.cancel()  # no-op once it is done; else it must not run on unread
            self._contexts.pop(stream.context_id, None)
            if self._on_closed is not None:
                self._on_closed(stream.context_id)
            if self.metrics:
                self.metrics.active_streams.dec()
                self.metrics.stream_ended(stream.metrics, reason, context.first_sent if context else None)
                if code:
                    self.metrics.errors.labels(code).inc()

    async def _best_effort(self, event: StreamEvent) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.send_timeout):
                await self._deliver(event)
