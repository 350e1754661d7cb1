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
from .core.admission import Identity, Ticket
from .core.http import identify_request, read_body
from .protocols.json_text import InvalidJson, loads_object
from .webrtc.signaling import InvalidSdp, check_offer, enable_loopback_candidates
from .webrtc.session import WebRTCSession

if TYPE_CHECKING:
    from .app import ServerState


class UnknownSession(VoxflowError):
    code = "unknown_session"


# Ample for an offer with every codec and candidate a browser lists.
MAX_OFFER_BYTES = 64 * 1024


class SessionRegistry:
    """The app's WebRTC sessions by id; each holds a place in the admission's webrtc pool."""

    def __init__(self, gauge: Gauge) -> None:
        self._gauge = gauge
        self._sessions: dict[str, WebRTCSession] = {}
        self._tickets: dict[str, Ticket] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str, identity: Identity) -> WebRTCSession:
        """The session, if this client opened it: another client's is as unknown as none."""
        session = self._sessions.get(session_id)
        if session is None or session.identity.name != identity.name:
            raise UnknownSession(f"no WebRTC session {session_id!r}")
        return session

    def create(self, state: ServerState, identity: Identity) -> WebRTCSession:
        ticket = state.admission.admit(identity, "webrtc")
        session = WebRTCSession(secrets.token_urlsafe(16), state, identity, self._remove)
        self._sessions[session.id] = session
        self._tickets[session.id] = ticket
        self._gauge.set(len(self._sessions))
        return session

    def _remove(self, session: WebRTCSession) -> None:
        self._sessions.pop(session.id, None)
        if (ticket := self._tickets.pop(session.id, None)) is not None:
            ticket.release()
        self._gauge.set(len(self._sessions))

    async def close_all(self) -> None:
        for session in list(self._sessions.values()):
            await session.close()


def install(app: FastAPI, state: ServerState) -> None:
    config = state.settings.server
    if config.webrtc_loopback:
        enable_loopback_candidates()
    gauge = Gauge("voxflow_webrtc_sessions", "Open WebRTC sessions", registry=state.metrics.registry)
    registry = SessionRegistry(gauge)
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

    @app.post("/v1/webrtc/offer", summary="Start a WebRTC session: an SDP offer in, the answer out")
    async def offer(request: Request) -> Response:
        identity = identify_request(state.admission, request)
        raw = await read_body(request, MAX_OFFER_BYTES, config.send_timeout_seconds)
        try:
            body = loads_object(raw)
        except InvalidJson:
            raise InvalidSdp('expected a JSON body {"sdp": "<offer SDP>", "type": "offer"}') from None
        sdp = check_offer(body)
        session = registry.create(state, identity)
        try:
            answer = await session.answer(sdp)
        except BaseException:
            await session.close()
            raise
        # Location names the session for a load balancer too: deploy/haproxy.cfg keys its
        # stickiness on it, so the session's DELETE reaches this replica, which holds it.
        return JSONResponse(
            {"sdp": answer, "type": "answer", "session_id": session.id},
            headers={"Location": f"/v1/webrtc/sessions/{session.id}"},
        )

    @app.delete("/v1/webrtc/sessions/{session_id}", status_code=204, summary="End a WebRTC session")
    async def delete(session_id: str, request: Request) -> Response:
        session = registry.get(session_id, identify_request(state.admission, request))
        await session.close()
        return Response(status_code=204)
