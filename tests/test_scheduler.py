"""The compute threads' earliest-deadline-first executor."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable

import pytest
import torch

from voxflow.config import EngineConfig
from voxflow.streaming.engine import Engine
from voxflow.streaming.scheduler import DeadlineExecutor, Failed, Widening
from waiting import until


def blocked_executor() -> tuple[DeadlineExecutor, threading.Event]:
    """A one-worker executor whose worker is held busy until the returned event is set."""
    executor = DeadlineExecutor(1)
    gate = threading.Event()
    started = threading.Event()
    executor.submit(lambda: (started.set(), gate.wait(10)))
    assert started.wait(10)
    return executor, gate


def test_earliest_deadline_runs_first_and_ties_keep_order():
    executor, gate = blocked_executor()
    ran: list[str] = []
    now = time.perf_counter()
    futures = [
        executor.submit_by(now + 3, ran.append, "late"),
        executor.submit_by(now + 1, ran.append, "soon-a"),
        executor.submit_by(now + 2, ran.append, "middle"),
        executor.submit_by(now + 1, ran.append, "soon-b"),
        executor.submit_by(now - 1, ran.append, "overdue"),
    ]
    gate.set()
    for future in futures:
        future.result(timeout=10)
    assert ran == ["overdue", "soon-a", "soon-b", "middle", "late"]
    executor.shutdown()


def test_plain_submit_is_due_now():
    executor, gate = blocked_executor()
    ran: list[str] = []
    later = executor.submit_by(time.perf_counter() + 60, ran.append, "later")
    now = executor.submit(ran.append, "now")
    gate.set()
    now.result(timeout=10), later.result(timeout=10)
    assert ran == ["now", "later"]
    executor.shutdown()


def test_exceptions_reach_the_caller_and_the_worker_survives():
    executor = DeadlineExecutor(1)
    with pytest.raises(ZeroDivisionError):
        executor.submit(lambda: 1 / 0).result(timeout=10)
    assert executor.submit(lambda: 42).result(timeout=10) == 42
    executor.shutdown()


def test_shutdown_cancels_queued_jobs_and_refuses_new_ones():
    executor, gate = blocked_executor()
    queued = executor.submit(lambda: "never")
    threading.Timer(0.1, gate.set).start()
    executor.shutdown(wait=True, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError):
        executor.submit(lambda: None)


async def test_works_with_asyncio_and_initializer_runs_on_each_worker():
    seen: list[str] = []
    executor = DeadlineExecutor(2, initializer=lambda: seen.append(threading.current_thread().name))
    result = await asyncio.get_running_loop().run_in_executor(executor, lambda: "ok")
    assert result == "ok"
    assert await asyncio.wrap_future(executor.submit_by(time.perf_counter(), lambda: 7)) == 7
    executor.shutdown()
    assert len(seen) == 2


def test_backlog_counts_running_and_queued_jobs():
    executor, gate = blocked_executor()
    try:
        assert executor.backlog() == 1  # the blocked job, running
        queued = [executor.submit(time.sleep, 0) for _ in range(3)]
        assert executor.backlog() == 4
        queued[0].cancel()  # a cancelled job is no work
        assert executor.backlog() == 3
        gate.set()
        for future in queued[1:]:
            future.result(timeout=10)
        deadline = time.monotonic() + 10
        while executor.backlog() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert executor.backlog() == 0
    finally:
        gate.set()
        executor.shutdown()


def recording_batch(calls: list[list[str]]):
    """A batch function that records each call's items and answers each item upper-cased."""

    def run(items):
        calls.append(list(items))
        return [item.upper() for item in items]

    return run


def test_queued_items_with_one_key_run_in_one_call_most_urgent_first():
    executor, gate = blocked_executor()
    calls: list[list[str]] = []
    batch = recording_batch(calls)
    now = time.perf_counter()
    futures = {
        name: executor.submit_batch_by(now + due, key, batch, name)
        for name, due, key in [("c", 3, "k"), ("a", 1, "k"), ("other", 0, "j"), ("b", 2, "k"), ("alone", 0.5, None)]
    }
    gate.set()
    assert {name: f.result(timeout=10) for name, f in futures.items()} == {n: n.upper() for n in futures}
    assert calls == [["other"], ["alone"], ["a", "b", "c"]]
    executor.shutdown()


def test_a_batch_holds_at_most_max_batch_items():
    executor = DeadlineExecutor(1, max_batch=2)
    gate, started = threading.Event(), threading.Event()
    executor.submit(lambda: (started.set(), gate.wait(10)))
    assert started.wait(10)
    calls: list[list[str]] = []
    batch = recording_batch(calls)
    futures = [executor.submit_batch_by(None, "k", batch, name) for name in "abcde"]
    gate.set()
    assert [f.result(timeout=10) for f in futures] == list("ABCDE")
    assert [len(items) for items in calls] == [2, 2, 1]
    executor.shutdown()
    with pytest.raises(ValueError):
        DeadlineExecutor(1, max_batch=0)


def test_one_items_failure_is_its_own_and_a_failed_call_fails_the_batch():
    executor, gate = blocked_executor()

    def picky(items):
        return [Failed(ValueError(item)) if item == "bad" else item for item in items]

    def broken(items):
        raise RuntimeError("broken")

    good, bad = (executor.submit_batch_by(None, "k", picky, item) for item in ("good", "bad"))
    lost = [executor.submit_batch_by(None, "b", broken, item) for item in "xy"]
    gate.set()
    assert good.result(timeout=10) == "good"
    with pytest.raises(ValueError, match="bad"):
        bad.result(timeout=10)
    for future in lost:
        with pytest.raises(RuntimeError, match="broken"):
            future.result(timeout=10)
    assert executor.submit(lambda: 42).result(timeout=10) == 42  # the worker survives
    executor.shutdown()


def test_a_cancelled_item_is_left_out_of_its_batch_and_running_items_count_as_backlog():
    executor, gate = blocked_executor()
    calls: list[list[str]] = []
    inside = threading.Event()
    release = threading.Event()

    def held(items):
        calls.append(list(items))
        inside.set()
        release.wait(10)
        return list(items)

    futures = [executor.submit_batch_by(None, "k", held, name) for name in "abc"]
    futures[1].cancel()
    gate.set()
    assert inside.wait(10)
    assert executor.backlog() == 2  # the two live items of the running batch
    release.set()
    assert [futures[0].result(timeout=10), futures[2].result(timeout=10)] == ["a", "c"]
    assert calls == [["a", "c"]]
    executor.shutdown()


class ThreadLog:
    """A Widening's set_threads that records (worker name, threads) and each job's thread count."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.current: dict[str, int] = {}

    def __call__(self, n: int) -> None:
        name = threading.current_thread().name
        self.calls.append((name, n))
        self.current[name] = n

    def job(self, tag: str, hold: threading.Event | None = None, started: threading.Event | None = None) -> tuple[str, str, int]:
        name = threading.current_thread().name
        if started is not None:
            started.set()
        if hold is not None:
            assert hold.wait(10)
        return tag, name, self.current.get(name, 1)


def widening_executor(log: ThreadLog, workers: int = 2, allowed: Callable[[], bool] = lambda: True) -> DeadlineExecutor:
    widening = Widening(log, 1, workers, allowed)
    return DeadlineExecutor(workers, thread_name_prefix="w", initializer=log, initargs=(1,), widening=widening)


def test_a_lone_job_runs_on_every_workers_threads_on_the_first_worker():
    log = ThreadLog()
    executor = widening_executor(log)
    try:
        for _ in range(5):  # whichever worker wakes first, the lone job is the first worker's
            assert executor.submit_by(None, log.job, "lone", widens=True).result(timeout=10) == ("lone", "w-0", 2)
        assert log.current == {"w-0": 1, "w-1": 1}  # narrow again after each
    finally:
        executor.shutdown()


def test_while_a_wide_job_runs_the_other_worker_waits_for_it():
    log = ThreadLog()
    executor = widening_executor(log)
    hold, started = threading.Event(), threading.Event()
    try:
        wide = executor.submit_by(None, log.job, "wide", hold, started, widens=True)
        assert started.wait(10)
        later = executor.submit_by(None, log.job, "later", widens=True)
        time.sleep(0.2)
        assert not later.done()  # a free worker, but the cores are the wide job's
        hold.set()
        assert wide.result(timeout=10) == ("wide", "w-0", 2)
        tag, _, threads = later.result(timeout=10)
        assert (tag, threads) == ("later", 2)  # alone again by then: it widens in turn
    finally:
        hold.set()
        executor.shutdown()


def test_jobs_queued_together_run_side_by_side_on_their_own_threads():
    log = ThreadLog()
    executor = widening_executor(log)
    hold, first_started = threading.Event(), threading.Event()
    gate = threading.Event()
    started = [threading.Event(), threading.Event()]
    try:
        first = executor.submit_by(None, log.job, "first", hold, first_started, widens=True)
        assert first_started.wait(10)
        # Queued together behind the wide job: each then has company, so both stay narrow.
        pair = [executor.submit_by(None, log.job, tag, gate, event, widens=True) for tag, event in zip(("a", "b"), started)]
        hold.set()
        assert all(event.wait(10) for event in started)  # both running at once
        gate.set()
        assert first.result(timeout=10) == ("first", "w-0", 2)
        results = [future.result(timeout=10) for future in pair]
        assert {name for _, name, _ in results} == {"w-0", "w-1"}
        assert [threads for *_, threads in results] == [1, 1]
    finally:
        hold.set()
        gate.set()
        executor.shutdown()


def test_threads_never_change_without_widening_with_one_worker_or_while_it_is_not_allowed():
    log = ThreadLog()
    allowed = threading.Event()
    executors = [
        DeadlineExecutor(2, thread_name_prefix="w", initializer=log, initargs=(1,)),
        widening_executor(log, workers=1),
        widening_executor(log, allowed=allowed.is_set),
    ]
    try:
        for executor in executors:
            for _ in range(3):
                assert executor.submit_by(None, log.job, "lone", widens=True).result(timeout=10)[2] == 1
        assert {n for _, n in log.calls} == {1}
        allowed.set()  # asked at each job
        assert executors[2].submit_by(None, log.job, "lone", widens=True).result(timeout=10)[2] == 2
    finally:
        for executor in executors:
            executor.shutdown()


async def test_an_engine_widens_a_lone_streams_jobs_only():
    """Only the streams' own jobs (steps, blocks) widen: not beside another stream, not with
    max_batch 1, and never a job such as a voice load."""
    wide = Engine(EngineConfig(workers=2, threads=1), concurrent=True)
    exact = Engine(EngineConfig(workers=2, threads=1, max_batch=1), concurrent=True)

    async def threads(engine: Engine, widens: bool = True) -> int:
        # A worker counts as running until it is back at the queue, a moment after its last
        # result is out: a job taken before then has company and stays narrow.
        await until(lambda: not engine._executor.backlog(), 10)
        return await asyncio.wrap_future(engine._executor.submit_by(None, torch.get_num_threads, widens=widens))

    try:
        assert await threads(wide) == 2
        assert await threads(wide, widens=False) == 1
        assert await wide.run(torch.get_num_threads) == 1
        assert await threads(exact) == 1
        streams = [wide.open_stream(cached=False) for _ in range(2)]
        for stream in streams:
            await stream.voice_loaded()
        assert await threads(wide) == 1
        await streams[0].aclose()
        assert await threads(wide) == 2  # one stream live: its jobs may widen
        await streams[1].aclose()
    finally:
        wide.close()
        exact.close()
