"""A WebSocket as every WebSocket carrier uses it: admitted, written whole, bounded in time.

One writer at a time (frames of one message never interleave with another's), every send
that a stalled reader could hold up is bounded by `send_timeout_seconds`, and so is the close.
A socket that cannot carry frames any more raises `Disconnected`, which the carriers treat as
the client being gone.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from ...errors import VoxflowError
from .admission import FORWARDED_FOR, Identity, Ticket
from .auth import presented_key
from .contexts import Disconnected

if TYPE_CHECKING:
    from .admission import Admission

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_UNAUTHORIZED = 4001
_CLOSE_REASON_BYTES = 123  # the most a close frame's reason may hold
_SOCKET_ERRORS = (WebSocketDisconnect, WebSocketDisconnected, OSError, RuntimeError)


def close_code_for(exc: VoxflowError) -> int:
    """The close code a refusal or a fatal error ends a socket with."""
    if exc.code == "draining":
        return CLOSE_GOING_AWAY
    if exc.code == "unauthorized":
        return CLOSE_UNAUTHORIZED
    if exc.code in ("rate_limited", "limit_exceeded"):
        return CLOSE_TRY_AGAIN_LATER
    return CLOSE_POLICY_VIOLATION


class SocketCarrier:
    def __init__(self, ws: WebSocket, send_timeout: float) -> None:
        self.ws = ws
        self.send_timeout = send_timeout
        self._lock = asyncio.Lock()

    @property
    def peer(self) -> str | None:
        return self.ws.client.host if self.ws.client else None

    @property
    def forwarded_for(self) -> list[str]:
        """X-Forwarded-For lines, for `Admission` to believe only from a trusted proxy."""
        return self.ws.headers.getlist(FORWARDED_FOR)

    def presented_key(self, query_name: str) -> str | None:
        """A key from the headers or, for clients that cannot set headers, the query string."""
        return presented_key(self.ws.headers) or self.ws.query_params.get(query_name)

    def admit(self, admission: Admission, key: str | None) -> tuple[Identity, Ticket]:
        """Check the key, then take a place in the socket pool (raises a typed refusal)."""
        identity = admission.identify(key, self.peer, self.forwarded_for)
        return identity, admission.admit(identity, "socket")

    async def receive(self) -> str | bytes | None:
        """The next message, or None once the client has gone. Size is bounded by the server's
        `ws_max_size` (the socket is closed with 1009 past it)."""
        try:
            frame = await self.ws.receive()
        except _SOCKET_ERRORS:
            return None
        if frame["type"] == "websocket.disconnect":
            return None
        text = frame.get("text")
        return text if text is not None else frame.get("bytes") or b""

    async def send(self, *frames: str | bytes) -> None:
        """Frames go out whole and together; unbounded (callers that must not wait use send_within)."""
        async with self._lock:
            try:
                for frame in frames:
                    if isinstance(frame, bytes):
                        await self.ws.send_bytes(frame)
                    else:
                        await self.ws.send_text(frame)
            except _SOCKET_ERRORS as exc:
                raise Disconnected("the connection is closed") from exc

    async def send_within(self, *frames: str | bytes) -> None:
        """As `send`, but a client that reads nothing for send_timeout is treated as gone."""
        try:
            async with asyncio.timeout(self.send_timeout):
                await self.send(*frames)
        except TimeoutError:
            raise Disconnected("the client stopped reading") from None

    async def close(self, code: int, reason: str = "") -> None:
        # Bounded: a client that reads nothing holds up even the close frame, and a drain must
        # end; past the bound, the server's own shutdown drops the transport.
        reason = reason.encode()[:_CLOSE_REASON_BYTES].decode(errors="ignore")
        with contextlib.suppress(TimeoutError, *_SOCKET_ERRORS):
            async with asyncio.timeout(self.send_timeout), self._lock:
                await self.ws.close(code, reason)

    async def refuse(self, message: str | bytes, exc: VoxflowError) -> None:
        """One error message, then the close that fits the error (both bounded)."""
        with contextlib.suppress(Disconnected):
            await self.send_within(message)
        await self.close(close_code_for(exc), str(exc))
