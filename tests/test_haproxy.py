"""deploy/haproxy.cfg in front of in-process servers: clients named through X-Forwarded-For only
by the trusted proxy, WebRTC session requests that reach the replica holding the session, and
TLS terminated at HAProxy. The process-level behaviour (spread, rolling restarts, crashes) is
tests/test_cluster.py's."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme
from aiortc import RTCConfiguration, RTCPeerConnection
from websockets.asyncio.client import connect

from cluster_harness import HAProxy
from server_harness import RunningServer, run_server
from voxflow.streaming.engine import Engine
from voxflow.transports.protocols.native_protocol import Error, Ready, parse_server


@contextlib.contextmanager
def behind_haproxy(servers: list[RunningServer], directory: Path, tls_cert: Path | None = None) -> Iterator[HAProxy]:
    haproxy = HAProxy([s.http.removeprefix("http://") for s in servers], directory, tls_cert=tls_cert)
    haproxy.start()
    try:
        haproxy.wait_for({f"replica{n}": "UP" for n in range(1, len(servers) + 1)})
        yield haproxy
    finally:
        haproxy.stop()


async def greeting(url: str, source: str, headers: dict[str, str] | None = None) -> object:
    """The first message a native socket opened from the loopback address `source` gets."""
    async with connect(url, additional_headers=headers, local_addr=(source, 0), open_timeout=30) as ws:
        return parse_server(await asyncio.wait_for(ws.recv(), 30))


async def test_only_the_trusted_proxy_names_the_client(engine: Engine, tmp_path: Path):
    # One new socket per client per 10 s: which bucket a socket spends shows who the server
    # thinks is asking. HAProxy connects from 127.0.0.1, the clients from other loopback addresses.
    with run_server(engine, trusted_proxies=("127.0.0.1",), requests_per_second=0.1) as server:
        with behind_haproxy([server], tmp_path) as haproxy:
            through = f"{haproxy.ws}/v1/stream"
            assert isinstance(await greeting(through, "127.0.0.3"), Ready)
            # A header of the client's own is kept by HAProxy, left of the address it appends.
            spoofed = await greeting(through, "127.0.0.3", {"X-Forwarded-For": "127.0.0.99"})
            assert isinstance(spoofed, Error) and spoofed.code == "rate_limited"
            assert isinstance(await greeting(through, "127.0.0.4"), Ready)  # a client of its own

        # Straight to the server from a peer that is no trusted proxy: the header is ignored.
        direct = f"{server.ws}/v1/stream"
        assert isinstance(await greeting(direct, "127.0.0.5", {"X-Forwarded-For": "127.0.0.6"}), Ready)
        refused = await greeting(direct, "127.0.0.5", {"X-Forwarded-For": "127.0.0.7"})
        assert isinstance(refused, Error) and refused.code == "rate_limited"


async def offer_sdp() -> str:
    """An offer as the page makes it: the data channel and a two-way audio track."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("voxflow")
    pc.addTransceiver("audio", direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    await pc.close()
    return pc.localDescription.sdp


def holder(servers: list[RunningServer], session_id: str) -> RunningServer | None:
    holding = [s for s in servers if session_id in s.server.config.app.state.webrtc_sessions._sessions]
    assert len(holding) <= 1
    return holding[0] if holding else None


async def test_webrtc_session_requests_reach_the_replica_that_holds_the_session(engine: Engine, tmp_path: Path):
    with run_server(engine, webrtc_loopback=True) as first, run_server(engine, webrtc_loopback=True) as second:
        servers = [first, second]
        with behind_haproxy(servers, tmp_path) as haproxy:
            async with httpx.AsyncClient(base_url=haproxy.http, timeout=30) as http:
                sessions = []
                sdp = await offer_sdp()  # no media flows here: the sessions only need to exist
                for _ in range(4):
                    answer = await http.post("/v1/webrtc/offer", json={"sdp": sdp, "type": "offer"})
                    assert answer.status_code == 200, answer.text
                    session_id = answer.json()["session_id"]
                    assert answer.headers["location"] == f"/v1/webrtc/sessions/{session_id}"
                    sessions.append(session_id)
                owners = [holder(servers, s) for s in sessions]
                assert set(map(id, owners)) == {id(first), id(second)}  # both replicas hold some

                # The owner of the last one stops taking new work (its drain's first moment):
                # HAProxy takes it out, yet that session's DELETE still goes to it.
                owners[-1].state.stopping = True
                haproxy.wait_for({f"replica{servers.index(owners[-1]) + 1}": "DOWN"})
                for session_id in reversed(sessions):
                    assert (await http.delete(f"/v1/webrtc/sessions/{session_id}")).status_code == 204
                    assert holder(servers, session_id) is None
                gone = await http.delete(f"/v1/webrtc/sessions/{sessions[0]}")
                assert gone.status_code == 404 and gone.json()["error"]["code"] == "unknown_session"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_haproxy_terminates_tls(engine: Engine, tmp_path: Path, ca: trustme.CA):
    leaf = ca.issue_cert("127.0.0.1")
    pem = tmp_path / "haproxy.pem"  # HAProxy's format: the chain, then the key, in one file
    pem.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems) + leaf.private_key_pem.bytes())
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    with run_server(engine) as server, behind_haproxy([server], tmp_path, tls_cert=pem) as haproxy:
        secure = f"127.0.0.1:{haproxy.tls_port}"
        async with httpx.AsyncClient(verify=trusting, timeout=30) as http:
            assert (await http.get(f"https://{secure}/health/ready")).json()["status"] == "ready"
        async with connect(f"wss://{secure}/v1/stream", ssl=trusting, open_timeout=30) as ws:
            assert isinstance(parse_server(await asyncio.wait_for(ws.recv(), 30)), Ready)
