"""Compute threads that run jobs earliest-deadline-first.

With several streams sharing the compute thread, first-in-first-out lets a stream that still
has a second of audio queued delay one whose listener is about to hear silence. Each job here
carries the time its result is needed (a stream passes the play-out time of the audio the job
will produce), and the most urgent job runs next. Jobs are not pre-empted: a job is at most
one acoustic step or one decoder block, so a late one waits at most that long.

Jobs of the same kind from different streams may also run as one call (`submit_batch_by`):
when the most urgent job is due, queued jobs with the same batch key ride along with it, so a
burst of small jobs (the first acoustic steps of streams that start together) costs one
batched forward pass instead of one per stream. Nothing waits to fill a batch: it takes what
is queued.

A job submitted as one that may widen (`widens=True`: a short one, an acoustic step or a
decoder block) that finds the other workers idle and nothing else queued may take their cores
too (`Widening`): a lone stream's steps and blocks then run on every core, the way a
single-worker engine runs them, and the other workers wait until it ends rather than share the
cores with it. A job that arrives meanwhile waits at most that one short job; a long one (a
voice load) never widens, so it never holds every worker. Only the first worker widens: OpenMP
keeps a pool of helper threads for each thread that widens, and a pool spins for a while after
its job, so the pools of two workers spun against each other's jobs (a flushed clause's first
audio 68-77 ms wide on either worker, 53-61 ms narrow, 42-49 ms wide on the first only;
docs/BENCHMARKS.md, "Throughput", round 14).

Written here because the standard library's executors are FIFO only and no maintained
library offers a priority executor that plugs into asyncio's run_in_executor.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence


@dataclass(frozen=True)
class Failed:
    """A batch function's result for one item that failed: that item's future raises `error`."""

    error: BaseException


@dataclass(frozen=True)
class Widening:
    """How a worker's job takes every worker's threads: `set_threads(n)`, called on the worker's
    own thread, sets its intra-op threads (torch.set_num_threads: OpenMP's count is per thread).
    `allowed()`, asked under the queue's lock, may keep jobs narrow (the engine: while more
    than one stream is live)."""

    set_threads: Callable[[int], object]
    narrow: int  # each worker's threads
    wide: int  # a job's threads when it has the machine to itself
    allowed: Callable[[], bool]


@dataclass(frozen=True)
class _Batched:
    """A queued batchable item: `fn(items)` returns one result (or Failed) per item, in order."""

    key: Hashable
    fn: Callable[[Sequence[Any]], Sequence[Any]]
    item: Any


class DeadlineExecutor(Executor):
    def __init__(
        self,
        workers: int = 1,
        *,
        thread_name_prefix: str = "voxflow-compute",
        initializer: Callable[..., object] | None = None,
        initargs: tuple = (),
        max_batch: int = 8,
        widening: Widening | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch = max_batch
        # (due, order, future, fn, args, kwargs, widens); a batchable item has fn None and args (_Batched,)
        self._queue: list[tuple[float, int, Future, Callable[..., Any] | None, tuple, dict, bool]] = []
        self._order = itertools.count()  # equal deadlines keep submission order
        self._ready = threading.Condition()
        self._shutdown = False
        self._running = 0
        self._widening = widening if workers > 1 else None
        self._wide = False  # a job runs on every worker's threads: the others wait
        self.workers = workers
        self._threads = [
            threading.Thread(target=self._work, args=(i, initializer, initargs), name=f"{thread_name_prefix}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Executor.submit: the job is due now (behind any job already overdue)."""
        return self.submit_by(None, fn, *args, **kwargs)

    def submit_by(self, deadline: float | None, fn: Callable[..., Any], /, *args: Any, widens: bool = False, **kwargs: Any) -> Future:
        """Queue fn(*args, **kwargs) to run when no job with an earlier deadline waits (None: now).
        widens: a short job that may take every worker's threads (module docstring)."""
        return self._push(deadline, fn, args, kwargs, widens)

    def submit_batch_by(
        self, deadline: float | None, key: Hashable, fn: Callable[[Sequence[Any]], Sequence[Any]], item: Any, *, widens: bool = False
    ) -> Future:
        """Queue `item` for fn([item, ...]); its future gets the item's result.

        When a batchable job is due, up to max_batch - 1 queued items with the same key (and
        fn), most urgent first, run in the same call. A key of None never batches.
        """
        return self._push(deadline, None, (_Batched(key, fn, item),), {}, widens)

    def _push(self, deadline: float | None, fn: Callable[..., Any] | None, args: tuple, kwargs: dict, widens: bool) -> Future:
        future: Future = Future()
        with self._ready:
            if self._shutdown:
                raise RuntimeError("cannot schedule new jobs after shutdown")
            due = time.perf_counter() if deadline is None else deadline
            heapq.heappush(self._queue, (due, next(self._order), future, fn, args, kwargs, widens))
            # Every worker: a lone job is the first worker's (_waits), which one notify may miss.
            self._ready.notify_all()
        return future

    def _companions(self, first: _Batched) -> list[tuple[Future, _Batched]]:
        """Take the queued items that may run with `first` off the queue (lock held)."""
        if first.key is None or self.max_batch == 1:
            return []
        fits = [
            entry for entry in self._queue
            if entry[3] is None and entry[4][0].key == first.key and entry[4][0].fn is first.fn and not entry[2].cancelled()
        ]
        taken = heapq.nsmallest(self.max_batch - 1, fits)
        if taken:
            chosen = {id(entry[2]) for entry in taken}
            self._queue = [entry for entry in self._queue if id(entry[2]) not in chosen]
            heapq.heapify(self._queue)
        return [(entry[2], entry[4][0]) for entry in taken]

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

    def _may_widen(self) -> bool:
        """Whether a job taken now, with nothing queued behind it, may run wide (lock held)."""
        return self._widening is not None and self._running == 0 and self._widening.allowed()

    def _waits(self, index: int) -> bool:
        """Whether worker `index` must leave the queue alone for now (lock held)."""
        if not self._queue or self._wide:
            return True
        # A job that would widen, having the machine to itself, is the widening worker's.
        return index > 0 and len(self._queue) == 1 and self._queue[0][6] and self._may_widen()

    def _work(self, index: int, initializer: Callable[..., object] | None, initargs: tuple) -> None:
        if initializer is not None:
            initializer(*initargs)
        while True:
            with self._ready:
                while self._waits(index) and not self._shutdown:
                    self._ready.wait()
                if not self._queue:
                    return  # shut down and drained
                _, _, future, fn, args, kwargs, widens = heapq.heappop(self._queue)
                batch = [(future, args[0])] + self._companions(args[0]) if fn is None else []
                wide = widens and index == 0 and not self._queue and self._may_widen()
                self._wide = wide
                running = max(1, len(batch))
                self._running += running
            try:
                if wide:
                    self._widening.set_threads(self._widening.wide)
                if fn is None:
                    self._run_batch(batch)  # sets every future itself, raises nothing
                elif future.set_running_or_notify_cancel():
                    future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to whoever awaits the future
                future.set_exception(exc)
            finally:
                if wide:
                    self._widening.set_threads(self._widening.narrow)
                with self._ready:
                    self._running -= running
                    if wide:
                        self._wide = False
                        self._ready.notify_all()

    @staticmethod
    def _run_batch(batch: list[tuple[Future, _Batched]]) -> None:
        live = [(future, job) for future, job in batch if future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = live[0][1].fn([job.item for _, job in live])
            if len(results) != len(live):
                raise RuntimeError(f"a batch function returned {len(results)} results for {len(live)} items")
        except BaseException as exc:  # every item of the batch gets it
            for future, _ in live:
                future.set_exception(exc)
            return
        for (future, _), result in zip(live, results):
            if isinstance(result, Failed):
                future.set_exception(result.error)
            else:
                future.set_result(result)
