"""`GET /v1/voices`, `POST /v1/voices`, `DELETE /v1/voices/{name}`: the voice registry over HTTP.

Listing is open like the other GET endpoints; adding and removing need an API key where keys
are configured, and count against the client's request rate. Files are read, written and
trial-loaded on a compute thread (`Engine.run`), never on the event loop. Errors have the
OpenAI endpoint's shape.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from ..errors import InvalidRequest, LimitExceeded, VoxflowError
from ..voices.voice import VoiceInfo
from .core.http import identify_request, read_body
from .protocols.openai_protocol import error_payload
from .protocols.voices_protocol import UPLOAD_PARTS, listing, parse_add_body, removed, upload_name, voice_json

if TYPE_CHECKING:
    from .app import ServerState

MAX_JSON_BYTES = 16 * 1024  # {"path": ...}
MAX_NAME_BYTES = 1024  # the upload's `name` part


def _error(state: ServerState, exc: VoxflowError) -> JSONResponse:
    state.metrics.errors.labels(exc.code).inc()
    status, body = error_payload(exc)
    return JSONResponse(body, status_code=status)


def _authorize(state: ServerState, request: Request) -> None:
    """The key where keys are configured (401), not while draining (503), within the rate (429)."""
    state.admission.check_new_work(identify_request(state.admission, request))


async def _bounded(request: Request, max_bytes: int, idle_timeout: float) -> AsyncIterator[bytes]:
    """The body as it arrives, refused (limit_exceeded) once past `max_bytes`, and refused
    (request_timeout) when nothing arrives for `idle_timeout` seconds: an upload of a voice may
    take a while as a whole, but a client that stops sending must not hold its place."""
    received = 0
    chunks = request.stream()
    while True:
        try:
            async with asyncio.timeout(idle_timeout):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise VoxflowError(f"the upload stalled for {idle_timeout:g} s", code="request_timeout") from None
        received += len(chunk)
        if received > max_bytes:
            raise LimitExceeded(f"the upload exceeds {max_bytes // 2**20} MB (max_voice_upload_mb)")
        yield chunk


async def _upload(state: ServerState, request: Request) -> VoiceInfo:
    limit = state.settings.server.max_voice_upload_mb * 2**20
    declared = request.headers.get("content-length", "")
    if declared.isdecimal() and int(declared) > limit:
        # Refused before a byte of it is read.
        raise LimitExceeded(f"the upload of {int(declared)} bytes exceeds {limit // 2**20} MB (max_voice_upload_mb)")
    body = _bounded(request, limit, state.settings.server.send_timeout_seconds)
    parser = MultiPartParser(request.headers, body, max_files=len(UPLOAD_PARTS), max_fields=1, max_part_size=MAX_NAME_BYTES)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"malformed upload: {exc.message}") from None
    try:
        model, config, name = form.get("model"), form.get("config"), form.get("name")
        if not isinstance(model, UploadFile) or not isinstance(config, UploadFile):
            raise InvalidRequest('an upload needs the file parts "model" (NAME.onnx) and "config" (NAME.onnx.json)')
        if name is not None and not isinstance(name, str):
            raise InvalidRequest('"name" must be a text part')
        return await state.engine.run(state.engine.voices.install, upload_name(name, model.filename), model.file, config.file)
    finally:
        await form.close()


def install(app: FastAPI, state: ServerState) -> None:
    voices = state.engine.voices

    @app.get("/v1/voices", summary="Voices this server can speak with")
    async def list_voices() -> dict:
        return listing(voices.statuses(), state.settings.engine.voice)

    @app.post(
        "/v1/voices",
        summary="Add a voice: a path in a voice directory (JSON), or an upload (multipart: model, config, name)",
        status_code=201,
    )
    async def add_voice(request: Request) -> JSONResponse:
        try:
            _authorize(state, request)
            content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if content_type == "application/json":
                body = await read_body(request, MAX_JSON_BYTES, state.settings.server.send_timeout_seconds)
                info = await state.engine.run(voices.add, Path(parse_add_body(body)))
            elif content_type == "multipart/form-data":
                info = await _upload(state, request)
            else:
                raise InvalidRequest('send JSON {"path": ...} or a multipart/form-data upload (parts model, config, name)')
            return JSONResponse(voice_json(voices.status(info.name)), status_code=201)
        except VoxflowError as exc:
            return _error(state, exc)

    @app.delete("/v1/voices/{name}", summary="Remove a voice and delete its files")
    async def remove_voice(request: Request, name: str) -> JSONResponse:
        try:
            _authorize(state, request)
            await state.engine.run(state.engine.remove_voice, name)
        except VoxflowError as exc:
            return _error(state, exc)
        return JSONResponse(removed(name))
