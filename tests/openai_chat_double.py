"""A local stand-in for an OpenAI-compatible chat-completions server, for tests.

It serves `POST /v1/chat/completions` with `stream: true` over real HTTP (uvicorn, on a free
loopback port, in a thread of its own) and answers in OpenAI's wire format: `data: {chunk}`
server-sent events shaped like the ones api.openai.com sends (a role chunk, content deltas, a
`finish_reason` chunk), then `data: [DONE]`. What it answers is scripted per test, including
the ways real servers fail: an HTTP error with OpenAI's error body, an error event in the middle
of the stream, and a stream that stops sending but stays open. It records every request it got.

    with chat_double(ChatScript(["Hello", Pause(0.3), " there"])) as double:
        model = OpenAIChatModel(model="gpt-test", base_url=double.base_url, api_key="sk-test")
        ...
        assert double.requests[0].headers["authorization"] == "Bearer sk-test"
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import string
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from server_harness import free_port, serving_in_thread


@dataclass(frozen=True)
class Pause:
    """A wait, in seconds, between two pieces of the scripted reply."""

    seconds: float


@dataclass(frozen=True)
class ChatScript:
    """What the double answers to every chat completion request.

    pieces: the reply's content deltas, in order, with Pauses between them where wanted.
    error_after: after this many content deltas, send an error event in the stream and end it.
    stall_after: after this many content deltas, send nothing more and keep the connection open
        (until the client closes it or the double shuts down).
    done: end a finished reply with `data: [DONE]`; False: keep the connection open after the
        finish_reason chunk instead, as some servers do.
    status: answer this HTTP error status, with OpenAI's JSON error body, instead of a stream.
    """

    pieces: Sequence[str | Pause] = ("Hello", " there", "!")
    error_after: int | None = None
    stall_after: int | None = None
    done: bool = True
    status: int | None = None
    error_message: str = "The server had an error while processing your request. Sorry about that!"


@dataclass
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased, as HTTP/1.1 servers see them
    body: Any  # the decoded JSON body
    peer: str  # the client's address and port: the same for requests on one kept-alive connection
    # time.monotonic() when each content delta was written to the connection
    sent_at: list[float] = field(default_factory=list)
    # Set when the client closed the connection before the reply was over.
    client_went_away: threading.Event = field(default_factory=threading.Event)


# The error bodies api.openai.com answers with, by status.
_STATUS_ERRORS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", None),
}


def _event(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


def _json(value: object) -> str:
    # OpenAI sends compact JSON with UTF-8 text as is, not \u escapes.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _obfuscation() -> str:
    # OpenAI pads each chunk with random characters (stream_options.include_obfuscation, on by
    # default) so that packet sizes do not give the tokens away; clients must ignore the field.
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(secrets.randbelow(12)))


class ChatDouble:
    def __init__(self, script: ChatScript, port: int) -> None:
        self.script = script
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.requests: list[ReceivedRequest] = []
        self._shutting_down = asyncio.Event()  # set from the test's thread at the end

    async def wait_client_went_away(self, index: int = -1, timeout: float = 5.0) -> bool:
        """Whether the client closed request `index`'s connection mid-reply, within `timeout`."""
        return await asyncio.to_thread(self.requests[index].client_went_away.wait, timeout)

    async def __call__(self, scope: dict, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        host, port = scope["client"]
        request = ReceivedRequest(scope["method"], scope["path"], headers, json.loads(body) if body else None, f"{host}:{port}")
        self.requests.append(request)
        script = self.script

        if (scope["method"], scope["path"]) != ("POST", "/v1/chat/completions"):
            await self._send_error(send, 404, f"Invalid URL ({scope['method']} {scope['path']})", "invalid_request_error", None)
            return
        if script.status is not None:
            error_type, code = _STATUS_ERRORS.get(script.status, ("server_error", None))
            await self._send_error(send, script.status, script.error_message, error_type, code)
            return
        if not isinstance(request.body, dict) or request.body.get("stream") is not True:
            await self._send_error(send, 400, "this test double only answers with a stream", "invalid_request_error", None)
            return
        await self._stream(receive, send, script, request)

    async def _send_error(self, send, status: int, message: str, error_type: str, code: str | None) -> None:
        # OpenAI indents its error bodies and ends them with a newline.
        body = json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}}, indent=4) + "\n"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"x-request-id", f"req_{secrets.token_hex(16)}".encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})

    async def _stream(self, receive, send, script: ChatScript, request: ReceivedRequest) -> None:
        gone = asyncio.Event()
        over = False

        async def watch() -> None:
            # uvicorn also answers http.disconnect once the response is complete; only a
            # disconnect before that means the client went away mid-reply.
            while (await receive())["type"] != "http.disconnect":
                pass
            if not over:
                request.client_went_away.set()
                gone.set()

        async def wait(seconds: float | None) -> bool:
            """Wait, and say whether the client is still there."""
            waiters = [asyncio.ensure_future(gone.wait()), asyncio.ensure_future(self._shutting_down.wait())]
            try:
                await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            return not gone.is_set()

        completion_id = "chatcmpl-" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(29))
        created = int(time.time())
        model = request.body.get("model", "")
        fingerprint = f"fp_{secrets.token_hex(5)}"

        def chunk(delta: dict, finish_reason: str | None) -> bytes:
            return _event(
                _json(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "service_tier": "default",
                        "system_fingerprint": fingerprint,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
                        "obfuscation": _obfuscation(),
                    }
                )
            )

        async def body(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        watcher = asyncio.create_task(watch())
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"x-request-id", f"req_{secrets.token_hex(16)}".encode()),
                    ],
                }
            )
            await body(chunk({"role": "assistant", "content": "", "refusal": None}, None))
            sent = 0
            for piece in script.pieces:
                if sent in (script.stall_after, script.error_after):
                    break
                if isinstance(piece, Pause):
                    if not await wait(piece.seconds):
                        return
                    continue
                await body(chunk({"content": piece}, None))
                request.sent_at.append(time.monotonic())
                sent += 1
            if sent == script.stall_after:
                await wait(None)
            elif sent == script.error_after:
                # What OpenAI and the servers that copy it (vLLM, LiteLLM) send when a
                # completion fails after its response has begun: an error object where a chunk
                # would be, and no [DONE].
                await body(_event(_json({"error": {"message": script.error_message, "type": "server_error", "param": None, "code": None}})))
            else:
                await body(chunk({}, "stop"))
                if script.done:
                    await body(_event("[DONE]"))
                else:
                    await wait(None)
        finally:
            over = True
            if not gone.is_set():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            watcher.cancel()

    def begin_shutdown(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let streams held open (stall_after) end, so the server can stop."""
        loop.call_soon_threadsafe(self._shutting_down.set)


@contextlib.contextmanager
def chat_double(script: ChatScript | None = None) -> Iterator[ChatDouble]:
    """Serve `script` (default: ChatScript()) at double.base_url until the block exits."""
    port = free_port()
    double = ChatDouble(script or ChatScript(), port)
    config = uvicorn.Config(
        double,
        host="127.0.0.1",
        port=port,
        loop="none",
        http="h11",
        interface="asgi3",
        lifespan="off",
        log_level="warning",
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    loop = asyncio.new_event_loop()
    with serving_in_thread(server, loop, server.serve(), f"openai-chat-double-{port}"):
        try:
            yield double
        finally:
            double.begin_shutdown(loop)
