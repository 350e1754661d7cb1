"""Offline streaming recognition with pocketsphinx (en-us, the model the package ships).

A session decodes the turn's audio while the person speaks, so `finish` only ends the
utterance (a few milliseconds) instead of decoding the whole turn at once.

Costs measured on one CPU core: creating a decoder takes about 0.2 s, and decoding takes
about 60 ms per second of audio. pocketsphinx holds the GIL while it works, so the thread
hops keep its calls off the event loop's stack but still pause the loop for their length:
batches of 160 ms keep each pause near 10 ms.

Limit: a session keeps the first `max_seconds` of audio and ignores the rest, which bounds
the memory and CPU one turn can take.
"""

from __future__ import annotations

import asyncio

from pocketsphinx import Decoder

from ..errors import InvalidRequest
from .asr import RecognitionError, RecognitionSession, SpeechRecognizer

RATE = 16_000
_BATCH_BYTES = RATE * 2 * 160 // 1000


def _new_decoder() -> Decoder:
    # fwdflat is a second search pass over the whole utterance run by end_utt: it made
    # finish() take 30-80 ms per turn (growing with the turn's length) and changed no word
    # on our test phrases, while without it end_utt takes about 4 ms.
    return Decoder(samprate=RATE, fwdflat=False)


def _start(decoder: Decoder, pcm: bytes) -> None:
    # The cepstral mean adapts across utterances; a pooled decoder serves other callers, so
    # each session starts from the model's initial mean rather than the last caller's.
    decoder.set_cmn(decoder.config["cmninit"])
    decoder.start_utt()
    decoder.process_raw(pcm, False, False)


def _end(decoder: Decoder, pcm: bytes, started: bool) -> str:
    if started:
        decoder.process_raw(pcm, False, False)
    else:
        _start(decoder, pcm)
    decoder.end_utt()
    hyp = decoder.hyp()
    return hyp.hypstr if hyp is not None else ""


class _DecoderPool:
    """Idle decoders kept for the next sessions; at most `max_idle`, the rest are dropped."""

    def __init__(self, max_idle: int) -> None:
        self._idle: list[Decoder] = []
        self._max_idle = max_idle
        self.closed = False

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def acquire(self) -> Decoder:
        if self._idle:
            return self._idle.pop()
        return await asyncio.to_thread(_new_decoder)

    def release(self, decoder: Decoder) -> None:
        """Only for decoders between utterances (never started, or after end_utt)."""
        if not self.closed and len(self._idle) < self._max_idle:
            self._idle.append(decoder)

    def close(self) -> None:
        self.closed = True
        self._idle.clear()


class _Session(RecognitionSession):
    def __init__(self, pool: _DecoderPool, max_bytes: int) -> None:
        self._pool = pool
        self._room = max_bytes
        self._pending = bytearray()
        self._decoder: Decoder | None = None  # set once its utterance has started
        self._worker: asyncio.Task[None] | None = None
        self._failure: Exception | None = None
        self._closed = False
        self._abandoned = False

    async def feed(self, pcm: bytes) -> None:
        if self._closed:
            raise RecognitionError("the recognition session is closed")
        accepted = pcm[: self._room]
        self._room -= len(accepted)
        self._pending += accepted
        # feed() never waits for decoding: the worker catches up between the caller's frames.
        if len(self._pending) >= _BATCH_BYTES and (self._worker is None or self._worker.done()):
            self._worker = asyncio.create_task(self._decode_batches())

    async def _decode_batches(self) -> None:
        # Only this task and, after it, finish() or aclose() touch the decoder, so no two
        # pocketsphinx calls on it ever overlap.
        try:
            while not self._abandoned and self._failure is None and len(self._pending) >= _BATCH_BYTES:
                batch = bytes(self._pending[:_BATCH_BYTES])
                del self._pending[:_BATCH_BYTES]
                if self._decoder is not None:
                    await asyncio.to_thread(self._decoder.process_raw, batch, False, False)
                    continue
                decoder = await self._pool.acquire()
                if self._abandoned:
                    self._pool.release(decoder)
                    return
                await asyncio.to_thread(_start, decoder, batch)
                self._decoder = decoder
        except Exception as exc:  # reported by finish(); aclose() just drops the decoder
            self._failure = exc

    async def finish(self) -> str:
        if self._closed:
            raise RecognitionError("the recognition session is closed")
        self._closed = True
        if self._worker is not None:
            await self._worker
        if self._failure is not None:
            raise RecognitionError(f"pocketsphinx failed: {self._failure}") from self._failure
        tail = bytes(self._pending[: len(self._pending) - len(self._pending) % 2])
        self._pending.clear()
        started, self._decoder = self._decoder, None
        if started is None and not tail:
            return ""
        decoder = started or await self._pool.acquire()
        try:
            text = await asyncio.to_thread(_end, decoder, tail, started is not None)
        except Exception as exc:
            raise RecognitionError(f"pocketsphinx failed: {exc}") from exc
        # Only reached when end_utt completed; a cancelled or failed finish drops the decoder.
        self._pool.release(decoder)
        return text

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = self._abandoned = True
        self._pending.clear()
        if self._worker is not None:
            await self._worker
        decoder, self._decoder = self._decoder, None
        if decoder is None or self._failure is not None:
            return
        try:
            await asyncio.to_thread(decoder.end_utt)
        except Exception:  # a decoder that cannot end its utterance is not reused
            return
        self._pool.release(decoder)


class PocketsphinxRecognizer(SpeechRecognizer):
    def __init__(self, *, max_seconds: float = 60.0, max_idle_decoders: int = 4) -> None:
        if max_seconds <= 0 or max_idle_decoders < 0:
            raise InvalidRequest("max_seconds must be positive and max_idle_decoders not negative")
        self._max_bytes = int(max_seconds * RATE) * 2
        self._pool = _DecoderPool(max_idle_decoders)

    @property
    def idle_decoders(self) -> int:
        return self._pool.idle

    async def warm_up(self) -> None:
        """Create a decoder now, so the first turn does not wait for one."""
        if self._pool.idle == 0:
            self._pool.release(await self._pool.acquire())

    def open_session(self) -> RecognitionSession:
        if self._pool.closed:
            raise RecognitionError("the recognizer is closed")
        return _Session(self._pool, self._max_bytes)

    async def aclose(self) -> None:
        self._pool.close()
