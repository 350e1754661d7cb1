"""`POST /v1/audio/speech`, OpenAI-compatible, streamed from the engine as it synthesizes."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, AsyncGenerator

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from ..errors import VoxflowError
from ..streaming.events import AudioFrame, StreamEnd
from ..streaming.stream import StreamOptions, SynthesisStream
from .core.admission import Ticket
from .core.auth import presented_key
from .core.http import read_body
from .protocols.openai_protocol import (
    SAMPLE_RATE,
    SpeechBody,
    SpeechRequest,
    audio_delta,
    audio_done,
    error_payload,
    parse_body,
    speech_request,
)

if TYPE_CHECKING:
    from .app import ServerState

# Ample for 4096 characters escaped as JSON plus instructions; stops a huge body being buffered.
MAX_BODY_BYTES = 256 * 1024


class SynthesisFailed(RuntimeError):
    """Synthesis broke after the response began: the body is cut off, so it cannot pass as complete."""


def _error(state: ServerState, exc: VoxflowError) -> JSONResponse:
    state.metrics.errors.labels(exc.code).inc()
    status, body = error_payload(exc)
    return JSONResponse(body, status_code=status)


def _admit(state: ServerState, request: Request) -> Ticket:
    identity = state.admission.identify(presented_key(request.headers), request.client.host if request.client else None)
    return state.admission.admit(identity, "http_stream")


class _SpeechResponse(StreamingResponse):
    """Streams one synthesis and, however the response ends, closes it and records its metrics.

    The cleanup sits around the whole response rather than in the body generator because a
    generator that was never started, or was abandoned when the client went away, runs no
    `finally` until garbage collection.
    """

    def __init__(self, state: ServerState, stream: SynthesisStream, request: SpeechRequest, ticket: Ticket) -> None:
        self._state = state
        self._stream = stream
        self._ticket = ticket
        self._request = request
        self._reason = "cancelled"
        self._first_sent: float | None = None
        self._chunks = self._body()
        media_type = "text/event-stream" if request.sse else request.audio_format.media_type
        # no-cache and no proxy buffering: audio must reach the client as it is made.
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(self._chunks, media_type=media_type, headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = self._state.metrics
        metrics.active_streams.inc()
        timeout = self._state.settings.server.send_timeout_seconds

        async def send_within(message: Message) -> None:
            # A client that stops reading fills the socket's buffers and holds this send; past
            # send_timeout it is dropped, like a stalled context on a WebSocket.
            with anyio.fail_after(timeout):
                await send(message)

        try:
            await super().__call__(scope, receive, send_within)
        except ClientDisconnect:
            pass  # a client hanging up is how OpenAI clients cancel; the stream is closed below
        except TimeoutError:
            self._reason = "error"
            metrics.errors.labels("slow_consumer").inc()
        finally:
            with anyio.CancelScope(shield=True):
                await self._chunks.aclose()
                await self._stream.aclose()
            self._ticket.release()
            metrics.active_streams.dec()
            metrics.stream_ended(self._stream.metrics, self._reason, self._first_sent)

    async def _body(self) -> AsyncGenerator[bytes, None]:
        encoder = self._request.audio_format.encoder(SAMPLE_RATE)
        wrap = audio_delta if self._request.sse else bytes
        async for event in self._stream:
            if isinstance(event, AudioFrame):
                if data := encoder.encode(event.pcm):
                    yield wrap(data)
                    self._first_sent = self._first_sent or time.perf_counter()
                self._state.metrics.frames_sent.inc()
            elif isinstance(event, StreamEnd) and event.reason == "error":
                self._reason = "error"
                self._state.metrics.errors.labels(event.code).inc()
                raise SynthesisFailed(f"{event.code}: {event.message}")
        if tail := encoder.finish():
            yield wrap(tail)
        if self._request.sse:
            yield audio_done()
        self._reason = "done"


def install(app: FastAPI, state: ServerState) -> None:
    @app.post(
        "/v1/audio/speech",
        summary="OpenAI-compatible speech, streamed as it is synthesized",
        response_class=StreamingResponse,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": SpeechBody.model_json_schema()}}}},
    )
    async def speech(request: Request) -> Response:
        try:
            ticket = _admit(state, request)
        except VoxflowError as exc:
            return _error(state, exc)
        stream: SynthesisStream | None = None
        try:
            body = await read_body(request, MAX_BODY_BYTES, state.settings.server.send_timeout_seconds)
            spoken = speech_request(
                parse_body(body),
                [info.name for info in state.engine.voices.infos()],
                state.voice_for,
            )
            options = StreamOptions(sample_rate=SAMPLE_RATE, max_text_chars=state.engine.config.max_text_chars)
            stream = state.engine.open_stream(voice=spoken.voice, style=spoken.style, options=options)
            await stream.push(spoken.text)
            await stream.end()
        except BaseException as exc:  # the place, and the stream if one opened, are given back
            if stream is not None:
                await stream.aclose()
            ticket.release()
            if isinstance(exc, VoxflowError):
                return _error(state, exc)
            raise
        return _SpeechResponse(state, stream, spoken, ticket)
