"""One JSON error shape for every HTTP endpoint: {"error": {"code", "message"}} with a fitting status."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import VoxflowError

STATUS_BY_CODE = {
    "invalid_request": 400,
    "unauthorized": 401,
    "unknown_voice": 404,
    "limit_exceeded": 413,
    "rate_limited": 429,
    "draining": 503,
}


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_response(exc: VoxflowError) -> JSONResponse:
    return JSONResponse(error_body(exc.code, str(exc)), status_code=STATUS_BY_CODE.get(exc.code, 400))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse(error_body("invalid_request", details), status_code=400)

    @app.exception_handler(HTTPException)
    async def http(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(f"http_{exc.status_code}", str(exc.detail)), status_code=exc.status_code)
