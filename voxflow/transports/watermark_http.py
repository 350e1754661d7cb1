"""`POST /v1/watermark/detect`: does an audio file carry the watermark of voxflow's matched voices?

The body is the file itself (Content-Type audio/*, or application/octet-stream) or a multipart
upload with the file in the part `file`. Any format FFmpeg reads (wav, mp3, ogg, flac, ...) is
decoded with PyAV. The body is bounded (MAX_UPLOAD_MB, refused before it is read when the
Content-Length says so) and must arrive within UPLOAD_SECONDS; the decoded audio is bounded too
(MAX_AUDIO_SECONDS: compressed files are small for their length). Like the other endpoints that
do work, it needs an API key where keys are configured and counts against the client's request
rate. Decoding and detection run on a compute thread (`Engine.run`), never on the event loop,
and at most `max_watermark_checks` (1) at a time: past it, 503 `limit_exceeded`.

    {"found": true, "score": 0.998, "threshold": 0.25, "watermark": "perth-implicit-Y-GfemTlfVYp3fNWkt2zgQ"}

Errors have the shared shape, {"error": {"code", "message"}}: `invalid_request` (400) for a
body that is not audio, `limit_exceeded` (413) for one too large or too long.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from ..audio_file import read_audio
from ..errors import InvalidRequest, LimitExceeded, VoxflowError
from ..voices import watermark
from .core.http import error_response, identify_request, read_body

if TYPE_CHECKING:
    from .app import ServerState

MAX_UPLOAD_MB = 25
MAX_AUDIO_SECONDS = 120.0  # ~2 s of one compute thread (ServerConfig.max_watermark_checks)
UPLOAD_SECONDS = 60.0  # the whole body, however it is sent


def _detect(data: bytes) -> dict:
    """Runs on a compute thread: decode, then score."""
    audio, rate = read_audio(io.BytesIO(data), max_seconds=MAX_AUDIO_SECONDS)
    if not len(audio):
        raise InvalidRequest("the file holds no audio samples")
    result = watermark.detect(audio, rate)
    return {"found": result.found, "score": round(result.score, 4), "threshold": result.threshold,
            "watermark": watermark.WATERMARK_ID}


async def _just(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _file_part(request: Request, body: bytes) -> bytes:
    parser = MultiPartParser(request.headers, _just(body), max_files=1, max_fields=4)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"malformed upload: {exc.message}") from None
    try:
        part = form.get("file")
        if not isinstance(part, UploadFile):
            raise InvalidRequest('a multipart upload needs the audio in the file part "file"')
        return await part.read()
    finally:
        await form.close()


def install(app: FastAPI, state: ServerState) -> None:
    @app.post(
        "/v1/watermark/detect",
        summary="Whether an audio file carries voxflow's watermark (body: the file, or multipart part `file`)",
    )
    async def detect_watermark(request: Request) -> JSONResponse:
        limit = int(MAX_UPLOAD_MB * 2**20)
        try:
            identity = identify_request(state.admission, request)
            state.admission.check_new_work(identity)
            content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            multipart = content_type == "multipart/form-data"
            if not (multipart or content_type.startswith("audio/") or content_type == "application/octet-stream"):
                raise InvalidRequest('send the audio file as the body (Content-Type audio/*) or as multipart part "file"')
            declared = request.headers.get("content-length", "")
            if declared.isdecimal() and int(declared) > limit:
                # Refused before a byte of it is read.
                raise LimitExceeded(f"the upload of {int(declared)} bytes exceeds {MAX_UPLOAD_MB:g} MB")
            body = await read_body(request, limit, UPLOAD_SECONDS)
            data = await _file_part(request, body) if multipart else body
            if not data:
                raise InvalidRequest("the upload is empty")
            with state.admission.admit(identity, "watermark_check", rate=False):
                return JSONResponse(await state.engine.run(_detect, data))
        except VoxflowError as exc:
            state.metrics.errors.labels(exc.code).inc()
            return error_response(exc)
