"""Driving a whole voxflow Agent from a test: a sink that records what the bot plays, an event
reader, and feeding that either keeps the microphone's pace or goes as fast as the agent takes
the audio (turns are decided on the audio's own timeline, so a call fed fast has the same turns).

    async with AgentDriver(engine, AgentConfig(), llm=model) as drive:
        await drive.feed(pcm)            # as fast as the agent takes it, 20 ms at a time
        await drive.settle()             # the reply has been played
        drive.bot_audio("reply-1")       # float32 of what the bot said to turn 1
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from voxflow.agent.agent import Agent
from voxflow.agent.events import AgentEvent
from voxflow.config import AgentConfig
from voxflow.streaming.events import AudioFrame
from waiting import until

FEED_MS = 20


class RecordingSink:
    """Keeps every frame the playout hands out, with its due time and when it was handed."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self.played: list[tuple[AudioFrame, float]] = []
        self.stops: list[str] = []

    async def play(self, frame: AudioFrame, due: float) -> None:
        self.played.append((frame, due))

    def stop(self, context_id: str) -> None:
        self.stops.append(context_id)

    def frames(self, context_id: str) -> list[AudioFrame]:
        return [frame for frame, _ in self.played if frame.context_id == context_id]

    def audio(self, context_id: str) -> np.ndarray:
        pcm = b"".join(frame.pcm for frame in self.frames(context_id))
        return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768


class AgentDriver:
    def __init__(self, engine: Any, config: AgentConfig, *, input_rate: int = 16_000, sink_rate: int = 16_000, **agent_options: Any) -> None:
        self._args = (engine, config)
        self._options = agent_options
        self.input_rate = input_rate
        self.sink = RecordingSink(sink_rate)
        self.events: list[AgentEvent] = []
        self.agent: Agent | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AgentDriver:
        engine, config = self._args
        self.agent = Agent(engine, config, self.sink, input_rate=self.input_rate, **self._options)
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="test-agent-events")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        assert self.agent is not None
        await self.agent.aclose()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)  # events() ends once the agent is closed

    async def _read(self) -> None:
        assert self.agent is not None
        async for event in self.agent.events():
            self.events.append(event)

    async def feed(self, pcm: bytes, *, paced: bool = False) -> None:
        """20 ms pieces; paced: each when it would have finished arriving from a microphone."""
        agent = self.agent
        assert agent is not None
        step = self.input_rate * FEED_MS // 1000 * 2
        began = agent.clock.now()
        for index, offset in enumerate(range(0, len(pcm), step)):
            if paced and (wait := began + (index + 1) * FEED_MS / 1000 - agent.clock.now()) > 0:
                await asyncio.sleep(wait)
            await agent.feed(pcm[offset : offset + step])

    async def settle(self, timeout: float = 20.0) -> None:
        """Until nothing is pending: no turn open, no reply written or playing."""
        agent = self.agent
        assert agent is not None
        await until(lambda: agent.quiet and agent.playout.idle and agent.events_waiting == 0, timeout, poll=0.02)

    async def wait_for(self, kind: type, timeout: float = 20.0, **fields: Any) -> Any:
        """The first event of `kind` whose fields match, waiting for it to come."""
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events:
                    if isinstance(event, kind) and all(getattr(event, k) == v for k, v in fields.items()):
                        return event
                await asyncio.sleep(0.01)

    def of(self, kind: type, **fields: Any) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and all(getattr(e, k) == v for k, v in fields.items())]
