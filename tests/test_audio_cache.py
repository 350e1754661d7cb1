"""The audio cache: storage (round trip, LRU bound, persistence, concurrency, damage) and its use
by streams and the server (replays, what is not cached, warm-up, metrics)."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import random
import re
import sqlite3
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import server_harness
from hypothesis import given, settings
from hypothesis import strategies as st
from server_harness import run_server

from voxflow.config import ServerConfig
from voxflow.streaming.audio_cache import AudioCache, CachedUtterance, CachedWord, CacheKey
from voxflow.streaming.events import AudioFrame, StreamEnd, WordTimestamp
from voxflow.streaming.stream import StreamOptions
from voxflow.transports.core.contexts import ContextRequest, ContextSet
from voxflow.voices.styles import Style
from waiting import until

FRAME_SAMPLES = 4  # tiny frames keep the storage tests fast


def key(n: int | str, **changes) -> CacheKey:
    fields = dict(voice="v", voice_version="1", style=Style(), speaker=None, seed=0, text=f"phrase {n}")
    return CacheKey(**{**fields, "sample_rate": 16000, "frame_ms": 20, **changes})


def utterance(n: int, frames: int | None = None) -> CachedUtterance:
    """Content determined by n (and the size), so any process can tell a right answer."""
    frames = n % 5 + 1 if frames is None else frames
    pcm = bytes((n * 7 + i) % 256 for i in range(frames * FRAME_SAMPLES * 2))
    return CachedUtterance(16000, FRAME_SAMPLES, pcm, (CachedWord(f"w{n}", 0.0, 0.01 * frames),))


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# -- storage ------------------------------------------------------------------------------------


def test_round_trip_and_stats(tmp_path):
    cache = AudioCache(tmp_path / "c.sqlite3", 10_000)
    u = utterance(3, frames=4)
    assert cache.get(key(3)) is None
    cache.put(key(3), u)
    got = cache.get(key(3))
    assert got == u
    assert list(got.frames()) == [u.pcm[i : i + 8] for i in range(0, len(u.pcm), 8)]
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.hits, stats.misses) == (1, u.nbytes, 1, 1)
    cache.close()


def test_forgetting_a_voice_deletes_its_entries_only(tmp_path):
    cache = AudioCache(tmp_path / "c.sqlite3", 10_000)
    for n in range(3):
        cache.put(key(n, voice="gone"), utterance(n))
        cache.put(key(n, voice="kept"), utterance(n))
    cache.forget_voice("gone")
    assert [cache.get(key(n, voice="gone")) for n in range(3)] == [None] * 3
    assert [cache.get(key(n, voice="kept")) for n in range(3)] == [utterance(n) for n in range(3)]
    assert cache.stats().entries == 3
    cache.close()


def test_key_normalizes_whitespace_and_unicode_but_keeps_case():
    base = key(0, text="Hello there, friend.")
    assert key(0, text="  Hello \t there,   friend.\n").digest == base.digest
    assert key(0, text="Caf\u0065\u0301").digest == key(0, text="Caf\u00e9").digest  # NFD == NFC
    assert key(0, text="Title\n\n  Body").text == "Title\nBody"  # a line break ends a sentence
    different = [
        key(0, text="hello there, friend."),
        key(0, text="Hello there, friend"),
        key(0, text="Hello there, friend.", style=Style(speed=1.1)),
        key(0, text="Hello there, friend.", style=Style(volume=0.5)),
        key(0, text="Hello there, friend.", seed=1),
        key(0, text="Hello there, friend.", speaker=2),
        key(0, text="Hello there, friend.", sample_rate=24000),
        key(0, text="Hello there, friend.", frame_ms=40),
        key(0, text="Hello there, friend.", voice="other"),
        key(0, text="Hello there, friend.", voice_version="2"),
    ]
    assert len({k.digest for k in [base, *different]}) == len(different) + 1
    assert key(0, style=Style(speed=1)).digest == key(0, style=Style(speed=1.0)).digest


def test_an_utterance_larger_than_the_cache_is_not_stored(tmp_path):
    cache = AudioCache(tmp_path / "c.sqlite3", 100)
    cache.put(key(1), utterance(1, frames=20))
    assert cache.get(key(1)) is None and cache.stats().entries == 0
    cache.close()


OPS = st.lists(st.tuples(st.sampled_from(["put", "get"]), st.integers(0, 7), st.integers(1, 6)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(ops=OPS, max_bytes=st.integers(10, 160))
def test_eviction_is_least_recently_used_within_the_bound(ops, max_bytes):
    model: OrderedDict[int, CachedUtterance] = OrderedDict()
    with tempfile.TemporaryDirectory() as tmp:
        cache = AudioCache(Path(tmp) / "c.sqlite3", max_bytes)
        for op, n, frames in ops:
            if op == "put":
                u = utterance(n, frames)
                cache.put(key(n), u)
                if u.nbytes <= max_bytes:
                    model[n] = u
                    model.move_to_end(n)
                    while sum(v.nbytes for v in model.values()) > max_bytes:
                        model.popitem(last=False)
            else:
                assert cache.get(key(n)) == model.get(n)
                if n in model:
                    model.move_to_end(n)
            stats = cache.stats()
            assert (stats.entries, stats.bytes) == (len(model), sum(v.nbytes for v in model.values()))
            assert stats.bytes <= max_bytes
        assert {n for n in range(8) if cache.get(key(n)) is not None} == set(model)
        cache.close()


def test_entries_and_their_recency_survive_a_reopen(tmp_path):
    path = tmp_path / "c.sqlite3"
    a, b, c = utterance(1, 3), utterance(2, 3), utterance(3, 3)
    cache = AudioCache(path, a.nbytes * 2)
    cache.put(key(1), a)
    cache.put(key(2), b)
    cache.get(key(1))  # 2 is now the least recently used
    cache.close()
    cache = AudioCache(path, a.nbytes * 2)
    assert cache.stats().entries == 2
    cache.put(key(3), c)
    assert cache.get(key(1)) == a and cache.get(key(3)) == c and cache.get(key(2)) is None
    cache.close()


def _hammer(path: str, worker: int, rounds: int) -> tuple[int, int]:
    """Mixed stores and lookups on a cache small enough to evict all the time.

    Returns (answers that were neither a miss nor the right utterance, warnings logged).
    """
    collect = _Collect()
    logging.getLogger("voxflow.streaming.audio_cache").addHandler(collect)
    cache = AudioCache(path, 300)
    rng = random.Random(worker)
    wrong = 0
    for _ in range(rounds):
        n = rng.randrange(12)
        if rng.random() < 0.5:
            cache.put(key(n), utterance(n))
        else:
            wrong += cache.get(key(n)) not in (None, utterance(n))
    cache.close()
    logging.getLogger("voxflow.streaming.audio_cache").removeHandler(collect)
    return wrong, len(collect.records)


def _assert_intact(path: Path, max_bytes: int) -> None:
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    cache = AudioCache(path, max_bytes)
    assert 0 < cache.stats().bytes <= max_bytes
    assert all(cache.get(key(n)) in (None, utterance(n)) for n in range(12))
    cache.close()


def test_threads_share_one_cache_and_files(tmp_path):
    path = str(tmp_path / "c.sqlite3")
    shared = AudioCache(path, 300)
    collect = _Collect()
    logging.getLogger("voxflow.streaming.audio_cache").addHandler(collect)

    def work(worker: int) -> int:
        rng = random.Random(worker)
        wrong = 0
        for _ in range(300):
            n = rng.randrange(12)
            if rng.random() < 0.5:
                shared.put(key(n), utterance(n))
            else:
                wrong += shared.get(key(n)) not in (None, utterance(n))
        return wrong

    try:
        with ThreadPoolExecutor(6) as pool:
            # Four threads on one instance, two on instances of their own (their own connections).
            results = [pool.submit(work, i) for i in range(4)] + [pool.submit(_hammer, path, 10 + i, 300) for i in range(2)]
            answers = [r.result() for r in results]
    finally:
        logging.getLogger("voxflow.streaming.audio_cache").removeHandler(collect)
    shared.close()
    assert answers[:4] == [0] * 4
    assert [wrong for wrong, _ in answers[4:]] == [0, 0]
    assert collect.records == []
    _assert_intact(Path(path), 300)


def test_two_processes_share_one_file(tmp_path):
    path = str(tmp_path / "c.sqlite3")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(_hammer, [(path, 1, 400), (path, 2, 400)])
    assert results == [(0, 0), (0, 0)]
    _assert_intact(Path(path), 300)


def test_a_file_that_is_not_a_database_is_recreated(tmp_path, caplog):
    path = tmp_path / "c.sqlite3"
    path.write_bytes(os.urandom(20_000))
    with caplog.at_level(logging.WARNING):
        cache = AudioCache(path, 10_000)
    assert "starting it afresh" in caplog.text
    cache.put(key(1), utterance(1))
    assert cache.get(key(1)) == utterance(1)
    cache.close()


def test_damaged_pages_are_survived_and_the_file_recreated(tmp_path, caplog):
    path = tmp_path / "c.sqlite3"
    cache = AudioCache(path, 10**7)
    for n in range(40):
        cache.put(key(n), utterance(n, frames=300))
    cache.close()
    with open(path, "r+b") as fh:  # keep the header page, garble the tables behind it
        fh.seek(4096)
        fh.write(os.urandom(64 * 1024))
    with caplog.at_level(logging.WARNING):
        cache = AudioCache(path, 10**7)
        answers = [cache.get(key(n)) for n in range(40)]
        cache.put(key(99), utterance(99))
    assert "starting it afresh" in caplog.text
    assert all(a in (None, utterance(n, frames=300)) for n, a in enumerate(answers))
    assert cache.get(key(99)) == utterance(99)
    cache.close()


def test_a_damaged_entry_is_dropped_not_played(tmp_path, caplog):
    path = tmp_path / "c.sqlite3"
    cache = AudioCache(path, 10_000)
    cache.put(key(1), utterance(1, frames=4))
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE utterances SET pcm = zeroblob(64)")
    with caplog.at_level(logging.WARNING):
        assert cache.get(key(1)) is None
    assert "damaged entry" in caplog.text
    assert cache.stats().entries == 0
    cache.close()


# -- streams ------------------------------------------------------------------------------------


@pytest.fixture
def cache(engine, tmp_path):
    """The shared engine with a fresh cache attached for one test."""
    cache = AudioCache(tmp_path / "cache.sqlite3", 64 * 2**20)
    engine.cache = cache
    try:
        yield cache
    finally:
        engine.cache = None
        cache.close()


class Listener:
    """Reads a stream in the background, stamping each event with its arrival time."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.events: list = []
        self.times: list[float] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for event in self.stream:
            self.events.append(event)
            self.times.append(time.perf_counter())

    async def done(self) -> list:
        await asyncio.wait_for(self.task, timeout=120)
        return self.events

    def first_frame_after(self, t: float) -> float | None:
        return next((at - t for at, e in zip(self.times, self.events) if isinstance(e, AudioFrame) and at >= t), None)

    async def started(self, word: str, since: int) -> None:
        """Wait until the stream speaks `word` (an event after the first `since`)."""
        await until(lambda: any(isinstance(e, WordTimestamp) and e.word.startswith(word) for e in self.events[since:]), 60)


def frames_of(events) -> list[AudioFrame]:
    return [e for e in events if isinstance(e, AudioFrame)]


def words_of(events) -> list[tuple[str, float, float]]:
    return [(e.word, e.start, e.end) for e in events if isinstance(e, WordTimestamp)]


async def say_whole(engine, text: str, **kwargs) -> tuple[list, float | None, object]:
    """A canned phrase: all its text, then end. Returns events, first-frame latency after end, metrics."""
    stream = engine.open_stream(**kwargs)
    listener = Listener(stream)
    await stream.push(text)
    sent = time.perf_counter()
    await stream.end()
    events = await listener.done()
    return events, listener.first_frame_after(sent), stream.metrics


async def test_a_repeated_utterance_is_replayed_exactly_and_fast(engine, cache):
    text = "Sorry, I didn't catch that."
    first, miss_latency, first_metrics = await say_whole(engine, text)
    second, hit_latency, second_metrics = await say_whole(engine, text)
    assert (first_metrics.cache_hits, first_metrics.cache_misses) == (0, 1)
    assert (second_metrics.cache_hits, second_metrics.cache_misses) == (1, 0)
    assert not second_metrics.acoustic_seconds and second_metrics.compute_seconds == 0  # no model work
    assert [f.pcm for f in frames_of(second)] == [f.pcm for f in frames_of(first)]
    assert words_of(second) == words_of(first) and len(words_of(first)) == 5
    assert [(f.seq, f.pts) for f in frames_of(second)] == [(f.seq, f.pts) for f in frames_of(first)]
    assert second[-1] == StreamEnd(second[-1].context_id, "done")
    assert hit_latency < 0.05
    assert hit_latency < miss_latency
    stats = cache.stats()
    assert (stats.entries, stats.hits, stats.misses) == (1, 1, 1)


async def test_output_format_and_voice_settings_are_separate_entries(engine, cache):
    text = "One moment, please."
    await say_whole(engine, text)
    other_rate, _, metrics = await say_whole(engine, text, options=StreamOptions(sample_rate=16000))
    assert metrics.cache_misses == 1 and {f.sample_rate for f in frames_of(other_rate)} == {16000}
    _, _, metrics = await say_whole(engine, text, seed=5)
    assert metrics.cache_misses == 1
    _, _, metrics = await say_whole(engine, "  One   moment,\tplease. ")  # same text once normalized
    assert metrics.cache_hits == 1
    await cache.settle()
    assert cache.stats().entries == 3


async def conversation(engine) -> tuple[list, object]:
    """A streamed answer, a canned phrase, another streamed answer, on one stream."""
    stream = engine.open_stream(seed=11)
    listener = Listener(stream)
    for text, streamed in [
        ("Well, the weather today looks mild and calm", True),
        ("One moment, please.", False),
        ("Right, the forecast for tomorrow is sunny and warm", True),
    ]:
        since = len(listener.events)
        await stream.push(text)
        if streamed:  # the stream starts speaking before the rest of its text (the flush) is there
            await listener.started(text.split()[0], since)
        await stream.flush()
    await stream.end()
    return await listener.done(), stream.metrics


async def test_what_follows_a_replay_sounds_as_after_synthesis(engine, cache):
    synthesized, first = await conversation(engine)
    replayed, second = await conversation(engine)
    assert (first.cache_hits, first.cache_misses, second.cache_hits, second.cache_misses) == (0, 1, 1, 0)
    frames = frames_of(replayed)
    assert [f.pcm for f in frames] == [f.pcm for f in frames_of(synthesized)]
    assert words_of(replayed) == words_of(synthesized)
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert all(f.pts == pytest.approx(f.seq * 0.02) for f in frames)
    starts = [start for _, start, _ in words_of(replayed)]
    assert starts == sorted(starts) and starts[-1] < frames[-1].pts
    await cache.settle()
    assert cache.stats().entries == 1  # only the canned phrase


async def test_an_utterance_streamed_in_pieces_is_not_cached(engine, cache):
    stream = engine.open_stream()
    listener = Listener(stream)
    await stream.push("Sorry, I")
    await listener.started("Sorry", 0)
    await stream.push(" didn't catch that.")
    await stream.end()
    events = await listener.done()
    assert events[-1].reason == "done" and len(words_of(events)) == 5
    assert (stream.metrics.cache_hits, stream.metrics.cache_misses, stream.metrics.chunks) == (0, 0, 2)
    await cache.settle()
    assert cache.stats().entries == 0


async def test_a_cancelled_utterance_is_not_stored(engine, cache):
    stream = engine.open_stream()
    await stream.push("This sentence is cancelled before it is done, so none of it may be kept.")
    await stream.end()
    async for event in stream:
        if isinstance(event, AudioFrame):
            stream.cancel()
    await stream.aclose()
    assert stream.metrics.cache_misses == 1
    await cache.settle()
    assert cache.stats().entries == 0


@pytest.mark.parametrize("text", ["\ud800 lone surrogate", "control\x00\x07 characters\x1b", "日本語のテキスト", "🙂🙂🙂", "**##**"])
async def test_odd_text_is_spoken_or_refused_as_without_a_cache(engine, cache, text):
    events, _, _ = await asyncio.wait_for(say_whole(engine, text), timeout=60)
    engine.cache = None
    uncached, _, _ = await asyncio.wait_for(say_whole(engine, text), timeout=60)
    assert (events[-1].reason, events[-1].code) == (uncached[-1].reason, uncached[-1].code)
    assert [f.pcm for f in frames_of(events)] == [f.pcm for f in frames_of(uncached)]


async def test_without_a_cache_nothing_is_looked_up(engine, cache):
    engine.cache = None
    _, _, metrics = await say_whole(engine, "Thanks for waiting.")
    assert (metrics.cache_hits, metrics.cache_misses) == (0, 0)
    engine.cache = cache
    _, _, metrics = await say_whole(engine, "Thanks for waiting.", cached=False)
    assert (metrics.cache_hits, metrics.cache_misses) == (0, 0)
    await cache.settle()
    assert cache.stats().entries == 0


# -- server -------------------------------------------------------------------------------------


async def request(state, text: str) -> list:
    """One context through the transports' ContextSet, which reports to the server's metrics."""
    events: list = []

    async def deliver(event) -> None:
        events.append(event)

    contexts = ContextSet(state.engine, deliver, max_contexts=1, send_timeout=10, metrics=state.metrics)
    contexts.open(ContextRequest("c1"))
    await contexts.push("c1", text)
    await contexts.end("c1")
    await contexts.drain(timeout=60)
    return events


def counter(server, name: str) -> float:
    text = httpx.get(f"{server.http}/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


@pytest.fixture
def cache_enabled(monkeypatch):
    """run_server pins cache_enabled=False and rejects a cache_enabled option, so it gets a
    ServerConfig that turns the cache back on."""

    @dataclass(frozen=True)
    class CachedServerConfig(ServerConfig):
        def __post_init__(self) -> None:
            object.__setattr__(self, "cache_enabled", True)

    monkeypatch.setattr(server_harness, "ServerConfig", CachedServerConfig)


def test_server_warms_the_cache_and_reports_hits(engine, tmp_path, cache_enabled):
    path = tmp_path / "made" / "by-the-server.sqlite3"
    phrases = ("Hello!", "One moment, please.")
    with run_server(engine, cache_path=str(path), warmup_phrases=phrases) as server:
        assert server.state.settings.server.cache_enabled
        cache = server.state.engine.cache
        assert cache is not None and cache.stats().entries == 2
        assert counter(server, "voxflow_cache_hits_total") == 0
        events = server.call(request, server.state, "One moment, please.")
        assert events[-1].reason == "done" and frames_of(events)
        assert counter(server, "voxflow_cache_hits_total") == 1
        assert counter(server, "voxflow_cache_misses_total") == 0
        server.call(request, server.state, "Something new to say.")
        assert counter(server, "voxflow_cache_misses_total") == 1
    assert engine.cache is None  # handed back and closed at shutdown
    with run_server(engine, cache_path=str(path), warmup_phrases=phrases) as server:
        stats = server.state.engine.cache.stats()
        assert (stats.entries, stats.hits, stats.misses) == (3, 2, 0)  # warm-up replayed from disk


def test_server_with_the_cache_off_opens_none(engine, tmp_path):
    path = tmp_path / "never.sqlite3"
    with run_server(engine, cache_path=str(path)) as server:
        assert server.state.engine.cache is None
        server.call(request, server.state, "One moment, please.")
        assert counter(server, "voxflow_cache_misses_total") == 0
    assert not path.exists()
