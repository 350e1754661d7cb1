"""`x-request-id` on every HTTP response of a live server: echoed when the client's is sane,
made up otherwise; WebSocket handshakes are left alone."""

from __future__ import annotations

import logging
import re

import httpx
import openai
import pytest
from openai import OpenAI
from websockets.asyncio.client import connect

from server_harness import RunningServer
from voxflow.streaming.stream import SynthesisStream

UUID_HEX = re.compile(r"[0-9a-f]{32}")
SENTENCE = "Every response can be traced by its request id."


def generated(value: str | None) -> bool:
    return value is not None and UUID_HEX.fullmatch(value) is not None


def test_a_streamed_speech_response_carries_the_clients_id(server: RunningServer) -> None:
    client = OpenAI(base_url=server.http + "/v1", api_key="x", timeout=120, max_retries=0)
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=SENTENCE, response_format="pcm", extra_headers={"X-Request-ID": "call-42/turn-7"}
    ) as response:
        assert response.headers["x-request-id"] == "call-42/turn-7"
        chunks = list(response.iter_bytes())
    # Still streamed in pieces, and whole: the middleware passes the body through as it comes.
    assert len(chunks) > 5
    assert len(b"".join(chunks)) / 2 / 24_000 > 1.0


def test_a_json_error_carries_an_id(server: RunningServer) -> None:
    r = httpx.post(f"{server.http}/v1/audio/speech", json={"input": ""}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_request"
    assert generated(r.headers.get("x-request-id"))
    # The `openai` SDK puts it in its exceptions, as it does for OpenAI's own ids.
    client = OpenAI(base_url=server.http + "/v1", api_key="x", timeout=120, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(model="tts-1", voice="alloy", input="", extra_headers={"X-Request-ID": "bad-input-1"})
    assert caught.value.request_id == "bad-input-1"


def test_health_carries_an_id_and_each_request_gets_its_own(server: RunningServer) -> None:
    first, second = (httpx.get(f"{server.http}/health", timeout=30) for _ in range(2))
    assert first.status_code == second.status_code == 200
    ids = [first.headers.get("x-request-id"), second.headers.get("x-request-id")]
    assert all(generated(i) for i in ids) and ids[0] != ids[1]


def test_a_refusal_by_the_browser_guard_carries_an_id(server: RunningServer) -> None:
    r = httpx.get(f"{server.http}/health", headers={"Host": "rebound.example", "X-Request-ID": "guarded"}, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_host"
    assert r.headers["x-request-id"] == "guarded"


@pytest.mark.parametrize("sent", ["a", "0123-abcd_EF.gh:ij/kl~!#$%&*+=?@^|", "x" * 128])
def test_a_sane_id_is_echoed(server: RunningServer, sent: str) -> None:
    r = httpx.get(f"{server.http}/health", headers={"X-Request-ID": sent}, timeout=30)
    assert r.headers.get_list("x-request-id") == [sent]


@pytest.mark.parametrize(
    "sent", [b"x" * 129, "caf\u00e9".encode(), "caf\u00e9".encode("latin-1"), b"two words", b""],
    ids=["oversize", "utf8", "latin1", "space", "empty"],
)
def test_an_insane_id_is_replaced(server: RunningServer, sent: bytes) -> None:
    r = httpx.get(f"{server.http}/health", headers={"X-Request-ID": sent}, timeout=30)
    (replaced,) = r.headers.get_list("x-request-id")
    assert generated(replaced) and replaced.encode() != sent


def test_of_several_ids_the_first_is_used(server: RunningServer) -> None:
    r = httpx.get(f"{server.http}/health", headers=[("X-Request-ID", "first"), ("X-Request-ID", "second")], timeout=30)
    assert r.headers.get_list("x-request-id") == ["first"]


def test_an_unexpected_failure_is_a_json_500_logged_with_its_id(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> list:
        raise RuntimeError("the registry broke")

    monkeypatch.setattr(server.state.engine.voices, "statuses", broken)
    with caplog.at_level(logging.ERROR, logger="voxflow.transports.core.request_id"):
        r = httpx.get(f"{server.http}/v1/voices", headers={"X-Request-ID": "voices-1"}, timeout=30)
    assert r.status_code == 500
    assert r.headers["x-request-id"] == "voices-1"
    assert r.json() == {"error": {"code": "internal_error", "message": "internal error (request voices-1)"}}
    (record,) = [rec for rec in caplog.records if "voices-1" in rec.getMessage()]
    assert record.exc_info is not None and "the registry broke" in str(record.exc_info[1])


async def test_a_websocket_handshake_is_left_alone(server: RunningServer) -> None:
    async with connect(f"{server.ws}/v1/stream", proxy=None, open_timeout=30,
                       additional_headers={"X-Request-ID": "socket-1"}) as ws:
        assert ws.response is not None and ws.response.status_code == 101
        assert "x-request-id" not in ws.response.headers
        assert (await ws.recv())  # greeted as ever


def test_a_failure_mid_stream_is_logged_with_the_responses_id(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    plan_step = SynthesisStream._plan_step
    steps = 0

    def fail_after_the_first_chunk(self: SynthesisStream, *args: object) -> object:
        nonlocal steps
        if steps:
            raise RuntimeError("decoder broke")
        planned = plan_step(self, *args)
        steps += not isinstance(planned, tuple)  # a tuple: it waits for more words, no step yet
        return planned

    monkeypatch.setattr(SynthesisStream, "_plan_step", fail_after_the_first_chunk)
    with caplog.at_level(logging.ERROR, logger="voxflow.transports.core.request_id"):
        with pytest.raises(httpx.RemoteProtocolError):
            with httpx.stream("POST", f"{server.http}/v1/audio/speech", headers={"X-Request-ID": "cut-1"},
                              json={"input": SENTENCE * 4, "response_format": "pcm"}, timeout=60) as r:
                assert (r.status_code, r.headers["x-request-id"]) == (200, "cut-1")
                for _ in r.iter_bytes():
                    pass
    (record,) = [rec for rec in caplog.records if "cut-1" in rec.getMessage()]
    assert "after its response started" in record.getMessage()
