"""The agent's event graph (voxflow/agent/graph.py) with small toy nodes: order, bounded inboxes,
interruption that overtakes data, errors that do not end the conversation, and closing."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from voxflow.agent.events import AgentError
from voxflow.agent.frames import Interruption
from voxflow.agent.graph import INBOX_FRAMES, Clock, Graph, Node
from voxflow.errors import VoxflowError
from waiting import until


@dataclass(frozen=True)
class Item:
    turn: int
    n: int = 0


class Pass(Node):
    """Forwards every frame, optionally waiting at a gate first."""

    def __init__(self, name: str = "pass", *, interruptible: bool = False, gate: asyncio.Event | None = None) -> None:
        super().__init__()
        self.name = name
        self.interruptible = interruptible
        self.gate = gate
        self.started: list[object] = []  # frames whose process began
        self.finished: list[object] = []  # frames whose process ran to its end
        self.interrupts: list[Interruption] = []
        self.closed = False

    async def process(self, frame: object) -> None:
        self.started.append(frame)
        if self.gate is not None:
            await self.gate.wait()
        self.finished.append(frame)
        await self.emit(frame)

    def interrupt(self, frame: Interruption) -> None:
        self.interrupts.append(frame)

    async def aclose(self) -> None:
        self.closed = True


class Sink(Node):
    """The last node: keeps what reaches it."""

    name = "sink"

    def __init__(self, *, interruptible: bool = False) -> None:
        super().__init__()
        self.interruptible = interruptible
        self.got: list[object] = []
        self.interrupts: list[Interruption] = []
        self.closed = False

    async def process(self, frame: object) -> None:
        self.got.append(frame)

    def interrupt(self, frame: Interruption) -> None:
        self.interrupts.append(frame)

    async def aclose(self) -> None:
        self.closed = True


class Faulty(Node):
    """Fails on the frames it is told to, with a VoxflowError or a plain exception."""

    name = "faulty"

    async def process(self, frame: Item) -> None:
        if frame.n == 1:
            raise VoxflowError("the toy model broke", code="toy_failure")
        if frame.n == 2:
            raise ZeroDivisionError("division by zero")
        await self.emit(frame)


async def settle(rounds: int = 50) -> None:
    """Let every ready task run as far as it can (loop iterations, not wall time)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def make_graph(*nodes: Node) -> tuple[Graph, list]:
    events: list = []
    graph = Graph(list(nodes), Clock(), events.append)
    graph.start()
    return graph, events


def own_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("voxflow-agent-") and not t.done()]


async def test_frames_flow_through_in_order() -> None:
    first, second, sink = Pass("a"), Pass("b"), Sink()
    graph, events = make_graph(first, second, sink)
    try:
        frames = [Item(1, n) for n in range(3 * INBOX_FRAMES)]  # more than one inbox holds
        for frame in frames:
            await graph.put(frame)
        await until(lambda: len(sink.got) >= len(frames), 10)
        assert sink.got == frames
        assert first.finished == frames and second.finished == frames
        assert events == []
    finally:
        await graph.aclose()


async def test_last_node_cannot_emit() -> None:
    sink = Sink()
    graph, _ = make_graph(sink)
    try:
        with pytest.raises(RuntimeError, match="last node"):
            await graph.forward(sink, Item(1))
    finally:
        await graph.aclose()


async def test_a_full_inbox_makes_the_producer_wait() -> None:
    gate = asyncio.Event()
    first, blocked, sink = Pass("first"), Pass("blocked", gate=gate), Sink()
    graph, _ = make_graph(first, blocked, sink)
    try:
        accepted = 0
        pending = None
        for n in range(4 * INBOX_FRAMES):
            put = asyncio.create_task(graph.put(Item(1, n)))
            await settle()
            if not put.done():
                pending = put
                break
            accepted += 1
        # One frame in `blocked`'s process, a full inbox behind it, one frame held in
        # `first`'s emit, and a full inbox in front of that: then the producer waits.
        assert pending is not None, "the producer was never held back"
        assert accepted == 1 + INBOX_FRAMES + 1 + INBOX_FRAMES
        assert blocked.inbox.full() and first.inbox.full()
        assert sink.got == []
        await settle()
        assert not pending.done()  # still waiting: nothing moved
        gate.set()
        await asyncio.wait_for(pending, 10)
        await until(lambda: len(sink.got) >= accepted + 1, 10)
        assert [f.n for f in sink.got] == list(range(accepted + 1))
    finally:
        await graph.aclose()


async def test_interrupt_overtakes_data_on_the_reply_side_only() -> None:
    hearing_gate, reply_gate = asyncio.Event(), asyncio.Event()
    hearing = Pass("hearing", gate=hearing_gate)  # not interruptible: the person's side
    reply = Pass("reply", interruptible=True, gate=reply_gate)
    output = Sink(interruptible=True)
    graph, events = make_graph(hearing, reply, output)
    try:
        # The reply node is stuck in process on frame 0, with frames 1..5 waiting behind it.
        for n in range(6):
            await reply.inbox.put(Item(1, n))
        await output.inbox.put(Item(1, 99))  # queued for the output, not taken yet
        # The hearing node is in process on frame 10, with 11..15 waiting.
        for n in range(10, 16):
            await hearing.inbox.put(Item(2, n))
        await settle()
        assert [f.n for f in reply.started] == [0]
        assert [f.n for f in hearing.started] == [10]
        assert [f.n for f in output.got] == [99]  # the output took its frame already
        await output.inbox.put(Item(1, 98))  # and this one waits (the output is not scheduled yet)
        old_reply_task = graph._tasks[id(reply)]
        old_hearing_task = graph._tasks[id(hearing)]

        cut = Interruption(turn=2, decided_at=1.5)
        graph.interrupt(cut)
        # Synchronous: before any other task runs, the reply side is already stopped.
        assert reply.interrupts == [cut] and output.interrupts == [cut]
        assert reply.inbox.empty() and output.inbox.empty()
        assert old_reply_task.cancelling() or old_reply_task.cancelled()
        assert graph._tasks[id(reply)] is not old_reply_task  # a fresh task for what comes next
        # The hearing side is untouched: its data and its half-done frame stay.
        assert hearing.interrupts == []
        assert hearing.inbox.qsize() == 5
        assert graph._tasks[id(hearing)] is old_hearing_task and not old_hearing_task.cancelling()

        reply_gate.set()
        hearing_gate.set()
        await until(lambda: len(hearing.finished) >= 6 and len(output.got) >= 1 + 6, 10)
        await settle()
        # Frame 0 was cancelled mid-process and never resumed; 1..5 were dropped.
        assert [f.n for f in reply.finished if f.turn == 1] == []
        # The hearing side finished every frame, in order, and the reply side, on its fresh
        # task, handled what the hearing side sent after the interruption.
        assert [f.n for f in hearing.finished] == list(range(10, 16))
        assert [f.n for f in output.got] == [99, *range(10, 16)]
        assert old_reply_task.cancelled()
        assert events == []
    finally:
        await graph.aclose()


async def test_interrupt_with_nothing_in_flight_leaves_the_graph_working() -> None:
    reply, output = Pass("reply", interruptible=True), Sink(interruptible=True)
    graph, _ = make_graph(reply, output)
    try:
        graph.interrupt(Interruption(1, 0.0))
        graph.interrupt(Interruption(2, 0.0))
        assert len(reply.interrupts) == 2
        for n in range(3):
            await graph.put(Item(3, n))
        await until(lambda: len(output.got) >= 3, 10)
        assert [f.n for f in output.got] == [0, 1, 2]
        # Exactly one task per node: the replaced ones are gone.
        await settle()
        assert sorted(t.get_name() for t in own_tasks()) == ["voxflow-agent-reply", "voxflow-agent-sink"]
    finally:
        await graph.aclose()


async def test_a_failing_frame_reports_an_error_and_the_next_frames_go_on(caplog: pytest.LogCaptureFixture) -> None:
    faulty, sink = Faulty(), Sink()
    graph, events = make_graph(faulty, sink)
    try:
        for n in (0, 1, 3, 2, 4):
            await graph.put(Item(7, n))
        await until(lambda: len(sink.got) >= 3, 10)
        await settle()
        assert [f.n for f in sink.got] == [0, 3, 4]
        assert [type(e) for e in events] == [AgentError, AgentError]
        typed, internal = events
        assert (typed.code, typed.turn) == ("toy_failure", 7)
        assert "toy model broke" in typed.message
        assert (internal.code, internal.turn) == ("internal_error", 7)
        assert "faulty" in internal.message
        assert "division by zero" not in internal.message  # no internals leak into the event
        assert any("faulty failed" in r.getMessage() for r in caplog.records)  # logged for the operator
        # A frame with no turn gives an error with turn None.
        await graph.put(Item(None, 1))  # type: ignore[arg-type]
        await until(lambda: len(events) >= 3, 10)
        assert events[2].turn is None and events[2].code == "toy_failure"
    finally:
        await graph.aclose()


async def test_aclose_leaves_no_task_running() -> None:
    before = asyncio.all_tasks()
    gate = asyncio.Event()  # never set: the nodes are stuck in process when the graph closes
    hearing, reply, output = Pass("hearing", gate=gate), Pass("reply", interruptible=True, gate=gate), Sink(interruptible=True)

    class Broken(Sink):
        async def aclose(self) -> None:
            raise RuntimeError("cannot close")

    broken = Broken()
    broken.name = "broken"
    graph, _ = make_graph(hearing, reply, output)
    graph.nodes.append(broken)  # a node whose aclose fails must not stop the others closing
    await graph.put(Item(1, 0))
    await reply.inbox.put(Item(1, 1))
    await settle()
    graph.interrupt(Interruption(2, 0.0))  # leaves replaced, cancelled tasks behind
    await reply.inbox.put(Item(2, 2))
    await settle()
    assert hearing.started and reply.started
    await graph.aclose()
    assert asyncio.all_tasks() - before == set()
    assert hearing.closed and reply.closed and output.closed
    assert hearing.finished == [] and reply.finished == []


async def test_aclose_also_waits_for_tasks_an_interruption_replaced() -> None:
    """A cancelled reply task may need a few awaits to let go of what it holds (closing an LLM's
    HTTP response); closing the graph right after an interruption still waits for it."""
    before = asyncio.all_tasks()
    released: list[int] = []

    class Holding(Node):
        interruptible = True
        name = "holding"

        async def process(self, frame: Item) -> None:
            try:
                await asyncio.Event().wait()
            finally:
                await asyncio.sleep(0.05)  # e.g. closing a response over the network
                released.append(frame.n)

    graph, _ = make_graph(Holding(), Sink())
    await graph.put(Item(1, 0))
    await settle()
    graph.interrupt(Interruption(2, 0.0))
    await asyncio.sleep(0.01)  # the replaced task is now unwinding
    await graph.aclose()
    assert released == [0]
    assert asyncio.all_tasks() - before == set()
