"""Offline streaming recognition with pocketsphinx (en-us, the model the package ships), run in
a process of its own.

pocketsphinx holds the GIL while it works: creating a decoder takes 0.25-0.4 s, decoding 60-120
ms per second of audio (speech to noise). In the server's process the decoder made at start-up
held up everything else for that long, straight out of the time to ready, and each batch decoded
paused the event loop and the voice's compute threads. In a child process the recognizer loads
on the other core while the voice warms up, and decoding a turn pauses nobody's speech.

One worker process serves every session of a recognizer, so its calls run one at a time and in
the order they were sent: a session's audio is decoded in order without waiting on each call.
Decoding keeps up with 8 or more people speaking at once on one core. A session decodes its
turn while the person speaks, so `finish` only ends the utterance (a few milliseconds) instead
of decoding the whole turn at once.

If the worker dies, the sessions it held fail with a RecognitionError and the next session
starts a new worker.

Limit: a session keeps the first `max_seconds` of audio and ignores the rest, which bounds
the memory and CPU one turn can take.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import multiprocessing
import os
import threading
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable

from pocketsphinx import Decoder

from ..errors import InvalidRequest
from .asr import RecognitionError, RecognitionSession, SpeechRecognizer

RATE = 16_000
# Each call to the worker costs a pickle and a pipe write, so a session sends 160 ms at a time
# rather than every 20-30 ms frame.
_BATCH_BYTES = RATE * 2 * 160 // 1000


@dataclass(frozen=True)
class RecognizerStats:
    """What the worker process holds: for health checks and tests."""

    pid: int
    idle_decoders: int
    open_sessions: int


# --- in the worker process ----------------------------------------------------------------


def _new_decoder() -> Decoder:
    # fwdflat is a second search pass over the whole utterance run by end_utt: it made
    # finish() take 30-80 ms per turn (growing with the turn's length) and changed no word
    # on our test phrases, while without it end_utt takes about 4 ms.
    return Decoder(samprate=RATE, fwdflat=False)


class _Decoders:
    """The worker's decoders: one for each session whose utterance has started, and up to
    `max_idle` kept for the next sessions."""

    def __init__(self, max_idle: int) -> None:
        self.max_idle = max_idle
        self.idle: list[Decoder] = [_new_decoder()] if max_idle else []
        self.started: dict[int, Decoder] = {}
        # A session whose decoding failed keeps the message for its finish(); its decoder is dropped.
        self.failed: dict[int, str] = {}

    def feed(self, session: int, pcm: bytes) -> None:
        if session in self.failed:
            return
        try:
            decoder = self.started.get(session)
            if decoder is None:
                decoder = self.idle.pop() if self.idle else _new_decoder()
                # The cepstral mean adapts across utterances; an idle decoder served other
                # sessions, so each starts from the model's initial mean, not the last caller's.
                decoder.set_cmn(decoder.config["cmninit"])
                decoder.start_utt()
                self.started[session] = decoder
            decoder.process_raw(pcm, False, False)
        except Exception as exc:
            self.started.pop(session, None)
            self.failed[session] = str(exc)

    def finish(self, session: int, pcm: bytes) -> str:
        if pcm:
            self.feed(session, pcm)
        if (failure := self.failed.pop(session, None)) is not None:
            raise RuntimeError(failure)
        decoder = self.started.pop(session, None)
        if decoder is None:
            return ""
        decoder.end_utt()  # if it raises, the decoder is not reused
        hyp = decoder.hyp()
        self._release(decoder)
        return hyp.hypstr if hyp is not None else ""

    def abandon(self, session: int) -> None:
        self.failed.pop(session, None)
        if (decoder := self.started.pop(session, None)) is not None:
            decoder.end_utt()
            self._release(decoder)

    def _release(self, decoder: Decoder) -> None:
        if len(self.idle) < self.max_idle:
            self.idle.append(decoder)

    def stats(self) -> RecognizerStats:
        return RecognizerStats(os.getpid(), len(self.idle), len(self.started) + len(self.failed))


# The executor calls module-level functions; the initializer sets this in the worker, and
# only there.
_decoders: _Decoders = None  # type: ignore[assignment]


def _init_worker(max_idle: int) -> None:
    global _decoders
    threading.Thread(target=_exit_with_parent, name="exit-with-parent", daemon=True).start()
    _decoders = _Decoders(max_idle)


def _exit_with_parent() -> None:
    # A parent killed outright (SIGKILL, out of memory) never shuts the executor down, and the
    # worker, which holds a write end of its own call queue, would wait for calls forever.
    parent = multiprocessing.parent_process()
    if parent is not None:
        parent.join()
        os._exit(0)


def _feed(session: int, pcm: bytes) -> None:
    _decoders.feed(session, pcm)


def _finish(session: int, pcm: bytes) -> str:
    return _decoders.finish(session, pcm)


def _abandon(session: int) -> None:
    _decoders.abandon(session)


def _stats() -> RecognizerStats:
    return _decoders.stats()


# --- in the caller's process --------------------------------------------------------------


class _Worker:
    """The worker process, started on first use and started anew after it died."""

    def __init__(self, max_idle: int) -> None:
        self._max_idle = max_idle
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self.closed = False

    def executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self.closed:
            raise RecognitionError("the recognizer is closed")
        if self._executor is None:
            # spawn, not fork: the server's process has compute threads, and a forked child
            # would inherit their locks in whatever state they were. (spawn imports the main
            # module again, so a program must start under `if __name__ == "__main__":`.)
            self._executor = concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(self._max_idle,)
            )
        return self._executor

    def submit(self, executor: concurrent.futures.ProcessPoolExecutor, call: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        try:
            return executor.submit(call, *args)
        except BrokenProcessPool as exc:
            self.discard(executor)
            raise RecognitionError("the speech recognition process stopped") from exc
        except RuntimeError as exc:  # submitted after close()
            raise RecognitionError("the recognizer is closed") from exc

    async def result(self, executor: concurrent.futures.ProcessPoolExecutor, future: concurrent.futures.Future) -> Any:
        try:
            return await asyncio.wrap_future(future)
        except BrokenProcessPool as exc:
            self.discard(executor)
            raise RecognitionError("the speech recognition process stopped") from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if future.cancelled() and task is not None and not task.cancelling():
                # Not this task's cancellation: the executor was shut down under the call.
                raise RecognitionError("the recognizer is closed") from None
            raise
        except Exception as exc:
            raise RecognitionError(f"pocketsphinx failed: {exc}") from exc

    def discard(self, executor: concurrent.futures.ProcessPoolExecutor) -> None:
        if self._executor is executor:
            self._executor = None
        executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self.closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


class _Session(RecognitionSession):
    def __init__(self, worker: _Worker, number: int, max_bytes: int) -> None:
        self._worker = worker
        self._number = number
        self._room = max_bytes
        self._pending = bytearray()
        # Bound at the first call: a worker started after a crash never sees half an utterance.
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._failure: RecognitionError | None = None
        self._closed = False

    def _submit(self, call: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        if self._executor is None:
            self._executor = self._worker.executor()
        return self._worker.submit(self._executor, call, self._number, *args)

    async def feed(self, pcm: bytes) -> None:
        if self._closed:
            raise RecognitionError("the recognition session is closed")
        accepted = pcm[: self._room]
        self._room -= len(accepted)
        self._pending += accepted
        while self._failure is None and len(self._pending) >= _BATCH_BYTES:
            batch = bytes(self._pending[:_BATCH_BYTES])
            del self._pending[:_BATCH_BYTES]
            # Not awaited: the worker runs this session's calls in order, and a decoding
            # failure comes back from finish().
            try:
                self._submit(_feed, batch)
            except RecognitionError as exc:
                self._failure = exc

    async def finish(self) -> str:
        if self._closed:
            raise RecognitionError("the recognition session is closed")
        self._closed = True
        tail = bytes(self._pending[: len(self._pending) - len(self._pending) % 2])
        self._pending.clear()
        if self._failure is not None:
            raise self._failure
        if self._executor is None and not tail:
            return ""
        future = self._submit(_finish, tail)
        try:
            return await self._worker.result(self._executor, future)
        except asyncio.CancelledError:
            # _finish may never run now; the worker must not keep the session's decoder.
            self._abandon_soon()
            raise

    def _abandon_soon(self) -> None:
        try:
            self._submit(_abandon)
        except RecognitionError:  # no worker: nothing held
            pass

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        if self._executor is None:
            return
        try:
            await self._worker.result(self._executor, self._submit(_abandon))
        except RecognitionError:  # the worker is gone or could not end the utterance: nothing to keep
            pass


class PocketsphinxRecognizer(SpeechRecognizer):
    def __init__(self, *, max_seconds: float = 60.0, max_idle_decoders: int = 4) -> None:
        if max_seconds <= 0 or max_idle_decoders < 0:
            raise InvalidRequest("max_seconds must be positive and max_idle_decoders not negative")
        self._max_bytes = int(max_seconds * RATE) * 2
        self._worker = _Worker(max_idle_decoders)
        self._numbers = itertools.count()

    async def stats(self) -> RecognizerStats:
        """What the worker holds, once every call sent before this one has run."""
        executor = self._worker.executor()
        return await self._worker.result(executor, self._worker.submit(executor, _stats))

    async def warm_up(self) -> None:
        """Start the worker; it makes its first decoder then, so the first turn waits for neither."""
        await self.stats()

    def open_session(self) -> RecognitionSession:
        if self._worker.closed:
            raise RecognitionError("the recognizer is closed")
        return _Session(self._worker, next(self._numbers), self._max_bytes)

    async def aclose(self) -> None:
        await asyncio.to_thread(self._worker.close)
