"""ElevenLabs-compatible HTTP text-to-speech: `POST /v1/text-to-speech/{voice_id}`, `.../stream`,
`.../with-timestamps` and `.../stream/with-timestamps`, streamed from the engine as it synthesizes.

The request, the four bodies and the error shape live in elevenlabs_http_protocol; admission,
the send timeout and the cleanup of a streamed response are the ones every HTTP carrier shares
(core/http). What voxflow decides where ElevenLabs leaves room is in docs/compatibility.md.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import VoxflowError
from ..streaming.events import WordTimestamp
from ..streaming.stream import SynthesisStream
from .core.admission import Ticket
from .core.http import SynthesisResponse, admit_http_stream, read_body, start_synthesis
from .protocols.elevenlabs_http_protocol import (
    AudioWriter,
    BodyWriter,
    SpeechBody,
    TimestampedDocument,
    TimestampedLines,
    error_payload,
    max_body_bytes,
    speech_request,
)
from .protocols.elevenlabs_protocol import OutputFormat, WrittenWords

if TYPE_CHECKING:
    from .app import ServerState  # app imports this module to install it

# The four endpoints: path after /v1/text-to-speech/{voice_id}, how the body is written, summary.
_ENDPOINTS: tuple[tuple[str, Callable[[OutputFormat], BodyWriter], str], ...] = (
    ("", AudioWriter, "ElevenLabs-compatible speech: the audio, sent as it is synthesized"),
    ("/stream", AudioWriter, "ElevenLabs-compatible speech, streamed as it is synthesized"),
    ("/with-timestamps", TimestampedDocument, "ElevenLabs-compatible speech with character timestamps, as one JSON object"),
    ("/stream/with-timestamps", TimestampedLines, "ElevenLabs-compatible speech with character timestamps, one JSON object a line"),
)


def _error(state: ServerState, exc: VoxflowError) -> JSONResponse:
    state.metrics.errors.labels(exc.code).inc()
    status, body = error_payload(exc)
    return JSONResponse(body, status_code=status)


class _SpeechResponse(SynthesisResponse):
    def __init__(self, state: ServerState, stream: SynthesisStream, ticket: Ticket, writer: BodyWriter, text: str) -> None:
        self._writer = writer
        self._written = WrittenWords()  # the request's own text, for `alignment`
        self._written.feed(text)
        super().__init__(stream, ticket, state.metrics, state.settings.server.send_timeout_seconds, writer.media_type)

    async def write_body(self) -> AsyncIterator[bytes]:
        async for event in self.events():
            if isinstance(event, WordTimestamp):
                self._writer.add_word(event.word, event.start, event.end, self._written.match(event.word))
            elif data := self._writer.add_audio(event.pcm):
                yield data
        if tail := self._writer.finish():
            yield tail


def _endpoint(state: ServerState, writer: Callable[[OutputFormat], BodyWriter]) -> Callable[..., Awaitable[Response]]:
    async def speak(request: Request, voice_id: str) -> Response:
        try:
            ticket = admit_http_stream(state.admission, request)
        except VoxflowError as exc:
            return _error(state, exc)
        max_chars = state.engine.config.max_text_chars
        try:
            raw = await read_body(request, max_body_bytes(max_chars), state.settings.server.send_timeout_seconds)
            spoken = speech_request(
                raw, request.query_params, voice_id,
                own_voices=[info.name for info in state.engine.voices.infos()],
                voice_for=state.voice_for,
                max_text_chars=max_chars,
            )
            stream = await start_synthesis(
                state.engine, spoken.text, voice=spoken.voice, style=spoken.style, seed=spoken.seed,
                sample_rate=spoken.output_format.sample_rate,
            )
        except BaseException as exc:  # the place is given back (start_synthesis closes its stream)
            ticket.release()
            if isinstance(exc, VoxflowError):
                return _error(state, exc)
            raise
        return _SpeechResponse(state, stream, ticket, writer(spoken.output_format), spoken.text)

    return speak


def install(app: FastAPI, state: ServerState) -> None:
    body_schema = {"requestBody": {"required": True, "content": {"application/json": {"schema": SpeechBody.model_json_schema()}}}}
    for path, writer, summary in _ENDPOINTS:
        app.add_api_route(
            f"/v1/text-to-speech/{{voice_id}}{path}",
            _endpoint(state, writer),
            methods=["POST"],
            summary=summary,
            response_class=StreamingResponse,
            openapi_extra=body_schema,
        )
