"""What every HTTP endpoint shares: one JSON error shape, {"error": {"code", "message"}} with a
fitting status, request bodies read with a bound on their size, and synthesis streamed as a
response body under the same admission, send timeout and cleanup whatever the protocol."""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Mapping, Sequence

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from ...errors import LimitExceeded, VoxflowError
from ...streaming.engine import Engine
from ...streaming.events import AudioFrame, StreamEnd, WordTimestamp
from ...streaming.stream import StreamOptions, SynthesisStream
from ...voices.styles import Style
from .admission import FORWARDED_FOR, Admission, Identity, Ticket
from .auth import presented_key
from .metrics import ServerMetrics

STATUS_BY_CODE = {
    "invalid_request": 400,
    "unauthorized": 401,
    "forbidden_origin": 403,
    "unknown_voice": 404,
    "unknown_session": 404,
    "request_timeout": 408,
    "limit_exceeded": 413,
    "rate_limited": 429,
    "draining": 503,
}


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def validation_summary(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """pydantic's validation errors as one message ("field.sub: what is wrong; ...") and the
    first field named (OpenAI's and ElevenLabs' error bodies carry it as `param`)."""
    message = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors)
    first = errors[0]["loc"] if errors else ()
    return message, str(first[0]) if first else None


def error_status(exc: VoxflowError) -> int:
    return getattr(exc, "http_status", None) or STATUS_BY_CODE.get(exc.code, 400)


def error_response(exc: VoxflowError) -> JSONResponse:
    return JSONResponse(error_body(exc.code, str(exc)), status_code=error_status(exc))


async def read_body(request: Request, max_bytes: int, timeout: float) -> bytes:
    """The body, refused (limit_exceeded) as soon as it passes max_bytes, never buffered whole
    first, and refused (request_timeout) when it has not all arrived within `timeout` seconds:
    a client that announces a body and sends it slowly must not hold its place for ever."""
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for part in request.stream():
                body += part
                if len(body) > max_bytes:
                    raise LimitExceeded(f"request body exceeds {max_bytes} bytes")
    except TimeoutError:
        raise VoxflowError(f"the request body did not arrive within {timeout:g} s", code="request_timeout") from None
    return bytes(body)


def identify_request(admission: Admission, request: Request) -> Identity:
    """Who sent the request: its key checked (Authorization: Bearer or xi-api-key), its address
    resolved through a trusted proxy's X-Forwarded-For (raises Unauthorized)."""
    peer = request.client.host if request.client else None
    return admission.identify(presented_key(request.headers), peer, request.headers.getlist(FORWARDED_FOR))


def admit_http_stream(admission: Admission, request: Request) -> Ticket:
    """The request's place among the streamed HTTP responses: identified, then counted (raises a
    typed refusal)."""
    return admission.admit(identify_request(admission, request), "http_stream")


async def start_synthesis(
    engine: Engine, text: str, *, voice: str, style: Style, seed: int | None, sample_rate: int
) -> SynthesisStream:
    """A stream speaking the whole of `text` at `sample_rate`, its input already ended. A stream
    that cannot take the text is closed before the error goes on."""
    options = StreamOptions(sample_rate=sample_rate, max_text_chars=engine.config.max_text_chars)
    stream = engine.open_stream(voice=voice, style=style, seed=seed, options=options)
    try:
        await stream.voice_loaded()  # a voice that cannot load is an error status, not a cut-off body
        await stream.push(text)
        await stream.end()
    except BaseException:
        await stream.aclose()
        raise
    return stream


class SynthesisFailed(RuntimeError):
    """Synthesis broke after the response began: the body is cut off, so it cannot pass as complete."""


class SynthesisResponse(StreamingResponse):
    """Streams one synthesis as a response body and, however the response ends, closes the
    stream, gives the admission place back and records the stream's metrics.

    A subclass writes the body (`write_body`), reading the synthesis through `events`. The
    cleanup sits around the whole response rather than in the body generator because a
    generator that was never started, or was abandoned when the client went away, runs no
    `finally` until garbage collection.
    """

    def __init__(
        self, stream: SynthesisStream, ticket: Ticket, metrics: ServerMetrics, send_timeout: float, media_type: str
    ) -> None:
        self._stream = stream
        self._metrics = metrics
        self._ticket = ticket
        self._send_timeout = send_timeout
        self._reason = "cancelled"
        self._first_sent: float | None = None
        self._chunks = self._sent()
        # no-cache and no proxy buffering: audio must reach the client as it is made.
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(self._chunks, media_type=media_type, headers=headers)

    def write_body(self) -> AsyncIterator[bytes]:
        """The body's pieces, each sent as soon as it is yielded."""
        raise NotImplementedError

    async def events(self) -> AsyncIterator[AudioFrame | WordTimestamp]:
        """The synthesis' frames and words, in order; a synthesis that fails or is stopped before
        its end raises SynthesisFailed."""
        async for event in self._stream:
            if isinstance(event, StreamEnd):
                if event.reason == "done":
                    return
                if event.reason == "error":
                    self._reason = "error"
                    self._metrics.errors.labels(event.code).inc()
                raise SynthesisFailed(f"{event.code}: {event.message}" if event.code else "the synthesis was stopped")
            yield event
            if isinstance(event, AudioFrame):
                self._metrics.frames_sent.inc()

    async def _sent(self) -> AsyncIterator[bytes]:
        async with aclosing(self.write_body()) as pieces:
            async for piece in pieces:
                yield piece
                self._first_sent = self._first_sent or time.perf_counter()
        self._reason = "done"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._metrics.active_streams.inc()

        async def send_within(message: Message) -> None:
            # A client that stops reading fills the socket's buffers and holds this send; past
            # send_timeout it is dropped, like a stalled context on a WebSocket.
            with anyio.fail_after(self._send_timeout):
                await send(message)

        try:
            await super().__call__(scope, receive, send_within)
        except ClientDisconnect:
            pass  # a client hanging up is how HTTP clients cancel; the stream is closed below
        except TimeoutError:
            self._reason = "error"
            self._metrics.errors.labels("slow_consumer").inc()
        finally:
            with anyio.CancelScope(shield=True):
                await self._chunks.aclose()
                await self._stream.aclose()
            self._ticket.release()
            self._metrics.active_streams.dec()
            self._metrics.stream_ended(self._stream.metrics, self._reason, self._first_sent)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("invalid_request", validation_summary(exc.errors())[0]), status_code=400)

    @app.exception_handler(HTTPException)
    async def http(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(f"http_{exc.status_code}", str(exc.detail)), status_code=exc.status_code)
