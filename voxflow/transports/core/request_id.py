"""`x-request-id` on every HTTP response, so a client's bug report and the server's log name the
same request.

A client's own `X-Request-ID` is echoed when it is sane: 1 to 128 visible ASCII characters.
Spaces and anything else are refused because the id is written into log lines, where a space
or a newline would let a client forge fields or whole lines; a refused or missing id is
replaced by a fresh uuid4 hex.

A pure ASGI middleware: Starlette's BaseHTTPMiddleware runs the app in a task of its own and
relays the body through a stream, between a streamed speech response and its client (who may
hang up mid-response, which must cancel the synthesis at once). WebSocket and lifespan scopes
pass through untouched.
"""

from __future__ import annotations

import json
import logging
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
MAX_LENGTH = 128
_LOGGER = logging.getLogger(__name__)


def sane(value: bytes) -> bool:
    return 0 < len(value) <= MAX_LENGTH and all(0x21 <= byte <= 0x7E for byte in value)


def request_id(scope: Scope) -> str:
    """The client's id when it is sane (the first one, if it sent several), else a new one."""
    for name, value in scope["headers"]:
        if name == HEADER:
            return value.decode("ascii") if sane(value) else uuid.uuid4().hex
    return uuid.uuid4().hex


class RequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope)
        header = (HEADER, rid.encode("ascii"))
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if started:
                # The status is sent: only cutting the body off is left, which uvicorn does, and
                # logs the traceback, without the id this line ties to it.
                _LOGGER.error("request %s (%s %r) failed after its response started", rid, scope["method"], scope["path"])
                raise
            # Answered here, not by Starlette's plain-text 500 outside every middleware, so the
            # failure has the project's JSON error shape and the id the log line below carries.
            _LOGGER.exception("request %s (%s %r) failed", rid, scope["method"], scope["path"])
            body = json.dumps({"error": {"code": "internal_error", "message": f"internal error (request {rid})"}}).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), header]})
            await send({"type": "http.response.body", "body": body})
