"""`POST /v1/audio/speech`, OpenAI-compatible, streamed from the engine as it synthesizes."""

from __future__ import annotations

from typing import TYPE_CHECKING, AsyncGenerator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import VoxflowError
from ..streaming.events import AudioFrame
from ..streaming.stream import SynthesisStream
from .core.admission import Ticket
from .core.http import SynthesisResponse, admit_http_stream, read_body, start_synthesis
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


def _error(state: ServerState, exc: VoxflowError) -> JSONResponse:
    state.metrics.errors.labels(exc.code).inc()
    status, body = error_payload(exc)
    return JSONResponse(body, status_code=status)


class _SpeechResponse(SynthesisResponse):
    def __init__(self, state: ServerState, stream: SynthesisStream, request: SpeechRequest, ticket: Ticket) -> None:
        self._request = request
        media_type = "text/event-stream" if request.sse else request.audio_format.media_type
        super().__init__(stream, ticket, state.metrics, state.settings.server.send_timeout_seconds, media_type)

    async def write_body(self) -> AsyncGenerator[bytes, None]:
        encoder = self._request.audio_format.encoder(SAMPLE_RATE)
        wrap = audio_delta if self._request.sse else bytes
        async for event in self.events():
            if isinstance(event, AudioFrame) and (data := encoder.encode(event.pcm)):
                yield wrap(data)
        if tail := encoder.finish():
            yield wrap(tail)
        if self._request.sse:
            yield audio_done()


def install(app: FastAPI, state: ServerState) -> None:
    @app.post(
        "/v1/audio/speech",
        summary="OpenAI-compatible speech, streamed as it is synthesized",
        response_class=StreamingResponse,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": SpeechBody.model_json_schema()}}}},
    )
    async def speech(request: Request) -> Response:
        try:
            ticket = admit_http_stream(state.admission, request)
        except VoxflowError as exc:
            return _error(state, exc)
        try:
            body = await read_body(request, MAX_BODY_BYTES, state.settings.server.send_timeout_seconds)
            spoken = speech_request(
                parse_body(body),
                [info.name for info in state.engine.voices.infos()],
                state.voice_for,
            )
            stream = await start_synthesis(
                state.engine, spoken.text, voice=spoken.voice, style=spoken.style, seed=None, sample_rate=SAMPLE_RATE
            )
        except BaseException as exc:  # the place is given back (start_synthesis closes its stream)
            ticket.release()
            if isinstance(exc, VoxflowError):
                return _error(state, exc)
            raise
        return _SpeechResponse(state, stream, spoken, ticket)
