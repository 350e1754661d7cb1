"""The bot's voice in real time: the engine makes audio faster than it is spoken, the playout
hands it to the transport one frame per frame duration, so the agent always knows how much
of a reply the person has heard (which is what a barge-in keeps) and can stop it at once.

Frames are handed out `lead` seconds before they are due to be heard, for a transport with a
jitter buffer of its own (a WebRTC track, a client's player); a file writer takes them
exactly when due. Due times fall on a grid of whole frames from the conversation's start.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..streaming.events import AudioFrame
from .graph import Clock


class AudioSink(Protocol):
    """Where the bot's audio goes: a WebRTC track, a WebSocket, a WAV file."""

    sample_rate: int

    async def play(self, frame: AudioFrame, due: float) -> None:
        """One frame, to be heard from `due` (seconds on the agent's clock)."""

    def stop(self, context_id: str) -> None:
        """Drop what the sink itself still holds of that reply (a barge-in)."""


@dataclass(frozen=True)
class ReplyDone:
    """A marker after a reply's last frame: when it comes up, the reply has been heard whole."""

    context_id: str


class Playout:
    def __init__(
        self,
        sink: AudioSink,
        clock: Clock,
        on_start: Callable[[str, float], None],
        on_done: Callable[[str], None],
        *,
        frame_seconds: float,
        lead: float = 0.0,
        capacity_seconds: float = 5.0,
    ) -> None:
        """on_start(context_id, due) when a reply's first frame is handed out; on_done(context_id)
        when its ReplyDone comes up: it was heard whole."""
        self.sink = sink
        self._on_start = on_start
        self._on_done = on_done
        self.clock = clock
        self.frame_seconds = frame_seconds
        self.lead = lead
        self._capacity = max(1, int(capacity_seconds / frame_seconds))
        self._items: collections.deque[AudioFrame | ReplyDone] = collections.deque()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._next_due: float | None = None  # due time of the next frame while audio flows
        self.last_due_end = 0.0  # when the audio handed out so far finishes playing
        self.played: collections.Counter[str] = collections.Counter()  # frames handed out per reply
        self.first_due: dict[str, float] = {}  # when each reply's first frame is heard

    async def put(self, item: AudioFrame | ReplyDone) -> None:
        """Waits while capacity_seconds of audio are queued (holding synthesis to real time)."""
        while len(self._items) >= self._capacity:
            self._room.clear()
            await self._room.wait()
        self._items.append(item)
        self._arrived.set()

    def clear(self, context_id: str) -> float:
        """Drops the queued audio at once; returns when the last frame already handed out ends."""
        self._items.clear()
        self._room.set()
        self.sink.stop(context_id)
        return max(self.clock.now(), self.last_due_end)

    @property
    def idle(self) -> bool:
        """Nothing queued and everything handed out has been heard."""
        return not self._items and self.clock.now() >= self.last_due_end

    def forget(self, context_id: str) -> None:
        """The reply is over; its counts are no longer needed."""
        self.played.pop(context_id, None)
        self.first_due.pop(context_id, None)

    def heard_seconds(self, context_id: str) -> float:
        """How much of a reply has been heard by now (handed-out frames less those not yet due)."""
        first = self.first_due.get(context_id)
        if first is None:
            return 0.0
        handed = self.played[context_id] * self.frame_seconds
        return max(0.0, min(handed, self.clock.now() - first))

    async def run(self) -> None:
        while True:
            if not self._items:
                self._next_due = None  # the audio stopped; the next reply starts on a fresh tick
                self._arrived.clear()
                await self._arrived.wait()
                continue
            item = self._items[0]
            if isinstance(item, ReplyDone):
                # Done once its last frame has been heard, not when it was handed out.
                if (wait := self.last_due_end - self.clock.now()) > 0:
                    await asyncio.sleep(wait)
                    if not self._items or self._items[0] is not item:  # cut meanwhile
                        continue
                self._items.popleft()
                self._room.set()
                self._on_done(item.context_id)
                continue
            due = self._due()
            wait = due - self.lead - self.clock.now()
            if wait > 0:
                await asyncio.sleep(wait)
                if not self._items or self._items[0] is not item:  # cleared meanwhile
                    continue
            self._items.popleft()
            self._room.set()
            self._next_due = due + self.frame_seconds
            self.last_due_end = self._next_due
            if item.context_id not in self.first_due:
                self.first_due[item.context_id] = due
                self._on_start(item.context_id, due)
            self.played[item.context_id] += 1
            await self.sink.play(item, due)

    def _due(self) -> float:
        earliest = self.clock.now() + self.lead
        if self._next_due is not None and self._next_due >= earliest - self.frame_seconds:
            return self._next_due
        # Starting, or so late (a stalled loop) that the frame's slot has passed: the next tick.
        return math.ceil(earliest / self.frame_seconds - 1e-9) * self.frame_seconds
