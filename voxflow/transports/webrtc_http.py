"""WebRTC signaling over HTTP: `POST /v1/webrtc/offer` -> answer, `DELETE /v1/webrtc/sessions/{id}`.

One offer, one answer with every candidate in it (no trickle ICE), one session. The session's
data channel then speaks the native protocol (docs/protocol.md) and its audio track carries
the speech; see webrtc/session.py for what differs from the WebSocket.
"""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Gauge

from ..errors import VoxflowError
from .auth import check_key, presented_key
from .http_errors import error_body
from .webrtc.signaling import InvalidSdp, check_offer, enable_loopback_candidates
from .webrtc.session import WebRTCSession

if TYPE_CHECKING:
    from .app import ServerState


class UnknownSession(VoxflowError):
    code = "unknown_session"


class SessionLimit(VoxflowError):
    code = "limit_exceeded"


# Statuses the app's table does not give: a full server is a 503 (try later), not a 413.
_STATUS = {UnknownSession: 404, SessionLimit: 503}


class SessionRegistry:
    """The app's WebRTC sessions by id, at most max_sessions of them."""

    def __init__(self, max_sessions: int, gauge: Gauge) -> None:
        self.max_sessions = max_sessions
        self._gauge = gauge
        self._sessions: dict[str, WebRTCSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> WebRTCSession:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise UnknownSession(f"no WebRTC session {session_id!r}") from None

    def create(self, state: ServerState, identity: str) -> WebRTCSession:
        # No await between the count and the add, so concurrent offers cannot overshoot.
        if len(self._sessions) >= self.max_sessions:
            raise SessionLimit(f"at most {self.max_sessions} WebRTC sessions; try again later")
        session = WebRTCSession(secrets.token_urlsafe(16), state, identity, self._remove)
        self._sessions[session.id] = session
        self._gauge.set(len(self._sessions))
        return session

    def _remove(self, session: WebRTCSession) -> None:
        self._sessions.pop(session.id, None)
        self._gauge.set(len(self._sessions))

    async def close_all(self) -> None:
        for session in list(self._sessions.values()):
            await session.close()


def install(app: FastAPI, state: ServerState) -> None:
    config = state.settings.server
    if config.webrtc_loopback:
        enable_loopback_candidates()
    gauge = Gauge("voxflow_webrtc_sessions", "Open WebRTC sessions", registry=state.metrics.registry)
    registry = SessionRegistry(config.max_webrtc_sessions, gauge)
    app.state.webrtc_sessions = registry

    # Sessions hold peer connections and tasks of their own: they end before the app's own
    # shutdown closes the engine under them.
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[object]:
        async with inner(app) as value:
            try:
                yield value
            finally:
                await registry.close_all()

    app.router.lifespan_context = lifespan

    def refuse(exc: VoxflowError) -> JSONResponse:
        state.metrics.errors.labels(exc.code).inc()
        return JSONResponse(error_body(exc.code, str(exc)), status_code=_STATUS[type(exc)])

    def identity_of(request: Request) -> str:
        key = presented_key(request.headers)
        check_key(config.api_keys, key)
        # As on the WebSocket: without keys, a client-chosen key must not escape the address's rate limit.
        return key if config.api_keys else (request.client.host if request.client else "unknown")

    @app.post("/v1/webrtc/offer", summary="Start a WebRTC session: an SDP offer in, the answer out")
    async def offer(request: Request) -> Response:
        identity = identity_of(request)
        state.limiter.check(identity)
        if state.draining:
            raise VoxflowError("the server is shutting down", code="draining")
        try:
            body = await request.json()
        except ValueError:
            raise InvalidSdp('expected a JSON body {"sdp": "<offer SDP>", "type": "offer"}') from None
        sdp = check_offer(body)
        try:
            session = registry.create(state, identity)
        except SessionLimit as exc:
            return refuse(exc)
        try:
            answer = await session.answer(sdp)
        except BaseException:
            await session.close()
            raise
        return JSONResponse({"sdp": answer, "type": "answer", "session_id": session.id})

    @app.delete("/v1/webrtc/sessions/{session_id}", status_code=204, summary="End a WebRTC session")
    async def delete(session_id: str, request: Request) -> Response:
        identity_of(request)
        try:
            session = registry.get(session_id)
        except UnknownSession as exc:
            return refuse(exc)
        await session.close()
        return Response(status_code=204)
