"""A stand-in for an OpenAI-compatible transcription server (what whisper servers expose).

It speaks the real wire format, `POST /v1/audio/transcriptions` with a multipart/form-data
body (`file`, `model`) answered by `{"text": ...}`, and really transcribes the uploaded WAV
(with pocketsphinx), so a client sees what a whisper server would give it. It records each
request, and can be told to answer with an HTTP error (OpenAI's error body) or to stall.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import io
import wave
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from server_harness import free_port, serving_in_thread
from speech import transcribe


@dataclass(frozen=True)
class TranscriptionRequest:
    model: str
    authorization: str | None
    rate: int
    channels: int
    sample_width: int  # bytes per sample
    duration: float  # seconds


class TranscriptionDouble:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url  # http://127.0.0.1:PORT/v1, what clients take as base_url
        self.requests: list[TranscriptionRequest] = []
        self._error: tuple[int, str] | None = None
        self._stalling = False
        self._release: asyncio.Event | None = None  # created on the server's loop

    def answer_error(self, status: int, message: str) -> None:
        """Answer every later request with this HTTP status and OpenAI's error body."""
        self._error = (status, message)

    def stall(self) -> None:
        """Accept later requests but never answer them (until the double shuts down)."""
        self._stalling = True

    async def _transcriptions(self, request: Request) -> JSONResponse:
        fields = _form_fields(request.headers.get("content-type", ""), await request.body())
        if "file" not in fields or "model" not in fields:
            return _error_response(400, "file and model are required")
        with wave.open(io.BytesIO(fields["file"])) as wav:
            rate, channels, width = wav.getframerate(), wav.getnchannels(), wav.getsampwidth()
            frames = wav.readframes(wav.getnframes())
        duration = len(frames) / (rate * channels * width)
        authorization = request.headers.get("authorization")
        self.requests.append(TranscriptionRequest(fields["model"].decode(), authorization, rate, channels, width, duration))
        if self._stalling:
            assert self._release is not None
            await self._release.wait()
        if self._error is not None:
            return _error_response(*self._error)
        audio = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
        return JSONResponse({"text": transcribe(audio, rate)})

    async def _serve(self, server: uvicorn.Server) -> None:
        self._release = asyncio.Event()
        await server.serve()


def _form_fields(content_type: str, body: bytes) -> dict[str, bytes]:
    """multipart/form-data fields by name, parsed as the MIME message it is."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        return {}
    return {
        part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
        for part in message.iter_parts()
    }


def _error_response(status: int, message: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error", "param": None, "code": None}}
    return JSONResponse(body, status_code=status)


@contextlib.contextmanager
def transcription_double() -> Iterator[TranscriptionDouble]:
    port = free_port()
    double = TranscriptionDouble(f"http://127.0.0.1:{port}/v1")
    app = Starlette(routes=[Route("/v1/audio/transcriptions", double._transcriptions, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, loop="none", lifespan="off", log_level="warning"))
    loop = asyncio.new_event_loop()
    with serving_in_thread(server, loop, double._serve(server), f"transcription-double-{port}"):
        try:
            yield double
        finally:
            # Stalled handlers are let go first, or the server would wait for them to finish.
            assert double._release is not None
            loop.call_soon_threadsafe(double._release.set)
