"""One WebRTC session: a peer connection whose data channel "voxflow" carries the native
protocol's JSON messages and whose audio track carries every context's audio.

Differences from the WebSocket carrier, all due to the audio going out on a real-time track:
- Every context produces 48 kHz, 20 ms frames (`started` says so), whatever `start` asks.
- Audio waits in the session's play-out FIFO (PLAYOUT_SECONDS at most); a full FIFO holds the
  contexts' synthesis back. `word`, `metrics` and `done` go out when the audio is queued, so
  they run ahead of what is heard by up to PLAYOUT_SECONDS.
- `cancel` removes the context's queued audio at once, even when its synthesis has finished
  (then `done`, as on the WebSocket, otherwise `cancelled`); a `cancel` after `done` whose
  audio is still playing silences it and gets no answer.
- A conversation (`listen`) hears the session's microphone track (16 kHz, from the moment of
  `listen`), not binary frames, and speaks into the same FIFO; a barge-in removes the reply's
  queued audio there at once.

A session ends on DELETE, when its data channel or peer connection closes or fails (aiortc
has no "disconnected" state: a peer that vanishes without closing fails its ICE consent checks
after about 30 s), after idle_timeout with no data-channel message, no inbound RTP, no open
context or conversation and no queued audio, on a server drain and at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from ...errors import LimitExceeded, VoxflowError
from ...streaming.events import AudioFrame, StreamEnd, StreamEvent
from ..conversations import ConversationAudio
from ..core.admission import Identity
from ..core.contexts import Disconnected
from ..native_dispatch import NativeDispatch
from ..protocols.native_protocol import Cancel, ClientMessage, Error, Listen, ServerMessage, Word, serialize_server
from .signaling import InvalidSdp, ice_configuration
from .tracks import (
    FRAME_MS,
    MICROPHONE_RATE,
    SAMPLE_RATE,
    Microphone,
    MicrophoneFrame,
    PlayoutQueue,
    PlayoutTrack,
    read_track,
)

if TYPE_CHECKING:
    from ..app import ServerState

_LOGGER = logging.getLogger(__name__)

CHANNEL_LABEL = "voxflow"
PLAYOUT_SECONDS = 5
MICROPHONE_SECONDS = 10  # kept for a reader; older audio is dropped
INBOX_MESSAGES = 256  # data-channel messages waiting to be handled; more are refused
CLOSE_TIMEOUT = 5.0  # for aiortc's own shutdown of the peer connection
# A conversation's reply enters the FIFO this long before it is due, so the track, which takes
# a frame every 20 ms on its own clock, never finds it empty in mid-reply.
REPLY_LEAD_SECONDS = 0.06


class _PlayoutSink:
    """A conversation's reply into the session's play-out FIFO, frame for frame as the track plays it."""

    sample_rate = SAMPLE_RATE

    def __init__(self, playout: PlayoutQueue) -> None:
        self._playout = playout

    async def play(self, frame: AudioFrame, due: float) -> None:
        await self._playout.wait_for_room()
        self._playout.append(frame.context_id, frame.pcm)

    def stop(self, context_id: str) -> None:
        self._playout.discard(context_id)


class _Dispatch(NativeDispatch):
    def __init__(self, session: WebRTCSession, state: ServerState) -> None:
        super().__init__(
            state, session.contexts, session.reply, session.conversation_audio, sample_rate=SAMPLE_RATE, frame_ms=FRAME_MS
        )
        self._playout = session.playout

    async def handle(self, msg: ClientMessage, identity: Identity) -> None:
        if isinstance(msg, Cancel):
            # No await from here to the context's cancel, so no frame of it slips in between.
            dropped = self._playout.discard(msg.context)
            if msg.context in self.contexts:
                self.cancelled.add(msg.context)
            elif dropped:
                return
        await super().handle(msg, identity)


class WebRTCSession:
    def __init__(self, session_id: str, state: ServerState, identity: Identity, on_closed: Callable[[WebRTCSession], None]) -> None:
        config = state.settings.server
        self.id = session_id
        self.state = state
        self.identity = identity
        self.idle_timeout = config.webrtc_idle_timeout_seconds
        self._on_closed = on_closed
        self.pc = RTCPeerConnection(ice_configuration(config.ice_servers))
        self.playout = PlayoutQueue(PLAYOUT_SECONDS * 1000 // FRAME_MS)
        self.track = PlayoutTrack(self.playout)
        self.microphone = Microphone(MICROPHONE_SECONDS * 1000 // FRAME_MS)
        # Once a server drain has let its contexts finish, the session ends.
        self.contexts = state.connection_contexts(self.deliver, after_drain=self.close)
        self.dispatch = _Dispatch(self, state)
        self.channel: RTCDataChannel | None = None
        self._inbox: asyncio.Queue[str | bytes] = asyncio.Queue(INBOX_MESSAGES)
        self._tasks: set[asyncio.Task[None]] = set()
        self._has_microphone = False
        self._closing: asyncio.Task[None] | None = None
        self._last_activity = asyncio.get_running_loop().time()
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_connection_state)

    async def answer(self, offer_sdp: str) -> str:
        """The answer SDP, with every local candidate in it (aiortc gathers before returning)."""
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        except Exception as exc:  # aiortc reports a bad offer with whatever its parser hit
            raise InvalidSdp(f"the offer cannot be used: {exc}"[:300]) from None
        self.pc.addTrack(self.track)  # goes on the browser's audio transceiver
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        if self._closing is not None:  # the server shut down while the answer was gathered
            raise VoxflowError("the server is shutting down", code="draining")
        self.state.context_sets.add(self.contexts)
        self._spawn(self._watch_idle(), "idle")
        return self.pc.localDescription.sdp

    def microphone_frames(self) -> AsyncIterator[MicrophoneFrame]:
        """The browser's microphone as 16 kHz mono PCM16 frames, until the session closes.
        One reader at a time; unread audio older than MICROPHONE_SECONDS is dropped."""
        return self.microphone.frames()

    def conversation_audio(self, listen: Listen) -> ConversationAudio:
        """The audio side of a conversation here: the track both ways, whatever `listen` asks."""
        return ConversationAudio(_PlayoutSink(self.playout), MICROPHONE_RATE, REPLY_LEAD_SECONDS, self._microphone_from_now())

    async def _microphone_from_now(self) -> AsyncIterator[bytes]:
        # What the microphone heard before `listen` was not said to the agent.
        self.microphone.clear()
        async for frame in self.microphone_frames():
            yield frame.pcm

    # -- data channel ---------------------------------------------------------------------

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != CHANNEL_LABEL or self.channel is not None:
            channel.close()
            return
        self.channel = channel
        channel.on("message", self._on_message)
        channel.on("close", self.begin_close)
        # aiortc announces a remote channel once it is open.
        try:
            self._send(self.dispatch.ready())
        except Disconnected:
            self.begin_close()
            return
        self._spawn(self._receive_loop(), "receive")

    def _on_message(self, data: str | bytes) -> None:
        self._touch()
        try:
            self._inbox.put_nowait(data)
        except asyncio.QueueFull:
            exc = LimitExceeded(f"more than {INBOX_MESSAGES} messages waiting; this one was dropped")
            self.state.metrics.errors.labels(exc.code).inc()
            with contextlib.suppress(Disconnected):
                self._send(Error(None, exc.code, str(exc)))

    async def _receive_loop(self) -> None:
        try:
            while True:
                await self.dispatch.receive(await self._inbox.get(), self.identity)
        except Disconnected:
            self.begin_close()

    def _send(self, *messages: ServerMessage) -> None:
        """Messages go out together: a data channel's send only queues, so nothing interleaves."""
        channel = self.channel
        if channel is None or channel.readyState != "open":
            raise Disconnected("the data channel is closed")
        for msg in messages:
            channel.send(serialize_server(msg))

    async def reply(self, msg: ServerMessage) -> None:
        self._send(msg)

    # -- audio ----------------------------------------------------------------------------

    async def deliver(self, event: StreamEvent) -> None:
        """ContextSet's callback; a full play-out FIFO makes it wait (bounded by send_timeout)."""
        if isinstance(event, StreamEnd):
            self._send(*self.dispatch.end_messages(event))
        elif event.context_id in self.dispatch.cancelled:
            return
        elif isinstance(event, AudioFrame):
            await self.playout.wait_for_room()
            if event.context_id not in self.dispatch.cancelled:  # a cancel while waiting
                self.playout.append(event.context_id, event.pcm)
        else:
            self._send(Word(event.context_id, event.word, event.start, event.end))

    def _on_track(self, track: MediaStreamTrack) -> None:
        microphone = None
        if track.kind == "audio" and not self._has_microphone:
            self._has_microphone = True
            microphone = self.microphone
        self._spawn(read_track(track, microphone, self._touch), f"track-{track.kind}")

    # -- lifetime -------------------------------------------------------------------------

    def _touch(self) -> None:
        self._last_activity = asyncio.get_running_loop().time()

    async def _watch_idle(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            remaining = self._last_activity + self.idle_timeout - loop.time()
            if remaining > 0:
                await asyncio.sleep(remaining)
            elif len(self.contexts) or len(self.playout) or self.dispatch.conversation is not None:  # speaking or listening is not idling
                self._touch()
            else:
                _LOGGER.info("WebRTC session %s idle for %g s; closing", self.id, self.idle_timeout)
                self.begin_close()
                return

    def _on_connection_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self.begin_close()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"voxflow-webrtc-{name}-{self.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._end_on_failure)

    def _end_on_failure(self, task: asyncio.Task[None]) -> None:
        # A session task that broke (a bug, not a closed peer) would leave the session half
        # alive: an unread track queues frames without bound in aiortc. It ends the session.
        if not task.cancelled() and task.exception() is not None:
            _LOGGER.error("WebRTC session %s: %s failed", self.id, task.get_name(), exc_info=task.exception())
            self.begin_close()

    def begin_close(self) -> asyncio.Task[None]:
        """Starts closing the session (once), from any callback; returns the closing task."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close(), name=f"voxflow-webrtc-close-{self.id}")
        return self._closing

    async def close(self) -> None:
        # Shielded: the caller going away (a DELETE's client hanging up) must not stop a close.
        await asyncio.shield(self.begin_close())

    async def _close(self) -> None:
        try:
            self.state.context_sets.discard(self.contexts)
            self.microphone.close()
            await self.dispatch.end_conversation()
            await self.contexts.close()  # cancels synthesis
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.track.stop()
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self.pc.close()
            except TimeoutError:
                _LOGGER.warning("WebRTC session %s: the peer connection did not close within %g s", self.id, CLOSE_TIMEOUT)
        finally:
            self._on_closed(self)
