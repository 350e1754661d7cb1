"""The agent's playout (voxflow/agent/playout.py) with a recording sink: one frame per frame
duration on a grid of whole frames, handed out `lead` early, cleared at once on a barge-in,
and counting what has been heard.

Due times are deterministic (they come from the grid), so those are asserted exactly; wall
time only gets generous bounds, since the test machine is small and busy.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from voxflow.agent.graph import Clock
from voxflow.agent.playout import Playout, ReplyDone
from voxflow.streaming.events import AudioFrame
from waiting import until

FRAME = 0.02
RATE = 16_000
WAIT = 10.0  # seconds; bounds a hang only


def frame(context_id: str, seq: int) -> AudioFrame:
    samples = round(RATE * FRAME)
    return AudioFrame(context_id, seq, seq * FRAME, RATE, (seq % 100 + 1).to_bytes(2, "little") * samples)


def on_grid(t: float) -> bool:
    return abs(t / FRAME - round(t / FRAME)) < 1e-6


class Recorder:
    """The sink, and the playout's callbacks, writing one log in the order things happen."""

    def __init__(self, clock: Clock) -> None:
        self.sample_rate = RATE
        self.clock = clock
        self.log: list[tuple] = []
        self.played: list[tuple[AudioFrame, float, float]] = []  # frame, due, handed out at
        self.stops: list[str] = []
        self.playout: Playout | None = None
        self.heard_at_play: list[float] = []
        self.idle_at_play: list[bool] = []

    async def play(self, item: AudioFrame, due: float) -> None:
        self.played.append((item, due, self.clock.now()))
        self.log.append(("play", item.context_id, item.seq))
        if self.playout is not None:
            self.heard_at_play.append(self.playout.heard_seconds(item.context_id))
            self.idle_at_play.append(self.playout.idle)

    def stop(self, context_id: str) -> None:
        self.stops.append(context_id)
        self.log.append(("stop", context_id))

    def started(self, context_id: str, due: float) -> None:
        self.log.append(("start", context_id, due))

    def done(self, context_id: str) -> None:
        self.log.append(("done", context_id))

    def dues(self, context_id: str | None = None) -> list[float]:
        return [due for f, due, _ in self.played if context_id is None or f.context_id == context_id]

    def of(self, kind: str) -> list[tuple]:
        return [entry for entry in self.log if entry[0] == kind]


@pytest.fixture
async def rig():
    clock = Clock()
    recorder = Recorder(clock)
    made: list[asyncio.Task] = []

    def build(*, lead: float = 0.0, capacity_seconds: float = 5.0, run: bool = True) -> Playout:
        playout = Playout(recorder, clock, recorder.started, recorder.done, frame_seconds=FRAME, lead=lead, capacity_seconds=capacity_seconds)
        recorder.playout = playout
        if run:
            made.append(asyncio.get_running_loop().create_task(playout.run()))
        return playout

    yield recorder, build, made
    for task in made:
        task.cancel()
    await asyncio.gather(*made, return_exceptions=True)


async def test_frames_go_out_one_per_frame_on_the_grid(rig) -> None:
    recorder, build, _ = rig
    playout = build()
    await asyncio.sleep(0.013)  # start off the grid
    put_at = recorder.clock.now()
    for seq in range(10):
        await playout.put(frame("reply-1", seq))
    await playout.put(ReplyDone("reply-1"))
    await until(lambda: recorder.of("done"), WAIT)
    dues = recorder.dues()
    assert [f.seq for f, _, _ in recorder.played] == list(range(10))
    assert dues[0] >= put_at - 1e-9 and dues[0] < put_at + FRAME + 1e-9  # the next tick
    assert all(on_grid(d) for d in dues)
    assert [round(b - a, 9) for a, b in zip(dues, dues[1:])] == [FRAME] * 9
    # Without lead each frame is handed out when it is due, never before (clock tolerance only).
    assert all(handed >= due - 0.002 for _, due, handed in recorder.played)
    assert recorder.played[-1][2] - recorder.played[0][2] >= 9 * FRAME - 0.005  # real time, not a burst
    assert recorder.played[-1][2] - put_at < 5.0  # and no hang
    assert playout.last_due_end == pytest.approx(dues[-1] + FRAME)


async def test_lead_hands_frames_out_early_by_lead(rig) -> None:
    recorder, build, _ = rig
    lead = 0.5
    playout = build(lead=lead)
    put_at = recorder.clock.now()
    for seq in range(5):
        await playout.put(frame("reply-1", seq))
    await until(lambda: len(recorder.played) == 5, WAIT)
    dues = recorder.dues()
    assert dues[0] >= put_at + lead - 1e-9 and on_grid(dues[0])
    assert [round(b - a, 9) for a, b in zip(dues, dues[1:])] == [FRAME] * 4
    # All five are with the sink before the first is due to be heard...
    assert recorder.played[-1][2] < dues[0]
    # ...but none more than `lead` early.
    assert all(handed >= due - lead - 0.002 for _, due, handed in recorder.played)
    assert playout.last_due_end == pytest.approx(dues[-1] + FRAME)


async def test_on_start_once_per_reply_and_on_done_after_its_frames(rig) -> None:
    recorder, build, _ = rig
    playout = build()
    for context in ("reply-1", "reply-2"):
        for seq in range(4):
            await playout.put(frame(context, seq))
        await playout.put(ReplyDone(context))
    await playout.put(ReplyDone("reply-3"))  # a reply with no audio at all
    await until(lambda: len(recorder.of("done")) == 3, WAIT)
    first1, first2 = recorder.dues("reply-1")[0], recorder.dues("reply-2")[0]
    assert recorder.of("start") == [("start", "reply-1", first1), ("start", "reply-2", first2)]
    # Back to back, the second reply continues the grid without a gap.
    assert first2 == pytest.approx(recorder.dues("reply-1")[-1] + FRAME)
    plays_and_dones = [e for e in recorder.log if e[0] in ("play", "done")]
    assert plays_and_dones == [
        *[("play", "reply-1", s) for s in range(4)], ("done", "reply-1"),
        *[("play", "reply-2", s) for s in range(4)], ("done", "reply-2"),
        ("done", "reply-3"),
    ]
    assert "reply-3" not in playout.first_due and playout.played["reply-3"] == 0


async def test_clear_drops_the_queue_at_once(rig) -> None:
    recorder, build, _ = rig
    playout = build()
    for seq in range(50):
        await playout.put(frame("reply-1", seq))
    await playout.put(ReplyDone("reply-1"))
    await until(lambda: len(recorder.played) >= 3, WAIT)
    handed = len(recorder.played)
    stops_at = playout.clear("reply-1")
    now = recorder.clock.now()
    # Nothing awaited: the sink was told to drop its part, and the end of the audio already
    # handed out is known.
    assert recorder.stops == ["reply-1"]
    last_due = recorder.dues()[-1]
    assert playout.last_due_end == pytest.approx(last_due + FRAME)
    assert stops_at == pytest.approx(max(now, last_due + FRAME), abs=1e-3)
    await asyncio.sleep(0.15)
    assert len(recorder.played) == handed  # not one frame more
    assert recorder.of("done") == []  # its ReplyDone went with the queue: it was not heard whole
    assert playout.idle
    # The playout goes on with the next reply, on a fresh tick.
    resumed_at = recorder.clock.now()
    await playout.put(frame("reply-2", 0))
    await until(lambda: recorder.dues("reply-2"), WAIT)
    assert on_grid(recorder.dues("reply-2")[0]) and recorder.dues("reply-2")[0] >= resumed_at - 1e-9


async def test_clear_returns_the_end_of_the_audio_handed_out(rig) -> None:
    recorder, build, _ = rig
    lead = 1.0
    playout = build(lead=lead)  # with lead, the sink holds audio that is not yet heard
    for seq in range(100):
        await playout.put(frame("reply-1", seq))
    await until(lambda: len(recorder.played) >= 10, WAIT)
    stops_at = playout.clear("reply-1")
    now = recorder.clock.now()
    last_due = recorder.dues()[-1]
    assert stops_at == pytest.approx(max(now, last_due + FRAME), abs=1e-3)
    assert stops_at > now  # the audio handed out ends later than the decision...
    assert stops_at - now <= lead + FRAME + 1e-6  # ...but never more than lead + a frame later


async def test_heard_seconds_counts_what_was_handed_and_due(rig) -> None:
    recorder, build, _ = rig
    playout = build()
    assert playout.heard_seconds("reply-1") == 0.0
    for seq in range(10):
        await playout.put(frame("reply-1", seq))
    await playout.put(ReplyDone("reply-1"))
    await until(lambda: recorder.of("done"), WAIT)
    # At the moment frame k is handed out (when due, lead 0), k frames have been heard.
    for k, heard in enumerate(recorder.heard_at_play):
        assert k * FRAME - 0.003 <= heard <= (k + 1) * FRAME + 1e-9, (k, heard)
    await asyncio.sleep(playout.last_due_end - recorder.clock.now() + 0.01)
    assert playout.heard_seconds("reply-1") == pytest.approx(10 * FRAME)  # never more than handed out
    assert playout.idle
    playout.forget("reply-1")
    assert playout.heard_seconds("reply-1") == 0.0
    assert "reply-1" not in playout.first_due


async def test_idle_follows_queue_and_audio(rig) -> None:
    recorder, build, _ = rig
    playout = build(run=False)
    assert playout.idle
    await playout.put(frame("reply-1", 0))
    await playout.put(frame("reply-1", 1))
    assert not playout.idle  # queued
    task = asyncio.get_running_loop().create_task(playout.run())
    try:
        await until(lambda: len(recorder.played) == 2, WAIT)
        assert recorder.idle_at_play == [False, False]  # a frame being handed out is not yet heard
        due = recorder.dues()[-1]
        await until(lambda: playout.idle, WAIT)
        assert recorder.clock.now() >= due + FRAME  # idle once the last one has been heard
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_put_waits_at_capacity(rig) -> None:
    recorder, build, made = rig
    playout = build(capacity_seconds=0.1, run=False)  # room for 5 items
    for seq in range(5):
        await asyncio.wait_for(playout.put(frame("reply-1", seq)), 5)
    blocked = asyncio.get_running_loop().create_task(playout.put(ReplyDone("reply-1")))
    for _ in range(50):
        await asyncio.sleep(0)
    assert not blocked.done()  # synthesis is held back to real time
    made.append(asyncio.get_running_loop().create_task(playout.run()))
    await asyncio.wait_for(blocked, 5)
    await until(lambda: recorder.of("done"), WAIT)
    assert [f.seq for f, _, _ in recorder.played] == list(range(5))


async def test_after_a_gap_the_next_frame_starts_on_a_fresh_tick(rig) -> None:
    recorder, build, _ = rig
    playout = build()
    for seq in range(3):
        await playout.put(frame("reply-1", seq))
    await until(lambda: len(recorder.played) == 3, WAIT)
    await asyncio.sleep(0.1)  # the queue ran dry
    end_of_first = playout.last_due_end
    resumed_at = recorder.clock.now()
    assert resumed_at > end_of_first
    for seq in range(3, 6):
        await playout.put(frame("reply-1", seq))
    await until(lambda: len(recorder.played) == 6, WAIT)
    dues = recorder.dues()
    # Not the old grid position (which is in the past), but the first tick from now on...
    assert dues[3] >= resumed_at - 1e-9 and dues[3] < resumed_at + FRAME + 1e-9
    assert on_grid(dues[3]) and math.isclose(dues[4] - dues[3], FRAME) and math.isclose(dues[5] - dues[4], FRAME)
    # ...and the reply's first due is still the one from before the gap.
    assert recorder.of("start") == [("start", "reply-1", dues[0])]
