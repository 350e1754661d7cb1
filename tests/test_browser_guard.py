"""The Origin and Host checks in front of every route (pure ASGI; the real server is covered by
tests/test_adversarial.py)."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from voxflow.config import ServerConfig
from voxflow.transports.core.browser_guard import BrowserGuard


async def hello(request):
    return PlainTextResponse("hello")


async def echo(ws: WebSocket) -> None:
    await ws.accept()
    await ws.send_text("hi")
    await ws.close()


def client(config: ServerConfig, host: str = "127.0.0.1:8765") -> TestClient:
    app = Starlette(routes=[Route("/x", hello, methods=["GET", "POST"]), WebSocketRoute("/ws", echo)])
    return TestClient(BrowserGuard(app, config), base_url=f"http://{host}")


KEYLESS = ServerConfig()
KEYED = ServerConfig(host="0.0.0.0", api_keys=("k",), cors_origins=("https://app.example",))


@pytest.mark.parametrize("origin", [None, "http://127.0.0.1:8765"])
def test_clients_without_an_origin_and_the_servers_own_page_pass(origin):
    headers = {"origin": origin} if origin else {}
    c = client(KEYLESS)
    assert c.post("/x", headers=headers).status_code == 200
    # The test client's WebSocket does not take the host from base_url.
    with c.websocket_connect("/ws", headers={**headers, "host": "127.0.0.1:8765"}) as ws:
        assert ws.receive_text() == "hi"


@pytest.mark.parametrize("config", [KEYLESS, KEYED])
def test_another_pages_post_and_websocket_are_refused(config):
    c = client(config, "localhost:8765")
    response = c.post("/x", headers={"origin": "http://evil.example", "content-type": "text/plain"}, content=b"{}")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden_origin"
    with pytest.raises(WebSocketDisconnect) as closed:
        with c.websocket_connect("/ws", headers={"origin": "http://evil.example", "host": "localhost:8765"}):
            pass
    assert closed.value.code == 1008 and closed.value.reason == "forbidden_origin"
    assert c.get("/x", headers={"origin": "http://evil.example"}).status_code == 200  # reads are CORS's to guard


def test_listed_origins_pass():
    c = client(KEYED, "voxflow.example:8765")
    assert c.post("/x", headers={"origin": "https://app.example"}).status_code == 200


@pytest.mark.parametrize("host", ["rebind.evil.example", "rebind.evil.example:8765", "192.168.1.5:8765"])
def test_a_keyless_server_answers_only_loopback_names(host):
    response = client(KEYLESS, host).get("/x")
    assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden_host"


@pytest.mark.parametrize("host", ["localhost:8765", "127.0.0.1", "[::1]:8765", "LOCALHOST"])
def test_loopback_names_pass(host):
    assert client(KEYLESS, host).get("/x").status_code == 200


def test_allowed_hosts_and_keyed_servers_answer_other_names():
    assert client(ServerConfig(allowed_hosts=("speaker.lan",)), "speaker.lan:8765").get("/x").status_code == 200
    assert client(KEYED, "voxflow.example").get("/x").status_code == 200
