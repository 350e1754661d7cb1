"""Soak and faults: real `voxflow serve` processes under steady load, bad clients, a kill -9
and a broker restart.

One server on a fixed loopback port (API keys on, audio cache off, MQTT bridge to a real
mosquitto), driven from this process in three phases:

1. Soak (--minutes, default 10). --streams SDK clients (native WebSocket, default 8) each
   speak one reply after another, tokens at 50/s, and play the audio in real time through a
   --jitter-ms buffer (100 ms); a client's next reply starts when its last has played. Beside
   them, every --bad-every seconds (2) a bad client of the next kind in BAD_CLIENTS. Every
   --sample-seconds (10) the server's resident memory, open descriptors and event-loop tasks
   are read from /metrics.
2. kill -9. The same streams; once they are speaking the server is killed and a new process
   started on the same port. The SDK reconnects on its own; the clients go on speaking.
3. Broker restart. --mqtt-devices (4) devices say one sentence after another through
   mosquitto, which is restarted under them.

Underrun: playback starts one jitter buffer after a reply's first frame arrives; a frame not
there when it is due is an underrun, and playback waits for it, which shifts every later frame
as a real player would, so one stall counts once.

Leaks: the tasks, descriptors and admission slots of the idle server after a warm-up are
compared with those of the idle server once every soak client has gone; memory is compared
between the first sample after the warm-up (a minute, at most a quarter of the soak) and the
last sample of the soak. Prints a table and writes JSON (default benchmarks/results/soak.json).

    python benchmarks/soak.py [--minutes 10] [--streams 8] [--out PATH] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiomqtt
import httpx
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from mosquitto_harness import Broker, start_mosquitto  # noqa: E402
from report import add_check_flag, finish, print_table, stamp, write_json  # noqa: E402
from serve_process import free_port  # noqa: E402
from server import SIX_WORDS  # noqa: E402
from voxflow.client import Audio, AsyncVoxflowClient, Cancelled, Context, Done, Error  # noqa: E402
from voxflow.config import ServerConfig  # noqa: E402
from voxflow.errors import VoxflowError  # noqa: E402
from voxflow.streaming.tokens import gpt_like_tokens, paced  # noqa: E402
from voxflow.transports.protocols.native_protocol import Cancel, End, Ping, Pong, Start, Text, parse_server, serialize_client  # noqa: E402

REPLIES = [
    "Sure, I can help with that. Your flight leaves at seven in the morning from gate twelve, "
    "so plan to be at the airport by half past five.",
    "I checked your calendar and you have a free slot tomorrow afternoon between two and four. "
    "Shall I book the meeting then?",
    "The weather at your destination looks warm and sunny for the whole week, with a light "
    "breeze in the evenings.",
    "Your order shipped this morning. It should arrive on Thursday, and I will send you the "
    "tracking number as soon as I have it.",
    "Turn left at the next light, then keep right for about two miles. The restaurant is on "
    "the corner, next to the bank.",
    "I found three recipes that use what you have at home. The quickest one takes twenty "
    "minutes and needs no oven.",
]
TOKENS_PER_SECOND = 50
DEFAULTS = ServerConfig()  # the server runs with these limits; only keys, cache and MQTT are set
READY_TIMEOUT = 180.0  # seconds for a fresh process to load and warm its voice
BAD_CLIENT_TIMEOUT = 60.0  # a bad client the server has not dealt with by then is reported, not awaited
REQUEST_TIMEOUT = 30.0  # an MQTT say with no done by then is lost
RECOVERY_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0  # for the clients to finish the reply or request in hand
# A stalled reader holds back this long: the server's send buffer (a few MB on loopback) fills,
# then its send timeout runs out.
STALLED_FOR = 4 * DEFAULTS.send_timeout_seconds
# Two minutes of 48 kHz audio (~11 MB): more than the socket buffers between the two hold.
LONG_TEXT = " ".join(REPLIES * 3)
FLOOD_SOCKETS = 20
# Idle counts after the soak may exceed those before by this much (a scrape in flight, a timer).
TASK_ALLOWANCE = 2
FD_ALLOWANCE = 2
RSS_GROWTH_LIMIT = 0.05


# -- the server process --------------------------------------------------------------------


@dataclass
class ServerProcess:
    """`voxflow serve` on one port across processes: after a kill -9 the next one takes it over."""

    port: int
    args: tuple[str, ...]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> float:
        """Start a process; returns the seconds until /health said ready."""
        began = time.perf_counter()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "voxflow.cli", "serve", "--port", str(self.port), *self.args],
                env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
            )
        async with httpx.AsyncClient() as http:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{self.http}/health", timeout=1)).status_code == 200:
                        return time.perf_counter() - began
                if self.process.poll() is not None or time.perf_counter() - began > READY_TIMEOUT:
                    raise SystemExit(f"voxflow serve did not become ready (log: {self.log_path})")
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        """SIGTERM, its graceful path."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)


@dataclass(frozen=True)
class Endpoints:
    port: int
    good_key: str  # the streams'
    bad_key: str  # the bad clients' that have a key, so rate and socket caps stay apart

    @property
    def stream(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def stop_all(stop: asyncio.Event, clients: list[asyncio.Task[None]]) -> None:
    """Let the clients finish what they are doing; one that has not within a bound is cancelled."""
    stop.set()
    done, pending = await asyncio.wait(clients, timeout=STOP_TIMEOUT)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()  # a client that crashed is a bug in this benchmark: say so


async def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


# -- the good streams ------------------------------------------------------------------------


@dataclass
class Utterance:
    """One reply of one client, played out in real time."""

    client: int
    started: float
    first_audio: float | None = None
    ended: float | None = None
    outcome: str = "open"  # "done", or the code of what ended it
    underruns: int = 0
    stall_s: float = 0.0
    stalled_at: list[float] = field(default_factory=list)  # pts of each underrun: where in a reply they fall
    play_start: float | None = None
    play_end: float = 0.0

    def arrive(self, now: float, audio: Audio, jitter: float) -> None:
        if self.play_start is None:
            self.first_audio, self.play_start = now, now + jitter
        late = now - (self.play_start + audio.pts)
        if late > 0:
            self.underruns += 1
            self.stall_s += late
            self.stalled_at.append(round(audio.pts, 2))
            self.play_start += late
        self.play_end = self.play_start + audio.pts + audio.duration


async def feed(ctx: Context, text: str) -> None:
    async for token in paced(gpt_like_tokens(text), TOKENS_PER_SECOND):
        ctx.push(token)
    ctx.end()


async def speak_one(client: AsyncVoxflowClient, text: str, utterance: Utterance, jitter: float) -> None:
    try:
        async with client.context() as ctx:
            feeder = asyncio.create_task(feed(ctx, text))
            try:
                async for event in ctx:
                    if isinstance(event, Audio):
                        utterance.arrive(time.perf_counter(), event, jitter)
                    elif isinstance(event, Done):
                        utterance.outcome = "done"
                    elif isinstance(event, Error):
                        utterance.outcome = event.code
                    elif isinstance(event, Cancelled):
                        utterance.outcome = "cancelled"
            finally:
                feeder.cancel()
    except VoxflowError as exc:  # no connection to start it on (the SDK's retries ran out)
        utterance.outcome = exc.code
    utterance.ended = time.perf_counter()


async def speaker(endpoints: Endpoints, index: int, stop: asyncio.Event, log: list[Utterance], jitter: float) -> None:
    """Reply after reply until `stop`. The SDK, with its default retries and backoff, reconnects
    by itself when the server goes away; a reply it cannot start (retries spent) counts as failed."""
    client = AsyncVoxflowClient(endpoints.stream, endpoints.good_key)
    try:
        for n in itertools.count(index):
            if stop.is_set():
                return
            utterance = Utterance(index, time.perf_counter())
            log.append(utterance)
            await speak_one(client, REPLIES[n % len(REPLIES)], utterance, jitter)
            # Real time: the next reply once this one has been heard.
            await asyncio.sleep(max(0.0, utterance.play_end - time.perf_counter()))
    finally:
        await client.aclose()


# -- the bad clients -------------------------------------------------------------------------
# Each returns (whether the server answered as it should, what happened).

Verdict = tuple[bool, str]


async def _small_window_socket(port: int) -> socket.socket:
    """A connected socket with a tiny receive buffer, so that not reading stalls the sender soon."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def _ready(endpoints: Endpoints, **kwargs: object) -> ClientConnection:
    ws = await connect(endpoints.stream, additional_headers={"Authorization": f"Bearer {endpoints.bad_key}"}, max_size=None, **kwargs)
    await ws.recv()  # ready
    return ws


async def _closed_by_server(ws: ClientConnection) -> float:
    """Read until the server closes; returns the seconds that took."""
    began = time.perf_counter()
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass
    return time.perf_counter() - began


async def no_key_idle(endpoints: Endpoints) -> Verdict:
    """An ElevenLabs socket (whose key may come in the first message) that never sends one."""
    url = f"ws://127.0.0.1:{endpoints.port}/v1/text-to-speech/soak/stream-input?output_format=pcm_22050"
    async with connect(url) as ws:
        took = await _closed_by_server(ws)
    bound = DEFAULTS.auth_timeout_seconds + 5
    return took <= bound, f"closed {ws.close_code} after {took:.0f} s"


async def stops_reading(endpoints: Endpoints) -> Verdict:
    """Starts a long reply and reads nothing for a while, then cancels it and reads to its end.

    The server must either have dropped the context (slow_consumer: its sends were held up
    past the send timeout) or, when it had not yet filled the socket buffers (a busy machine
    makes this reply slowly), still be serving it and answer the cancel.
    """
    sock = await _small_window_socket(endpoints.port)
    # Uncompressed, so the buffers fill at the audio's own rate.
    async with await _ready(endpoints, sock=sock, max_queue=1, compression=None) as ws:
        await ws.send(serialize_client(Start(context="s", sample_rate=48000)))
        await ws.send(serialize_client(Text(context="s", text=LONG_TEXT)))
        await ws.send(serialize_client(End(context="s")))
        await asyncio.sleep(STALLED_FOR)
        await ws.send(serialize_client(Cancel(context="s")))
        with contextlib.suppress(ConnectionClosed):
            async for data in ws:
                msg = parse_server(data)
                if isinstance(msg, (Cancelled, Done)):
                    return True, f"{msg.type} (never stalled for the send timeout)"
                if isinstance(msg, Error):
                    return msg.code == "slow_consumer", f"error {msg.code}"
    return True, f"closed {ws.close_code}"


async def _error_then_pong(endpoints: Endpoints, frame: str, codes: set[str]) -> Verdict:
    """A bad frame is answered with a typed error and the socket goes on serving."""
    async with await _ready(endpoints) as ws:
        await ws.send(frame)
        error = parse_server(await ws.recv())
        await ws.send(serialize_client(Ping(id=1)))
        pong = parse_server(await ws.recv())
    code = getattr(error, "code", None)
    return code in codes and isinstance(pong, Pong), f"error {code}, then {type(pong).__name__}"


async def malformed_frame(endpoints: Endpoints) -> Verdict:
    return await _error_then_pong(endpoints, '{"type": "text", "context": ', {"invalid_json"})


async def lone_surrogate(endpoints: Endpoints) -> Verdict:
    frame = '{"type": "text", "context": "s", "text": "half a pair: \\ud800"}'
    return await _error_then_pong(endpoints, frame, {"invalid_json", "invalid_request"})


async def oversize_frame(endpoints: Endpoints) -> Verdict:
    async with await _ready(endpoints) as ws:
        await ws.send("x" * (DEFAULTS.max_message_bytes + 1))
        await _closed_by_server(ws)
    return ws.close_code == 1009, f"closed {ws.close_code}"


def _speech_request(endpoints: Endpoints, body: bytes, sent_length: int | None = None) -> bytes:
    head = (
        f"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1:{endpoints.port}\r\n"
        f"Authorization: Bearer {endpoints.bad_key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body) if sent_length is None else sent_length}\r\n\r\n"
    )
    return head.encode() + body


async def _status_line(reader: asyncio.StreamReader) -> str:
    return (await reader.readline()).decode(errors="replace").strip()


async def speech_unread(endpoints: Endpoints) -> Verdict:
    """An OpenAI speech request whose streamed answer is never read past its status line."""
    body = json.dumps({"model": "tts-1", "voice": "alloy", "input": LONG_TEXT}).encode()
    reader, writer = await asyncio.open_connection(sock=await _small_window_socket(endpoints.port))
    try:
        writer.write(_speech_request(endpoints, body))
        status = await _status_line(reader)
        await asyncio.sleep(STALLED_FOR)
    finally:
        writer.close()
    return " 200 " in f"{status} ", status


async def speech_body_never_sent(endpoints: Endpoints) -> Verdict:
    """Headers that announce a body which never comes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", endpoints.port)
    try:
        writer.write(_speech_request(endpoints, b"", sent_length=200))
        began = time.perf_counter()
        status = await _status_line(reader)
        took = time.perf_counter() - began
    finally:
        writer.close()
    return " 408 " in f"{status} ", f"{status} after {took:.0f} s"


async def connection_flood(endpoints: Endpoints) -> Verdict:
    """Sockets opened together, half with a request begun, all reset at once."""
    async def one(i: int) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", endpoints.port)
        if i % 2:
            writer.write(b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            await writer.drain()
        # Linger 0: closed with a reset, as a client that vanishes does.
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()

    results = await asyncio.gather(*(one(i) for i in range(FLOOD_SOCKETS)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    return not failed, f"{FLOOD_SOCKETS - len(failed)} of {FLOOD_SOCKETS} opened and reset"


BAD_CLIENTS: dict[str, Callable[[Endpoints], Awaitable[Verdict]]] = {
    "no_key_idle": no_key_idle,
    "stops_reading": stops_reading,
    "malformed_frame": malformed_frame,
    "oversize_frame": oversize_frame,
    "lone_surrogate": lone_surrogate,
    "speech_unread": speech_unread,
    "speech_body_never_sent": speech_body_never_sent,
    "connection_flood": connection_flood,
}


@dataclass
class BadOutcome:
    kind: str
    expected: bool
    detail: str


async def run_bad(kind: str, endpoints: Endpoints) -> BadOutcome:
    try:
        async with asyncio.timeout(BAD_CLIENT_TIMEOUT):
            expected, detail = await BAD_CLIENTS[kind](endpoints)
    except TimeoutError:
        return BadOutcome(kind, False, f"not dealt with in {BAD_CLIENT_TIMEOUT:g} s")
    except Exception as exc:  # the server answered in a way the client did not expect
        return BadOutcome(kind, False, f"{type(exc).__name__}: {exc}")
    return BadOutcome(kind, expected, detail)


async def bad_clients(endpoints: Endpoints, stop: asyncio.Event, every: float) -> list[BadOutcome]:
    running = []
    for kind in itertools.cycle(BAD_CLIENTS):
        if stop.is_set():
            break
        running.append(asyncio.create_task(run_bad(kind, endpoints)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
    return list(await asyncio.gather(*running))


# -- server health ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Health:
    at_s: float  # since the soak began
    rss_mb: float
    open_fds: int
    tasks: int


async def health(http: httpx.AsyncClient, endpoints: Endpoints, began: float) -> Health:
    text = (await http.get(f"{endpoints.http}/metrics")).text
    values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    return Health(
        round(time.perf_counter() - began, 1), round(values["process_resident_memory_bytes"] / 2**20, 1),
        int(values["process_open_fds"]), int(values["voxflow_event_loop_tasks"]),
    )


async def admitted(http: httpx.AsyncClient, endpoints: Endpoints) -> dict[str, int]:
    return (await http.get(f"{endpoints.http}/health")).json()["admitted"]


async def sampler(http: httpx.AsyncClient, endpoints: Endpoints, began: float, every: float, stop: asyncio.Event) -> list[Health]:
    samples = []
    while not stop.is_set():
        samples.append(await health(http, endpoints, began))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
    return samples


def utterance_summary(log: list[Utterance]) -> dict:
    failed = [u.outcome for u in log if u.outcome != "done"]
    return {
        "utterances": len(log),
        "failed": len(failed),
        "failed_codes": dict(Counter(failed)),
        "underruns": sum(u.underruns for u in log),
        "stall_ms": round(sum(u.stall_s for u in log) * 1000, 1),
        "underrun_pts_s": sorted(pts for u in log for pts in u.stalled_at),
    }


def back_to_idle(before: Health, after: Health) -> dict[str, bool]:
    """The leak targets: the idle server's tasks and descriptors are where they were."""
    return {
        "tasks_back": after.tasks <= before.tasks + TASK_ALLOWANCE,
        "fds_back": after.open_fds <= before.open_fds + FD_ALLOWANCE,
    }


async def warm_up(endpoints: Endpoints, index: int, jitter: float) -> None:
    """One reply per stream before the idle counts are taken, so lazily made pools exist by then."""
    async with AsyncVoxflowClient(endpoints.stream, endpoints.good_key) as client:
        await speak_one(client, REPLIES[index % len(REPLIES)], Utterance(index, time.perf_counter()), jitter)


async def soak(endpoints: Endpoints, args: argparse.Namespace) -> dict:
    # No keep-alive: every scrape has a connection of its own, so the idle counts before and
    # after both include exactly one.
    async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), timeout=30) as http:
        jitter = args.jitter_ms / 1000
        await asyncio.gather(*(warm_up(endpoints, i, jitter) for i in range(args.streams)))
        await asyncio.sleep(2)  # the server closes the warm-up sockets
        idle_before = await health(http, endpoints, time.perf_counter())

        began = time.perf_counter()
        stop, stop_sampling = asyncio.Event(), asyncio.Event()
        log: list[Utterance] = []
        speakers = [asyncio.create_task(speaker(endpoints, i, stop, log, jitter)) for i in range(args.streams)]
        bad = asyncio.create_task(bad_clients(endpoints, stop, args.bad_every))
        samples = asyncio.create_task(sampler(http, endpoints, began, args.sample_seconds, stop_sampling))
        await asyncio.sleep(args.minutes * 60)
        stop_sampling.set()
        series = await samples
        await stop_all(stop, speakers)
        outcomes = await bad

        # Idle again, once the server has closed what the clients left (it gets 30 s for that).
        deadline = time.perf_counter() + 30
        while True:
            idle_after, slots = await health(http, endpoints, began), await admitted(http, endpoints)
            settled = all(back_to_idle(idle_before, idle_after).values()) and not any(slots.values())
            if settled or time.perf_counter() > deadline:
                break
            await asyncio.sleep(1)

    warmup = min(60.0, args.minutes * 15)
    first = next((s for s in series if s.at_s >= warmup), series[-1])
    by_kind: dict[str, dict] = {}
    for outcome in outcomes:
        kind = by_kind.setdefault(outcome.kind, {"runs": 0, "as_expected": 0, "outcomes": Counter(), "unexpected": Counter()})
        kind["runs"] += 1
        kind["as_expected"] += outcome.expected
        kind["outcomes" if outcome.expected else "unexpected"][outcome.detail] += 1
    return {
        **utterance_summary(log),
        "bad_clients": by_kind,
        "warmup_s": warmup,
        "rss_after_warmup_mb": first.rss_mb,
        "rss_end_mb": series[-1].rss_mb,
        "rss_growth": round(series[-1].rss_mb / first.rss_mb - 1, 4),
        "idle_before": asdict(idle_before),
        "idle_after": asdict(idle_after),
        "back_to_idle": back_to_idle(idle_before, idle_after),
        "admitted_after": slots,
        "health": [asdict(s) for s in series],
    }


# -- faults ----------------------------------------------------------------------------------


async def kill_and_restart(server: ServerProcess, endpoints: Endpoints, args: argparse.Namespace) -> dict:
    stop = asyncio.Event()
    log: list[Utterance] = []
    speakers = [asyncio.create_task(speaker(endpoints, i, stop, log, args.jitter_ms / 1000)) for i in range(args.streams)]

    def hearing() -> set[int]:
        return {u.client for u in log if u.first_audio is not None and u.ended is None}

    await wait_until(lambda: len(hearing()) == args.streams, 60)
    mid_utterance = len(hearing())
    killed = time.perf_counter()
    server.kill()
    ready_s = await server.start()

    def back() -> dict[int, float]:
        """Per client: seconds from the kill to the first audio it heard again."""
        firsts: dict[int, float] = {}
        for u in log:
            if u.first_audio is not None and u.first_audio > killed:
                firsts[u.client] = min(firsts.get(u.client, 1e9), u.first_audio - killed)
        return firsts

    await wait_until(lambda: len(back()) == args.streams, RECOVERY_TIMEOUT)
    await asyncio.sleep(args.carry_on_seconds)  # and they go on speaking
    await stop_all(stop, speakers)
    recovered = back()
    return {
        "streams_mid_utterance_at_kill": mid_utterance,
        "server_ready_after_s": round(ready_s, 2),
        "clients_recovered": len(recovered),
        "all_streaming_again_after_s": round(max(recovered.values()), 2) if len(recovered) == args.streams else None,
        **utterance_summary(log),
    }


@dataclass
class MqttRequest:
    device: int
    sent: float
    ended: float | None = None
    outcome: str = "open"  # "done", an error code, "lost" (the connection dropped) or "timeout"


async def device(broker: Broker, index: int, stop: asyncio.Event, log: list[MqttRequest]) -> None:
    """Say after say; on a dropped connection, reconnect and wait for the bridge's `online`, as
    a careful client does, so no request goes to a broker the server has not rejoined."""
    name = f"soak{index}"
    current: MqttRequest | None = None
    while not stop.is_set():
        try:
            async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5,
                                      identifier=f"{name}-{secrets.token_hex(3)}") as client:
                await client.subscribe("voxflow/status", qos=1)
                for kind in ("event", "error"):
                    await client.subscribe(f"voxflow/{name}/{kind}", qos=1)
                async for message in client.messages:
                    if message.topic.matches("voxflow/status") and message.payload == b"online":
                        break
                for n in itertools.count():
                    if stop.is_set():
                        return
                    current = MqttRequest(index, time.perf_counter())
                    log.append(current)
                    request_id = f"{name}-{len(log)}"
                    payload = {"text": SIX_WORDS[(index + n) % len(SIX_WORDS)], "id": request_id}
                    try:
                        async with asyncio.timeout(REQUEST_TIMEOUT):
                            await client.publish(f"voxflow/{name}/say", json.dumps(payload), qos=1)
                            async for message in client.messages:
                                if message.topic.matches("voxflow/status"):
                                    continue
                                event = json.loads(bytes(message.payload))
                                if event.get("id") == request_id and event["type"] in ("done", "error"):
                                    current.outcome = "done" if event["type"] == "done" else event["code"]
                                    break
                    except TimeoutError:
                        current.outcome = "timeout"
                    current.ended = time.perf_counter()
        except aiomqtt.MqttError:
            if current is not None and current.ended is None:
                current.outcome, current.ended = "lost", time.perf_counter()
            await asyncio.sleep(0.2)


async def broker_restart(broker: Broker, args: argparse.Namespace) -> dict:
    stop = asyncio.Event()
    log: list[MqttRequest] = []
    devices = [asyncio.create_task(device(broker, i, stop, log)) for i in range(args.mqtt_devices)]

    def served_since(t: float) -> dict[int, float]:
        """Per device: seconds from t to the end of its first request sent after t and done."""
        firsts: dict[int, float] = {}
        for r in log:
            if r.sent >= t and r.outcome == "done" and r.ended is not None:
                firsts[r.device] = min(firsts.get(r.device, 1e9), r.ended - t)
        return firsts

    began = time.perf_counter()
    await wait_until(lambda: len(served_since(began)) == args.mqtt_devices, 60)
    restarted = time.perf_counter()
    await asyncio.to_thread(broker.restart)
    down_s = time.perf_counter() - restarted
    await wait_until(lambda: len(served_since(restarted)) == args.mqtt_devices, RECOVERY_TIMEOUT)
    await asyncio.sleep(args.carry_on_seconds)
    await stop_all(stop, devices)
    recovered = served_since(restarted)
    outcomes = [r.outcome for r in log if r.outcome != "done"]
    return {
        "devices": args.mqtt_devices,
        "broker_restart_s": round(down_s, 2),
        "devices_recovered": len(recovered),
        "all_served_again_after_s": round(max(recovered.values()), 2) if len(recovered) == args.mqtt_devices else None,
        "requests": len(log),
        "lost": len(outcomes),
        "lost_outcomes": dict(Counter(outcomes)),
    }


# -- report ----------------------------------------------------------------------------------


async def run(server: ServerProcess, broker: Broker, endpoints: Endpoints, args: argparse.Namespace) -> dict:
    await server.start()
    return {
        "soak": await soak(endpoints, args),
        "kill_9": await kill_and_restart(server, endpoints, args),
        "broker_restart": await broker_restart(broker, args),
    }


def seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak phase")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--jitter-ms", type=float, default=100.0)
    parser.add_argument("--bad-every", type=float, default=2.0, help="seconds between bad clients")
    parser.add_argument("--sample-seconds", type=float, default=10.0, help="seconds between health samples")
    parser.add_argument("--mqtt-devices", type=int, default=4)
    parser.add_argument("--carry-on-seconds", type=float, default=10.0, help="load kept on after a fault's recovery")
    parser.add_argument("--out", default="benchmarks/results/soak.json")
    add_check_flag(parser)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="voxflow-soak-"))
    endpoints = Endpoints(free_port(), secrets.token_hex(16), secrets.token_hex(16))
    broker = start_mosquitto()
    server = ServerProcess(
        endpoints.port, ("--mqtt", broker.url),
        {"VOXFLOW_API_KEYS": f"{endpoints.good_key},{endpoints.bad_key}", "VOXFLOW_CACHE_ENABLED": "false"},
        workdir / "server.log",
    )
    try:
        figures = asyncio.run(run(server, broker, endpoints, args))
    finally:
        server.stop()
        broker.stop()
        shutil.rmtree(broker.directory, ignore_errors=True)
    print(f"server log: {server.log_path}\n")

    s, k, b = figures["soak"], figures["kill_9"], figures["broker_restart"]
    before, after = s["idle_before"], s["idle_after"]
    bad_runs = sum(v["runs"] for v in s["bad_clients"].values())
    bad_ok = sum(v["as_expected"] for v in s["bad_clients"].values())
    targets = {
        "no_underruns": s["underruns"] == 0,
        "no_failed_utterances": s["failed"] == 0,
        "bad_clients_answered": bad_ok == bad_runs,
        "rss_growth": s["rss_growth"] <= RSS_GROWTH_LIMIT,
        **s["back_to_idle"],
        "admission_released": not any(s["admitted_after"].values()),
        "kill_9_recovered": k["all_streaming_again_after_s"] is not None,
        # Only the replies in flight at the kill may fail.
        "kill_9_failed_only_in_flight": k["failed"] <= args.streams,
        "broker_recovered": b["all_served_again_after_s"] is not None,
        "broker_lost_only_in_flight": b["lost"] <= args.mqtt_devices,
    }
    rows = [
        (f"soak: {args.streams} streams for {args.minutes:g} min, utterances / failed", f"{s['utterances']} / {s['failed']}", "0 failed"),
        (f"soak: underruns ({args.jitter_ms:g} ms jitter buffer)", f"{s['underruns']} ({s['stall_ms']:.0f} ms stalled)", "0"),
        ("soak: bad clients answered as expected", f"{bad_ok} of {bad_runs}", "all"),
        (f"soak: RSS after {s['warmup_s']:g} s warm-up -> end", f"{s['rss_after_warmup_mb']:.0f} -> {s['rss_end_mb']:.0f} MB ({s['rss_growth']:+.1%})",
         f"<= +{RSS_GROWTH_LIMIT:.0%}"),
        ("soak: event-loop tasks idle before -> after", f"{before['tasks']} -> {after['tasks']}", f"<= before + {TASK_ALLOWANCE}"),
        ("soak: open fds idle before -> after", f"{before['open_fds']} -> {after['open_fds']}", f"<= before + {FD_ALLOWANCE}"),
        ("soak: admission slots held after", str(sum(s["admitted_after"].values())), "0"),
        ("kill -9: new server ready / every client streaming again", f"{seconds(k['server_ready_after_s'])} / {seconds(k['all_streaming_again_after_s'])}",
         "all clients back"),
        ("kill -9: utterances failed", f"{k['failed']} of {k['utterances']} ({k['streams_mid_utterance_at_kill']} mid-utterance)",
         f"<= {args.streams} (in flight)"),
        ("broker restart: broker down / every device served again", f"{seconds(b['broker_restart_s'])} / {seconds(b['all_served_again_after_s'])}",
         "all devices back"),
        ("broker restart: requests lost", f"{b['lost']} of {b['requests']}", f"<= {args.mqtt_devices} (in flight)"),
    ]
    for kind, v in s["bad_clients"].items():
        seen = "; ".join(f"{n}x {detail}" for detail, n in (v["unexpected"] + v["outcomes"]).most_common())
        rows.append((f"  bad client {kind}: as expected", f"{v['as_expected']} of {v['runs']} ({seen})", ""))
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "check")}
    result = {**stamp(), "settings": settings, **figures, "targets": targets}
    print_table(rows)
    write_json(args.out, result)
    finish([name for name, met in targets.items() if not met], args.check)


if __name__ == "__main__":
    main()
