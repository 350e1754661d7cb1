"""What a web page the user visits must not make the browser do to a voxflow server.

Browsers let any page open a WebSocket to `ws://127.0.0.1:8765` and send "simple" POSTs
(`text/plain`) without a CORS preflight, so CORS alone protects nothing that changes state.
Two checks, in front of every HTTP and WebSocket route:

- **Origin.** A WebSocket handshake or a state-changing request (anything but GET, HEAD and
  OPTIONS) that carries an `Origin` is refused (403, `forbidden_origin`) unless the origin is
  the server itself (its own demo page) or listed in `cors_origins`. Clients that are not
  browsers send no Origin and are not affected.
- **Host.** A server without API keys (which only loopback binds allow) answers only requests
  addressed to a loopback name or one of `allowed_hosts`, so DNS rebinding (a hostile name
  that resolves to 127.0.0.1) cannot reach it.

Starlette's TrustedHostMiddleware answers in plain text and knows nothing of origins, hence
this small middleware with the project's JSON error shape.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from ...config import ServerConfig

_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def _hostname(host: str) -> str:
    """"example.com:8765" -> "example.com", "[::1]:8765" -> "::1"."""
    return (urlsplit(f"//{host}").hostname or "").lower()


class BrowserGuard:
    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app = app
        self.origins = {o.rstrip("/").lower() for o in config.cors_origins}
        # Keys make rebinding harmless (the page has none); without them, only these names.
        self.hosts = None if config.api_keys else _LOOPBACK_NAMES | {h.lower() for h in config.allowed_hosts}

    def problem(self, scope: Scope) -> tuple[str, str] | None:
        """(code, message) when the request must be refused."""
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if self.hosts is not None and _hostname(host) not in self.hosts:
            return "forbidden_host", f"this server answers only to {', '.join(sorted(self.hosts))} (allowed_hosts)"
        origin = headers.get("origin")
        if origin is None or (scope["type"] == "http" and scope.get("method") in _SAFE_METHODS):
            return None
        origin = origin.rstrip("/").lower()
        if origin in self.origins or urlsplit(origin).netloc == host.lower():
            return None
        return "forbidden_origin", f"requests from the web page at {origin[:100]} are not allowed (cors_origins)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or (found := self.problem(scope)) is None:
            await self.app(scope, receive, send)
            return
        code, message = found
        if scope["type"] == "websocket":
            # Closing before accepting makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": 1008, "reason": code})
            return
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        await send({"type": "http.response.start", "status": 403, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
