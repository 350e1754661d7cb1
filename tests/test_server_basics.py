"""The server's own endpoints on a live uvicorn: health, voices, metrics, docs."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from server_harness import run_server
from websockets.asyncio.client import connect

from voxflow.config import load_settings
from voxflow.errors import InvalidRequest


def test_health_reports_ready(server):
    r = httpx.get(f"{server.http}/health", timeout=10)
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


def test_voices_lists_the_default_voice(server):
    body = httpx.get(f"{server.http}/v1/voices", timeout=10).json()
    assert body["default"] == "en_US-joe-medium"
    assert {"name": "en_US-joe-medium", "sample_rate": 22050}.items() <= body["voices"][0].items()


def test_metrics_are_prometheus_text(server):
    r = httpx.get(f"{server.http}/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    for name in ("voxflow_acoustic_step_seconds", "voxflow_first_frame_sent_seconds", "voxflow_active_streams", "voxflow_cache_hits_total"):
        assert name in r.text


def test_metrics_show_what_a_leak_shows_in_first(server):
    samples = {
        line.split()[0]: float(line.split()[1])
        for line in httpx.get(f"{server.http}/metrics", timeout=10).text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples["process_resident_memory_bytes"] > 50e6  # the voice alone is tens of MB
    assert samples["process_open_fds"] >= 3
    assert 1 <= samples["voxflow_event_loop_tasks"] < 1000


def test_health_counts_every_admission_pool(server):
    body = httpx.get(f"{server.http}/health", timeout=10).json()
    assert set(body["admitted"]) == {"socket", "handshake", "http_stream", "webrtc", "wyoming", "conversation", "mqtt", "watermark_check"}
    assert body["connections"] == body["admitted"]["socket"] == 0


def test_openapi_docs_are_served(server):
    assert httpx.get(f"{server.http}/docs", timeout=10).status_code == 200
    assert "/health" in httpx.get(f"{server.http}/openapi.json", timeout=10).json()["paths"]


def test_unknown_path_is_a_json_error(server):
    r = httpx.get(f"{server.http}/nope", timeout=10)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "http_404"


def test_cors_is_off_by_default_and_configurable(engine, server):
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(f"{server.http}/v1/voices", headers=preflight, timeout=10)
    assert "access-control-allow-origin" not in r.headers
    with run_server(engine, cors_origins=("http://app.example",)) as cors_server:
        r = httpx.options(f"{cors_server.http}/v1/voices", headers=preflight, timeout=10)
        assert r.headers["access-control-allow-origin"] == "http://app.example"


def test_binding_beyond_loopback_requires_a_key():
    with pytest.raises(InvalidRequest, match="API key"):
        load_settings(env={"VOXFLOW_HOST": "0.0.0.0"})
    settings = load_settings(env={"VOXFLOW_HOST": "0.0.0.0", "VOXFLOW_API_KEYS": "k1,k2"})
    assert settings.server.api_keys == ("k1", "k2")


def test_settings_layer_file_env_and_overrides(tmp_path):
    conf = tmp_path / "voxflow.toml"
    conf.write_text('[engine]\nseed = 3\n[server]\nport = 9001\nmax_sockets = 5\n')
    settings = load_settings(conf, env={"VOXFLOW_MAX_SOCKETS": "7"}, server={"port": 9002})
    assert (settings.engine.seed, settings.server.max_sockets, settings.server.port) == (3, 7, 9002)
    with pytest.raises(InvalidRequest, match="unknown"):
        load_settings(env={}, server={"nonsense": 1})


def test_liveness_and_readiness_when_idle(server):
    assert httpx.get(f"{server.http}/health/live", timeout=10).json() == {"status": "live"}
    ready = httpx.get(f"{server.http}/health/ready", timeout=10)
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "full": []}


async def test_readiness_turns_503_when_full_or_stopping_while_health_and_liveness_stay(engine):
    with run_server(engine, max_sockets=1) as srv:
        async with httpx.AsyncClient(base_url=srv.http, timeout=10) as http:
            async with connect(f"{srv.ws}/v1/stream") as ws:
                await ws.recv()  # ready: the socket holds the pool's one place
                full = await http.get("/health/ready")
                assert full.status_code == 503 and full.json() == {"status": "full", "full": ["socket"]}
                assert (await http.get("/health")).status_code == 200
            async with asyncio.timeout(30):
                while (await http.get("/health/ready")).status_code != 200:
                    await asyncio.sleep(0.05)
            srv.state.stopping = True  # what a drain sets first (SIGTERM: tests/test_serve_process.py)
            stopping = await http.get("/health/ready")
            assert stopping.status_code == 503 and stopping.json()["status"] == "draining"
            assert (await http.get("/health/live")).status_code == 200
            assert (await http.get("/health")).status_code == 200  # as before: 503 once new work is refused
