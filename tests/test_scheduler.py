"""The compute threads' earliest-deadline-first executor."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from voxflow.streaming.scheduler import DeadlineExecutor, Failed


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
