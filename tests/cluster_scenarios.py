"""What happens to SDK clients streaming through HAProxy while replicas restart or crash.

The scenarios are shared: tests/test_cluster.py asserts what must hold (nothing lost, nobody
else disturbed), benchmarks/cluster.py reports how long it took against its targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass, field

from cluster_harness import Cluster, Replica
from voxflow.client import AsyncVoxflowClient, Audio, Done, Error, Ready
from waiting import until

SENTENCE = "The lights in the kitchen are off now."
SEED = 7  # the same sentence and seed give the same speech on every replica
# Refusals of an utterance that had not started: the server is draining (a context opened just
# as it began) or the connection was closing under it. Nothing was spoken, so it is said again.
RETRIED_BEFORE_AUDIO = frozenset({"draining", "connection_lost"})
TIMEOUT = 120.0  # bounds a hang only


@dataclass
class Speaker:
    """An SDK client speaking one utterance after another, each played in real time."""

    client: AsyncVoxflowClient
    text: str = SENTENCE
    spoken: list[float] = field(default_factory=list)  # seconds of audio of each whole utterance
    retried: list[str] = field(default_factory=list)  # codes of utterances refused before any audio
    cut: list[str] = field(default_factory=list)  # utterances that ended after their audio began
    connections: list[Ready] = field(default_factory=list)  # each connection it spoke on, in order

    async def say(self) -> float:
        """One whole utterance: said again while refused before any audio; its seconds of audio."""
        while True:
            audio = 0.0
            async with self.client.context(seed=SEED) as ctx:
                self._note_connection()
                ctx.push(self.text)
                ctx.end()
                async for event in ctx:
                    if isinstance(event, Audio):
                        audio += event.duration
                    elif isinstance(event, Done):
                        self.spoken.append(audio)
                        return audio
                    elif isinstance(event, Error):
                        if audio == 0 and event.code in RETRIED_BEFORE_AUDIO:
                            self.retried.append(event.code)
                        else:
                            self.cut.append(f"{event.code} after {audio:.2f} s: {event.message}")
                        break

    async def run(self, stop: asyncio.Event) -> None:
        """Utterances back to back, the next once the last has played, until `stop`."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            started = loop.time()
            audio = await self.say()
            await asyncio.sleep(max(0.0, audio - (loop.time() - started)))

    def _note_connection(self) -> None:
        ready = self.client.ready
        if ready is not None and (not self.connections or self.connections[-1] is not ready):
            self.connections.append(ready)


@contextlib.asynccontextmanager
async def speaking(url: str, keys: list[str]):
    """One looping Speaker per key, each on a client of its own, until the block exits (each
    finishes the utterance it is in)."""
    speakers = [Speaker(AsyncVoxflowClient(url, api_key=key)) for key in keys]
    stop = asyncio.Event()
    loops = [asyncio.create_task(s.run(stop)) for s in speakers]
    try:
        await until(lambda: all(s.spoken for s in speakers) or any(t.done() for t in loops), TIMEOUT)
        yield speakers
    finally:
        stop.set()
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*loops)
        for speaker in speakers:
            await speaker.client.aclose()


@dataclass
class RestartResult:
    replica: str
    exit_status: int
    drained_s: float  # SIGTERM to exit
    back_s: float  # exit to HAProxy sending it work again


async def rolling_restart(cluster: Cluster, speakers: list[Speaker]) -> list[RestartResult]:
    """SIGTERM each replica in turn, start it again and wait until HAProxy has it back, while
    the speakers go on; after each, every speaker says one more utterance before the next."""
    loop = asyncio.get_running_loop()
    results = []
    for replica in cluster.replicas:
        sent = loop.time()
        status = await asyncio.to_thread(replica.terminate)
        exited = loop.time()
        await asyncio.to_thread(cluster.restart, replica)
        results.append(RestartResult(replica.name, status, exited - sent, loop.time() - exited))
        counts = [len(s.spoken) for s in speakers]
        await until(lambda: all(len(s.spoken) > n for s, n in zip(speakers, counts)), TIMEOUT)
    return results


def drained_cleanly(status: int) -> bool:
    """uvicorn re-raises the SIGTERM it caught once it has shut down, so either is a clean exit."""
    return status in (0, -signal.SIGTERM)


@dataclass
class CrashResult:
    replica: str
    on_replica: int  # connections the replica held when it was killed
    moved: list[int]  # indices of the speakers whose connection went with it
    reconnect_s: list[float]  # kill to each moved speaker's new connection
    spoke_again_s: list[float]  # kill to each moved speaker's next whole utterance


async def crash(cluster: Cluster, speakers: list[Speaker], victim: Replica) -> CrashResult:
    """kill -9 one replica mid-stream; wait until the speakers it held have a new connection
    through HAProxy and have spoken again; start it again."""
    loop = asyncio.get_running_loop()
    on_replica = (await asyncio.to_thread(cluster.connections))[victim.name]
    before = [s.client.ready for s in speakers]
    spoken = [len(s.spoken) for s in speakers]
    killed = loop.time()
    await asyncio.to_thread(victim.kill)
    reconnected: dict[int, float] = {}
    spoke: dict[int, float] = {}

    def moved_and_spoke() -> bool:
        now = loop.time()
        for i, speaker in enumerate(speakers):
            ready = speaker.client.ready
            if i not in reconnected and ready is not None and ready is not before[i]:
                reconnected[i] = now - killed
            if i in reconnected and i not in spoke and speaker.connections[-1] is ready and len(speaker.spoken) > spoken[i]:
                spoke[i] = now - killed
        return len(spoke) >= on_replica

    await until(moved_and_spoke, TIMEOUT)
    await asyncio.to_thread(cluster.restart, victim)
    moved = sorted(reconnected)
    return CrashResult(victim.name, on_replica, moved, [reconnected[i] for i in moved], [spoke[i] for i in moved if i in spoke])
