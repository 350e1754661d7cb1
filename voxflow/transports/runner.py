"""Run the app under uvicorn (uvloop, the websockets protocol) with a graceful SIGTERM, and
with TLS when ServerConfig names a certificate.

uvicorn on its own closes WebSockets at once on SIGTERM (1012). voxflow first stops taking
new work, gives in-flight streams `grace_seconds` to finish, cancels the rest, and only then
lets uvicorn close the sockets and exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from types import FrameType
from typing import NoReturn

import uvicorn
import uvloop

from ..config import ServerConfig, Settings
from ..errors import InvalidRequest
from .app import ServerState, create_app

_LOGGER = logging.getLogger(__name__)


class _GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._drain: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is not None or sig != signal.SIGTERM:
            super().handle_exit(sig, frame)  # a second signal, or Ctrl-C: uvicorn's own quick exit
            return
        loop = asyncio.get_running_loop()
        self._drain = loop.create_task(self._drain_then_exit(sig, frame))

    async def _drain_then_exit(self, sig: int, frame: FrameType | None) -> None:
        _LOGGER.info("SIGTERM: draining for up to %.1f s", self.state.settings.server.grace_seconds)
        await self.state.drain()
        super().handle_exit(sig, frame)


class _ClientMistakesInBrief(logging.Filter):
    """uvicorn logs a client's invalid UTF-8 text frame (answered with close 1007) as an error
    with a traceback, so any client could fill the log with them: one warning line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Invalid UTF-8 sequence received from client"):
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _encrypted_key() -> NoReturn:
    raise InvalidRequest("the TLS key file is encrypted; give an unencrypted key (ssl_keyfile)")


def check_tls(server: ServerConfig) -> None:
    """Refuses a TLS setting uvicorn could not use, before anything starts: uvicorn would report
    an unusable file as a traceback, and prompt on the terminal for an encrypted key's password."""
    if not server.ssl_certfile and not server.ssl_keyfile:
        return
    if not server.ssl_certfile or not server.ssl_keyfile:
        raise InvalidRequest("TLS needs both a certificate and its key (ssl_certfile and ssl_keyfile / --ssl-certfile and --ssl-keyfile)")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            server.ssl_certfile, server.ssl_keyfile, password=_encrypted_key
        )
    except (OSError, ssl.SSLError) as exc:
        raise InvalidRequest(
            f"TLS certificate {server.ssl_certfile} with key {server.ssl_keyfile} cannot be used: {exc}"
        ) from exc


def serve(settings: Settings) -> None:
    check_tls(settings.server)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        loop="none",  # uvloop.run below provides the loop
        ws="websockets-sansio",
        lifespan="on",
        log_level="info",
        timeout_graceful_shutdown=max(1, int(settings.server.grace_seconds)),
        # Bounds before any voxflow code runs: frame size, and connections of every kind (past
        # it uvicorn answers 503), so a flood of idle connections cannot take every descriptor.
        ws_max_size=settings.server.max_message_bytes,
        # PCM barely compresses (about a fifth) and deflating every frame costs CPU per stream.
        ws_per_message_deflate=False,
        limit_concurrency=settings.server.max_connections,
        # uvicorn would believe X-Forwarded-For from any loopback peer; Admission believes it
        # from `trusted_proxies` only (none by default).
        proxy_headers=False,
        ssl_certfile=settings.server.ssl_certfile or None,
        ssl_keyfile=settings.server.ssl_keyfile or None,
    )
    server = _GracefulServer(config, app.state.voxflow)
    logging.getLogger("uvicorn.error").addFilter(_ClientMistakesInBrief())
    uvloop.run(server.serve())
