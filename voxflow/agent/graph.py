"""The agent's event graph: a chain of nodes, each with a bounded inbox and one task.

Data frames go from node to node through the inboxes, so a slow node holds the ones before it
back instead of letting audio pile up. An interruption does not queue behind that data: the
graph hands it straight to every node on the reply side (the LLM, the voice, the output),
dropping what waits in their inboxes and cancelling what they are doing, all before control
returns to the event loop. Nodes before the cut (VAD, turns, ASR) keep their data: the
person's own speech is never dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from ..errors import VoxflowError
from .events import AgentError, AgentEvent
from .frames import DataFrame, Interruption

_LOGGER = logging.getLogger(__name__)

INBOX_FRAMES = 64  # per node; about 2 s of 30 ms VAD frames


class Clock:
    """Seconds since the conversation started, on the event loop's monotonic clock."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.origin = self._loop.time()

    def now(self) -> float:
        return self._loop.time() - self.origin


class Node:
    """One step of the graph. Subclasses implement `process` for data frames and, on the
    reply side (`interruptible`), `interrupt` to drop their own work at once."""

    interruptible = False
    name = "node"

    def __init__(self) -> None:
        self.graph: Graph | None = None
        self.inbox: asyncio.Queue[DataFrame] = asyncio.Queue(INBOX_FRAMES)

    async def process(self, frame: DataFrame) -> None:
        raise NotImplementedError

    def interrupt(self, frame: Interruption) -> None:
        """Synchronous, so the whole reply side is stopped before anything else runs."""

    async def emit(self, frame: DataFrame) -> None:
        await self._graph.forward(self, frame)

    def report(self, event: AgentEvent) -> None:
        self._graph.report(event)

    def now(self) -> float:
        return self._graph.clock.now()

    async def aclose(self) -> None:
        """Release what the node holds; its task is already stopped."""

    @property
    def _graph(self) -> Graph:
        assert self.graph is not None, "a node is used only inside a graph"
        return self.graph


class Graph:
    """Runs the nodes in order; the last one's output goes nowhere (it plays audio)."""

    def __init__(self, nodes: Sequence[Node], clock: Clock, report: Callable[[AgentEvent], None]) -> None:
        self.nodes = list(nodes)
        self.clock = clock
        self._report = report
        self._next = {id(node): nxt for node, nxt in zip(self.nodes, self.nodes[1:])}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        # Tasks an interruption replaced: cancelled, but still owned until they have finished
        # unwinding (closing an LLM response takes a few awaits), so aclose waits for them too.
        self._retired: set[asyncio.Task[None]] = set()
        for node in self.nodes:
            node.graph = self

    def start(self) -> None:
        for node in self.nodes:
            self._start(node)

    async def put(self, frame: DataFrame) -> None:
        """A frame into the first node, waiting while its inbox is full."""
        await self.nodes[0].inbox.put(frame)

    async def forward(self, node: Node, frame: DataFrame) -> None:
        nxt = self._next.get(id(node))
        if nxt is None:
            raise RuntimeError(f"{node.name} is the last node; it has nowhere to send {type(frame).__name__}")
        await nxt.inbox.put(frame)

    def report(self, event: AgentEvent) -> None:
        self._report(event)

    def interrupt(self, frame: Interruption) -> None:
        for node in self.nodes:
            if not node.interruptible:
                continue
            while not node.inbox.empty():
                node.inbox.get_nowait()
            # The node's task may be half way through a frame (awaiting the LLM, or room in
            # the next inbox): it is replaced, so none of that frame's work resumes.
            retired = self._tasks[id(node)]
            retired.cancel()
            if not retired.done():
                self._retired.add(retired)
                retired.add_done_callback(self._retired.discard)
            self._start(node)
            node.interrupt(frame)

    async def aclose(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        # The retired ones were cancelled already; cancelling again would cut their unwinding short.
        await asyncio.gather(*tasks, *self._retired, return_exceptions=True)
        for node in self.nodes:
            try:
                await node.aclose()
            except Exception:
                _LOGGER.exception("agent: closing %s failed", node.name)

    def _start(self, node: Node) -> None:
        self._tasks[id(node)] = asyncio.get_running_loop().create_task(self._run(node), name=f"voxflow-agent-{node.name}")

    async def _run(self, node: Node) -> None:
        while True:
            frame = await node.inbox.get()
            try:
                await node.process(frame)
            except VoxflowError as exc:
                self.report(AgentError(self.clock.now(), exc.code, str(exc), getattr(frame, "turn", None)))
            except Exception:
                # One bad frame must not end the conversation; the node goes on with the next.
                _LOGGER.exception("agent: %s failed on %s", node.name, type(frame).__name__)
                self.report(AgentError(self.clock.now(), "internal_error", f"{node.name} failed", getattr(frame, "turn", None)))
