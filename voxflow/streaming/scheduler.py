"""Compute threads that run jobs earliest-deadline-first.

With several streams sharing the compute thread, first-in-first-out lets a stream that still
has a second of audio queued delay one whose listener is about to hear silence. Each job here
carries the time its result is needed (a stream passes the play-out time of the audio the job
will produce), and the most urgent job runs next. Jobs are not pre-empted: a job is at most
one acoustic step or one decoder block, so a late one waits at most that long.

Written here because the standard library's executors are FIFO only and no maintained
library offers a priority executor that plugs into asyncio's run_in_executor.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from concurrent.futures import Executor, Future
from typing import Any, Callable


class DeadlineExecutor(Executor):
    def __init__(
        self,
        workers: int = 1,
        *,
        thread_name_prefix: str = "voxflow-compute",
        initializer: Callable[..., object] | None = None,
        initargs: tuple = (),
    ) -> None:
        self._queue: list[tuple[float, int, Future, Callable[..., Any], tuple, dict]] = []
        self._order = itertools.count()  # equal deadlines keep submission order
        self._ready = threading.Condition()
        self._shutdown = False
        self._running = 0
        self.workers = workers
        self._threads = [
            threading.Thread(target=self._work, args=(initializer, initargs), name=f"{thread_name_prefix}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Executor.submit: the job is due now (behind any job already overdue)."""
        return self.submit_by(None, fn, *args, **kwargs)

    def submit_by(self, deadline: float | None, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Queue fn(*args, **kwargs) to run when no job with an earlier deadline waits (None: now)."""
        future: Future = Future()
        with self._ready:
            if self._shutdown:
                raise RuntimeError("cannot schedule new jobs after shutdown")
            due = time.perf_counter() if deadline is None else deadline
            heapq.heappush(self._queue, (due, next(self._order), future, fn, args, kwargs))
            self._ready.notify()
        return future

    def backlog(self) -> int:
        """Jobs queued (not cancelled) or running: how busy the compute threads are."""
        with self._ready:
            return sum(not entry[2].cancelled() for entry in self._queue) + self._running

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._ready:
            self._shutdown = True
            if cancel_futures:
                for _, _, future, *_ in self._queue:
                    future.cancel()
                self._queue.clear()
            self._ready.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()

    def _work(self, initializer: Callable[..., object] | None, initargs: tuple) -> None:
        if initializer is not None:
            initializer(*initargs)
        while True:
            with self._ready:
                while not self._queue and not self._shutdown:
                    self._ready.wait()
                if not self._queue:
                    return  # shut down and drained
                _, _, future, fn, args, kwargs = heapq.heappop(self._queue)
                self._running += 1
            try:
                if future.set_running_or_notify_cancel():
                    future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to whoever awaits the future
                future.set_exception(exc)
            finally:
                with self._ready:
                    self._running -= 1
