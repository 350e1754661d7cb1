"""WebRTC sessions on a live server, driven by an aiortc peer in the test process over loopback;
plus the session's audio pieces on their own."""

from __future__ import annotations

import asyncio
import wave
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
import soxr
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from server_harness import RunningServer, run_server
from test_webrtc_signaling import BROWSER_OFFER
from voxflow.streaming.engine import Engine
from voxflow.transports.protocols.native_protocol import (
    Cancel,
    Cancelled,
    Done,
    Error,
    Metrics,
    Ping,
    Pong,
    Ready,
    Start,
    Started,
    Text,
    Word,
    parse_server,
    serialize_client,
)
from voxflow.transports.webrtc.signaling import enable_loopback_candidates
from voxflow.transports.webrtc.tracks import (
    FRAME_SAMPLES,
    Downsampler,
    Microphone,
    Pacer,
    PlayoutQueue,
    PlayoutTrack,
)
from waiting import until

SENTENCE = "Hello there, this is a short test of the voice."
PARAGRAPH = (
    "Sure, I can help with that. The weather tomorrow looks mild, with a light breeze in the "
    "morning and some sun in the afternoon. If you are heading out, a thin jacket should be enough."
)
SILENT_RMS = 30.0  # Opus-decoded silence is near zero; speech is in the thousands
SPEECH_RMS = 300.0


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) if pcm.size else 0.0


# -- the audio pieces -------------------------------------------------------------------------


def test_pacer_keeps_to_the_clock_and_skips_instead_of_bursting():
    pacer = Pacer(period=0.02, max_lag_frames=3)
    assert pacer.next(100.0) == (0, 0.0)
    index, wait = pacer.next(100.001)
    assert index == 1 and wait == pytest.approx(0.019)
    # A consumer 1 s late gets three frames at once, then waits again; the skipped frames
    # leave their time in the indices.
    late = [pacer.next(101.0) for _ in range(5)]
    assert [wait for _, wait in late[:4]] == [0.0] * 4
    assert late[4][1] > 0
    assert late[0][0] == 50 - 3


async def test_playout_queue_waits_for_room_and_discards_one_context():
    queue = PlayoutQueue(max_frames=3)
    for pcm in (b"a1", b"b1", b"a2"):
        await queue.wait_for_room()
        queue.append(pcm[:1].decode(), pcm)
    waiter = asyncio.create_task(queue.wait_for_room())
    await asyncio.sleep(0.01)
    assert not waiter.done()  # full
    assert queue.discard("a") == 2
    await asyncio.wait_for(waiter, 1)
    assert queue.pop() == b"b1" and queue.pop() is None


async def test_the_track_plays_queued_frames_then_silence_at_48k():
    queue = PlayoutQueue(max_frames=10)
    speech = np.full(FRAME_SAMPLES, 1000, "<i2").tobytes()
    queue.append("c", speech)
    track = PlayoutTrack(queue)
    frames = [await track.recv() for _ in range(3)]
    track.stop()
    assert [f.pts for f in frames] == [0, FRAME_SAMPLES, 2 * FRAME_SAMPLES]
    assert all(f.sample_rate == 48000 and f.samples == FRAME_SAMPLES for f in frames)
    assert frames[0].to_ndarray().tobytes() == speech
    assert not frames[1].to_ndarray().any()
    with pytest.raises(MediaStreamError):
        await track.recv()


async def test_the_microphone_comes_out_at_16k_mono_and_drops_its_oldest():
    tone = (np.sin(np.arange(960) * 2 * np.pi * 440 / 48000) * 8000).astype("<i2")
    stereo = np.stack([tone, tone], axis=1).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(stereo, format="s16", layout="stereo")
    frame.sample_rate = 48000
    down = Downsampler()
    pcm = b"".join(down.process(frame) for _ in range(10))
    assert 10 * 320 - 400 < len(pcm) // 2 <= 10 * 320  # the resampler holds a few hundred samples back
    assert rms(np.frombuffer(pcm, "<i2")[-320:]) == pytest.approx(8000 / np.sqrt(2), rel=0.1)

    mic = Microphone(max_frames=2)
    for n in range(3):
        mic.put(bytes([n]) * 640)
    mic.close()
    frames = [f async for f in mic.frames()]
    assert [f.pcm[0] for f in frames] == [1, 2]
    assert [f.pts for f in frames] == [0.02, 0.04] and frames[0].sample_rate == 16000


# -- a peer in the test process ---------------------------------------------------------------


@dataclass
class Peer:
    pc: RTCPeerConnection
    channel: RTCDataChannel
    session_id: str
    messages: asyncio.Queue = field(default_factory=asyncio.Queue)
    audio: list[tuple[float, int, float]] = field(default_factory=list)  # (arrival, rate, rms)
    pcm: list[tuple[float, np.ndarray]] = field(default_factory=list)  # (arrival, mono int16 samples)
    reader: asyncio.Task | None = None

    def send(self, *messages) -> None:
        for msg in messages:
            self.channel.send(msg if isinstance(msg, (str, bytes)) else serialize_client(msg))

    async def next(self, timeout: float = 30):
        return await asyncio.wait_for(self.messages.get(), timeout)

    async def until(self, stop: Callable[[object], bool], timeout: float = 60) -> list:
        events = []
        async with asyncio.timeout(timeout):
            while not events or not stop(events[-1]):
                events.append(await self.messages.get())
        return events

    def loud_frames(self, since: float = 0.0) -> int:
        return sum(1 for at, _, level in self.audio if at >= since and level > SPEECH_RMS)

    def heard(self, start: float, end: float) -> np.ndarray:
        """What arrived on the track between two times (loop clock), as float samples."""
        pieces = [pcm for at, pcm in self.pcm if start <= at <= end]
        return np.concatenate(pieces).astype(np.float32) / 32768 if pieces else np.zeros(0, np.float32)

    async def close(self) -> None:
        await self.pc.close()
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)


async def _read_audio(track: MediaStreamTrack, peer: Peer) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        pcm = frame.to_ndarray()
        arrival = loop.time()
        peer.audio.append((arrival, frame.sample_rate, rms(pcm)))
        peer.pcm.append((arrival, pcm.reshape(-1, len(frame.layout.channels)).mean(axis=1).astype(np.int16)))


async def post_offer(server: RunningServer, body: object, headers: dict | None = None) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        return await http.post(f"{server.http}/v1/webrtc/offer", json=body, headers=headers)


async def delete_session(server: RunningServer, session_id: str, headers: dict | None = None) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        return await http.delete(f"{server.http}/v1/webrtc/sessions/{session_id}", headers=headers)


async def connect(server: RunningServer, microphone: MediaStreamTrack | None = None, headers: dict | None = None) -> Peer:
    """What the page does: data channel "voxflow", a sendrecv audio transceiver, one offer."""
    enable_loopback_candidates()
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("voxflow", ordered=True)
    if microphone is not None:
        pc.addTrack(microphone)
    else:
        pc.addTransceiver("audio", direction="sendrecv")
    remote: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
    pc.on("track", lambda track: track.kind == "audio" and not remote.done() and remote.set_result(track))
    await pc.setLocalDescription(await pc.createOffer())
    response = await post_offer(server, {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}, headers)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["type"] == "answer" and answer["session_id"]
    peer = Peer(pc, channel, answer["session_id"])
    channel.on("message", lambda data: peer.messages.put_nowait(parse_server(data)))
    await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
    peer.reader = asyncio.create_task(_read_audio(await asyncio.wait_for(remote, 10), peer))
    ready = await peer.next()
    assert isinstance(ready, Ready) and ready.voices
    return peer


def registry(server: RunningServer):
    return server.server.config.app.state.webrtc_sessions


async def on_server(server: RunningServer, fn: Callable[[], Awaitable]):
    """Runs fn() on the server's loop without blocking this one (the peer lives here)."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fn(), server.loop))


async def server_tasks(server: RunningServer) -> list[str]:
    async def names():
        return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("voxflow-"))
    return await on_server(server, names)


def is_end(context: str) -> Callable[[object], bool]:
    return lambda e: isinstance(e, (Done, Cancelled, Error)) and getattr(e, "context", None) == context


@pytest.fixture(scope="module")
def rtc_server(engine: Engine):
    with run_server(engine, webrtc_loopback=True) as running:
        yield running


@pytest.fixture(scope="module")
def speech_wav(engine: Engine, tmp_path_factory) -> Path:
    """The engine's own speech as a 48 kHz WAV: what the browser's microphone would send."""
    utterance = engine.synthesize(PARAGRAPH)
    audio = soxr.resample(utterance.audio.astype(np.float32), utterance.sample_rate, 48000)
    path = tmp_path_factory.mktemp("mic") / "speech.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(48000)
        out.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return path


# -- sessions -------------------------------------------------------------------------------


async def test_speech_flows_both_ways(rtc_server: RunningServer, speech_wav: Path):
    player = MediaPlayer(str(speech_wav), loop=True)
    peer = await connect(rtc_server, microphone=player.audio)
    try:
        peer.send(Start("a", sample_rate=16000, frame_ms=40), Text("a", SENTENCE, end=True))
        events = await peer.until(is_end("a"))
        started = events[0]
        assert isinstance(started, Started) and (started.sample_rate, started.frame_ms) == (48000, 20)
        assert any(isinstance(e, Word) for e in events)
        assert isinstance(events[-2], Metrics) and events[-2].audio_seconds > 1
        assert isinstance(events[-1], Done)
        await until(lambda: peer.loud_frames() > 25, 15, poll=0.05)  # half a second of speech heard
        assert {rate for _, rate, _ in peer.audio} == {48000}

        async def listen():
            local = rtc_server.state.admission.identify(None, "127.0.0.1")  # who opened it
            session = registry(rtc_server).get(peer.session_id, local)
            frames = []
            async with asyncio.timeout(15):
                async for frame in session.microphone_frames():
                    frames.append(frame)
                    if sum(len(f.pcm) for f in frames) >= 2 * 16000:  # one second
                        break
            return frames

        heard = await on_server(rtc_server, listen)
        assert {f.sample_rate for f in heard} == {16000}
        assert rms(np.frombuffer(b"".join(f.pcm for f in heard), "<i2")) > SPEECH_RMS
        async with httpx.AsyncClient(trust_env=False) as http:
            assert "voxflow_webrtc_sessions 1.0" in (await http.get(f"{rtc_server.http}/metrics")).text
    finally:
        await peer.close()
        player.audio.stop()


async def test_cancel_silences_the_track_at_once(rtc_server: RunningServer):
    peer = await connect(rtc_server)
    try:
        peer.send(Text("long", " ".join([PARAGRAPH] * 3), end=True))
        assert isinstance(await peer.next(), Started)
        await until(lambda: peer.loud_frames() > 25, 20, poll=0.05)
        cancelled_at = asyncio.get_running_loop().time()
        peer.send(Cancel("long"))
        events = await peer.until(is_end("long"))
        assert isinstance(events[-1], Cancelled)
        await asyncio.sleep(2.0)
        # Well over the queue's depth of audio would still be playing without the purge.
        assert peer.loud_frames(since=cancelled_at + 1.0) == 0
        assert len([a for a in peer.audio if a[0] > cancelled_at + 1.0]) > 40  # the stream goes on, silent
    finally:
        await peer.close()


async def test_bad_messages_get_errors_and_sessions_stay_independent(rtc_server: RunningServer):
    first, second = await connect(rtc_server), await connect(rtc_server)
    try:
        first.send("not json", '{"type": "start"}', '{"type": "bogus", "context": "x"}', b"\x01\x02")
        codes = [(await first.next()).code for _ in range(4)]
        assert codes == ["invalid_json", "invalid_request", "unknown_type", "binary_not_expected"]
        first.send(Ping(id=7), Cancel("nothing-open"))
        assert await first.next() == Pong(7)
        assert (await first.next()).code == "unknown_context"
        # Both sessions speak at once, each on its own track.
        first.send(Text("one", SENTENCE, end=True))
        second.send(Text("two", SENTENCE, end=True))
        for peer, context in ((first, "one"), (second, "two")):
            events = await peer.until(is_end(context))
            assert isinstance(events[-1], Done)
            assert not any(getattr(e, "context", None) not in (context,) for e in events)
        await until(lambda: first.loud_frames() > 25 and second.loud_frames() > 25, 15, poll=0.05)
    finally:
        await first.close()
        await second.close()


async def test_offers_that_cannot_be_answered(rtc_server: RunningServer):
    response = await post_offer(rtc_server, {"sdp": "v=0\r\nthis is not sdp\r\n", "type": "offer"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_sdp"
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.post(f"{rtc_server.http}/v1/webrtc/offer", content=b"{", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_sdp"

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("voxflow")
    await pc.setLocalDescription(await pc.createOffer())
    response = await post_offer(rtc_server, {"sdp": pc.localDescription.sdp, "type": "offer"})
    await pc.close()
    assert response.status_code == 400 and response.json()["error"]["code"] == "no_audio"

    # Well-formed, but without ICE credentials: aiortc refuses it, and the session is undone.
    response = await post_offer(rtc_server, {"sdp": BROWSER_OFFER, "type": "offer"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_sdp"

    response = await delete_session(rtc_server, "no-such-session")
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_session"
    assert len(registry(rtc_server)) == 0


async def test_delete_and_a_vanished_peer_both_end_their_session(rtc_server: RunningServer):
    deleted, vanished = await connect(rtc_server), await connect(rtc_server)
    try:
        deleted.send(Text("a", PARAGRAPH, end=True))
        vanished.send(Text("b", PARAGRAPH, end=True))
        assert isinstance(await deleted.next(), Started) and isinstance(await vanished.next(), Started)
        assert len(registry(rtc_server)) == 2

        response = await delete_session(rtc_server, deleted.session_id)
        assert response.status_code == 204
        assert len(registry(rtc_server)) == 1
        await until(lambda: deleted.channel.readyState == "closed", 10, poll=0.05)

        await vanished.close()  # no DELETE: the server notices the peer leaving
        await until(lambda: len(registry(rtc_server)) == 0, 15, poll=0.05)
        await asyncio.sleep(0.5)
        assert await server_tasks(rtc_server) == []
        assert len(rtc_server.state.context_sets) == 0
    finally:
        await deleted.close()
        await vanished.close()


async def test_keys_limits_and_shutdown(engine: Engine):
    auth = {"Authorization": "Bearer secret"}
    peer = None
    try:
        with run_server(engine, webrtc_loopback=True, api_keys=("secret",), max_webrtc_sessions=1) as server:
            response = await post_offer(server, {"sdp": "v=0", "type": "offer"})
            assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
            peer = await connect(server, headers=auth)
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pc.addTransceiver("audio", direction="sendrecv")
            await pc.setLocalDescription(await pc.createOffer())
            response = await post_offer(server, {"sdp": pc.localDescription.sdp, "type": "offer"}, auth)
            await pc.close()
            assert response.status_code == 503 and response.json()["error"]["code"] == "limit_exceeded"
            assert (await delete_session(server, peer.session_id)).status_code == 401
            sessions = registry(server)
            peer.send(Text("c", PARAGRAPH, end=True))
            assert isinstance(await peer.next(), Started)
        # The server shut down with the session open and speaking.
        assert len(sessions) == 0
    finally:
        if peer is not None:
            await peer.close()


async def test_a_quiet_session_times_out_but_a_talking_one_does_not(engine: Engine):
    with run_server(engine, webrtc_loopback=True, webrtc_idle_timeout_seconds=1.0) as server:
        peer = await connect(server)
        try:
            for n in range(4):  # 2 s of pings every half second
                await asyncio.sleep(0.5)
                peer.send(Ping(id=n))
                assert await peer.next() == Pong(n)
            assert len(registry(server)) == 1
            await until(lambda: len(registry(server)) == 0, 10, poll=0.05)
            await until(lambda: peer.channel.readyState == "closed", 10, poll=0.05)
        finally:
            await peer.close()
