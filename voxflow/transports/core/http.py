"""What every HTTP endpoint shares: one JSON error shape, {"error": {"code", "message"}} with a
fitting status, and request bodies read with a bound on their size."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ...errors import LimitExceeded, VoxflowError

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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse(error_body("invalid_request", details), status_code=400)

    @app.exception_handler(HTTPException)
    async def http(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(f"http_{exc.status_code}", str(exc.detail)), status_code=exc.status_code)
