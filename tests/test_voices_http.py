"""`/v1/voices` on a live server: listing, adding (a path, an upload), removing, and a voice added
at run time spoken from the native WebSocket and the OpenAI endpoint."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from server_harness import RunningServer, run_server
from test_native_ws import greeted, open_socket, read_until, send, speak
from test_voice_registry import JOE_CONFIG, JOE_MODEL, SLOW, copy_joe
from voxflow.config import EngineConfig
from voxflow.streaming.engine import Engine
from voxflow.transports.protocols.native_protocol import AudioPacket, Cancel, Cancelled, Error, Start, Started, Text
from voxflow.voices.registry import DEFAULT_VOICE
from waiting import until

TEXT = "The quick brown fox jumps over the lazy dog."
OPENAI_RATE = 24_000


@pytest.fixture
def voice_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    directory = tmp_path / "voices"
    copy_joe(directory, "test_voice-b")
    return directory


@pytest.fixture
def voiced_engine(voice_dir: Path) -> Iterator[Engine]:
    engine = Engine(EngineConfig(voice_dirs=(voice_dir,)), concurrent=True)
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture
def srv(voiced_engine: Engine) -> Iterator[RunningServer]:
    with run_server(voiced_engine) as running:
        yield running


def voices_url(server: RunningServer, name: str = "") -> str:
    return f"{server.http}/v1/voices" + (f"/{name}" if name else "")


def listed(server: RunningServer) -> dict[str, dict]:
    return {v["name"]: v for v in httpx.get(voices_url(server), timeout=30).json()["voices"]}


def openai_error(response: httpx.Response, status: int, code: str) -> dict:
    """The error, checked to have the OpenAI endpoint's shape and the expected status and code."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "type", "param"} and error["code"] == code, error
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    return error


def openai_seconds(server: RunningServer, voice: str) -> float:
    r = httpx.post(
        f"{server.http}/v1/audio/speech", json={"input": TEXT, "voice": voice, "response_format": "pcm"}, timeout=120
    )
    assert r.status_code == 200, r.text
    return len(r.content) / 2 / OPENAI_RATE


async def native_speech(server: RunningServer, voice: str) -> list:
    async with open_socket(server) as ws:
        await greeted(ws)
        return await speak(ws, "c1", TEXT, voice=voice)


def native_seconds(events: list) -> float:
    started = next(e for e in events if isinstance(e, Started))
    return sum(len(e.pcm) for e in events if isinstance(e, AudioPacket)) / 2 / started.sample_rate


def raw_post(server: RunningServer, headers: dict[str, str], body: list[bytes] = ()) -> tuple[int, dict]:
    """A POST /v1/voices written by hand: headers (and body pieces) exactly as given, then the
    answer read until the server closes the connection."""
    address = urlsplit(server.http)
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": address.netloc, "Connection": "close", **headers}.items())
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/voices HTTP/1.1\r\n{head}\r\n".encode())
        for piece in body:
            sock.sendall(piece)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


# -- listing -----------------------------------------------------------------------------------


def test_the_listing_says_where_each_voice_comes_from_and_whether_it_is_loaded(srv: RunningServer) -> None:
    body = httpx.get(voices_url(srv), timeout=30).json()
    assert body["default"] == DEFAULT_VOICE
    voices = {v["name"]: v for v in body["voices"]}
    joe, b = voices[DEFAULT_VOICE], voices["test_voice-b"]
    assert (joe["source"], joe["loaded"], joe["in_use"]) == ("embedded", True, 0)  # warmed at start
    assert (b["source"], b["loaded"], b["in_use"]) == ("directory", False, 0)
    assert {"language": "en_US", "sample_rate": 22050, "quality": "medium", "speakers": [], "espeak_voice": "en-us",
            "num_speakers": 1, "speaker_ids": {}}.items() <= b.items()


# -- a voice added at run time, on every endpoint ----------------------------------------------


async def test_a_voice_added_by_path_is_spoken_on_native_and_openai_then_removed(srv: RunningServer, voice_dir: Path) -> None:
    model = copy_joe(voice_dir, "runtime")  # in the directory, but not yet a voice
    refused = [e for e in await native_speech(srv, "runtime") if isinstance(e, Error)]
    assert [e.code for e in refused] == ["unknown_voice"]

    r = httpx.post(voices_url(srv), json={"path": str(model)}, timeout=120)
    assert r.status_code == 201, r.text
    assert {"name": "runtime", "source": "added", "loaded": False}.items() <= r.json().items()

    # Its JSON makes it speak SLOW times slower than joe: the length says which voice spoke.
    assert openai_seconds(srv, "runtime") > 1.3 * openai_seconds(srv, DEFAULT_VOICE)
    joe_events, runtime_events = [await native_speech(srv, v) for v in (DEFAULT_VOICE, "runtime")]
    assert next(e for e in runtime_events if isinstance(e, Started)).voice == "runtime"
    assert native_seconds(runtime_events) > 1.3 * native_seconds(joe_events)
    assert listed(srv)["runtime"]["loaded"]

    r = httpx.delete(voices_url(srv, "runtime"), timeout=60)
    assert (r.status_code, r.json()) == (200, {"name": "runtime", "deleted": True})
    assert "runtime" not in listed(srv)
    assert not any(p.name.startswith("runtime") for p in voice_dir.iterdir())
    gone = httpx.post(f"{srv.http}/v1/audio/speech", json={"input": TEXT, "voice": "runtime"}, timeout=60)
    assert openai_error(gone, 400, "invalid_request")["param"] == "voice"
    assert [e.code for e in await native_speech(srv, "runtime") if isinstance(e, Error)] == ["unknown_voice"]


def test_an_uploaded_voice_is_stored_in_the_voice_directory_and_spoken(srv: RunningServer, voice_dir: Path) -> None:
    config = json.loads(JOE_CONFIG.read_text())
    config["inference"]["length_scale"] = SLOW
    with open(JOE_MODEL, "rb") as model:
        files = {"model": ("whatever.onnx", model), "config": ("whatever.onnx.json", json.dumps(config).encode())}
        r = httpx.post(voices_url(srv), files=files, data={"name": "uploaded"}, timeout=120)
    assert r.status_code == 201, r.text
    assert {"name": "uploaded", "source": "added"}.items() <= r.json().items()
    assert (voice_dir / "uploaded.onnx").stat().st_size == JOE_MODEL.stat().st_size
    assert json.loads((voice_dir / "uploaded.onnx.json").read_text())["inference"]["length_scale"] == SLOW
    assert not [p for p in voice_dir.iterdir() if p.name.startswith(".voxflow-upload-")]
    assert openai_seconds(srv, "uploaded") > 1.3 * openai_seconds(srv, DEFAULT_VOICE)

    # Taken names, names that are paths, and uploads without both files are refused.
    for data, files, status, code in (
        ({"name": "uploaded"}, {"model": ("a.onnx", b"x"), "config": ("a.onnx.json", b"{}")}, 409, "voice_exists"),
        ({"name": "../escape"}, {"model": ("a.onnx", b"x"), "config": ("a.onnx.json", b"{}")}, 400, "invalid_request"),
        ({}, {"model": ("named-by-file.onnx", b"x")}, 400, "invalid_request"),
    ):
        openai_error(httpx.post(voices_url(srv), files=files, data=data, timeout=60), status, code)
    assert not (voice_dir.parent / "escape.onnx").exists()


def test_uploads_past_the_size_limit_are_refused(voiced_engine: Engine, voice_dir: Path) -> None:
    before = sorted(voice_dir.iterdir())
    limit = 2**20
    with run_server(voiced_engine, max_voice_upload_mb=1) as small:
        multipart = {"Content-Type": "multipart/form-data; boundary=B"}
        # Declared too large: refused before any of it is read.
        status, body = raw_post(small, {**multipart, "Content-Length": str(limit + 1)})
        assert (status, body["error"]["code"]) == (413, "limit_exceeded")
        # Sent without a length: refused once the bytes received pass the limit.
        part = b'--B\r\nContent-Disposition: form-data; name="model"; filename="big.onnx"\r\n\r\n'
        # One byte past the limit, that byte last: the server has read all there is when it answers.
        filler = limit + 1 - len(part)
        pieces = [part, *[b"\0" * 65536] * (filler // 65536), b"\0" * (filler % 65536)]
        chunked = [f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces]
        status, body = raw_post(small, {**multipart, "Transfer-Encoding": "chunked"}, chunked)
        assert (status, body["error"]["code"]) == (413, "limit_exceeded")
    assert sorted(voice_dir.iterdir()) == before


async def test_a_voice_that_finds_no_room_is_a_503_before_any_audio(voice_dir: Path) -> None:
    engine = Engine(EngineConfig(voice_dirs=(voice_dir,), max_loaded_voices=1), concurrent=True)
    try:
        with run_server(engine) as full:
            async with open_socket(full) as ws:
                await greeted(ws)
                await send(ws, Start("held", voice=DEFAULT_VOICE), Text("held", TEXT * 20))
                await read_until(ws, lambda e: isinstance(e, AudioPacket))
                refused = httpx.post(
                    f"{full.http}/v1/audio/speech", json={"input": TEXT, "voice": "test_voice-b"}, timeout=60
                )
                openai_error(refused, 503, "limit_exceeded")
                await send(ws, Cancel("held"))
                await read_until(ws, lambda e: isinstance(e, Cancelled))
            await until(lambda: not listed(full)[DEFAULT_VOICE]["in_use"], 10, poll=0.05)
            assert openai_seconds(full, "test_voice-b") > 1
            assert {n for n, v in listed(full).items() if v["loaded"]} == {"test_voice-b"}
    finally:
        engine.close()


# -- who may change what ------------------------------------------------------------------------


def test_adding_and_removing_need_a_key_where_keys_are_configured(voiced_engine: Engine, voice_dir: Path) -> None:
    model = copy_joe(voice_dir, "keyed")
    with run_server(voiced_engine, api_keys=("k",)) as keyed:
        openai_error(httpx.post(voices_url(keyed), json={"path": str(model)}, timeout=60), 401, "unauthorized")
        wrong = {"Authorization": "Bearer nope"}
        openai_error(httpx.post(voices_url(keyed), json={"path": str(model)}, headers=wrong, timeout=60), 401, "unauthorized")
        openai_error(httpx.delete(voices_url(keyed, "test_voice-b"), timeout=60), 401, "unauthorized")
        assert "keyed" not in listed(keyed) and "test_voice-b" in listed(keyed)  # listing stays open

        right = {"Authorization": "Bearer k"}
        assert httpx.post(voices_url(keyed), json={"path": str(model)}, headers=right, timeout=120).status_code == 201
        assert httpx.delete(voices_url(keyed, "keyed"), headers={"xi-api-key": "k"}, timeout=60).status_code == 200


def test_paths_outside_the_voice_directories_are_refused(srv: RunningServer, voice_dir: Path, tmp_path: Path) -> None:
    outside = copy_joe(tmp_path / "elsewhere", "outsider")
    (voice_dir / "linked.onnx").symlink_to(outside)
    (voice_dir / "linked.onnx.json").symlink_to(outside.with_name("outsider.onnx.json"))
    for path in (str(outside), "../elsewhere/outsider.onnx", str(voice_dir / "linked.onnx")):
        openai_error(httpx.post(voices_url(srv), json={"path": path}, timeout=60), 403, "forbidden_path")
    for body, code in (({"path": "/etc/passwd"}, "invalid_request"), ({"path": 3}, "invalid_request"),
                       ({"path": "x.onnx", "copy": True}, "invalid_request")):
        openai_error(httpx.post(voices_url(srv), json=body, timeout=60), 400, code)
    openai_error(httpx.post(voices_url(srv), content=b"{not json", headers={"Content-Type": "application/json"}, timeout=60), 400, "invalid_json")
    openai_error(httpx.post(voices_url(srv), content=b"path", headers={"Content-Type": "text/plain"}, timeout=60), 400, "invalid_request")
    assert "linked" not in listed(srv) and "outsider" not in listed(srv)


async def test_removal_spares_the_embedded_voice_and_voices_in_use(srv: RunningServer) -> None:
    def delete(name: str) -> httpx.Response:
        return httpx.delete(voices_url(srv, name), timeout=60)

    openai_error(delete(DEFAULT_VOICE), 403, "voice_protected")
    openai_error(delete("nobody"), 404, "unknown_voice")
    async with open_socket(srv) as ws:
        await greeted(ws)
        await send(ws, Start("long", voice="test_voice-b"), Text("long", TEXT * 20))
        await read_until(ws, lambda e: isinstance(e, AudioPacket))
        assert listed(srv)["test_voice-b"]["in_use"] == 1
        openai_error(delete("test_voice-b"), 409, "voice_in_use")
        await send(ws, Cancel("long"))
        await read_until(ws, lambda e: isinstance(e, Cancelled))
    # The stream's task ends just after its last event.
    await until(lambda: not listed(srv)["test_voice-b"]["in_use"], 10, poll=0.05)
    r = delete("test_voice-b")
    assert r.status_code == 200, r.text
