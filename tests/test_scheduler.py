"""The compute threads' earliest-deadline-first executor."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from voxflow.streaming.scheduler import DeadlineExecutor


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
