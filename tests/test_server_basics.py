"""The server's own endpoints on a live uvicorn: health, voices, metrics, docs."""

from __future__ import annotations

import httpx


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


def test_openapi_docs_are_served(server):
    assert httpx.get(f"{server.http}/docs", timeout=10).status_code == 200
    assert "/health" in httpx.get(f"{server.http}/openapi.json", timeout=10).json()["paths"]


def test_unknown_path_is_a_json_error(server):
    r = httpx.get(f"{server.http}/nope", timeout=10)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "http_404"
