"""An utterance that starts while the compute threads are busy buys more audio with its first say."""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from voxflow.config import EngineConfig
from voxflow.streaming.decoder_blocks import BlockOptions
from voxflow.streaming.engine import Engine
from voxflow.streaming.events import AudioFrame
from voxflow.streaming.stream import FIRST_SAY_IDS
from voxflow.streaming.tokens import gpt_like_tokens

REPLY = "Sure, I can help with that right away for you today."


async def first_say(engine, busy: bool, others: int | None = None, whole: str | None = None) -> tuple[str, bool, int]:
    """The text of the stream's first say, whether its first block was the small one, and the
    ids it settled. `others` jobs of other work hold compute threads meanwhile (default: none
    when idle, every thread and one more job when busy). REPLY comes token by token, or `whole`
    in one piece."""
    release = threading.Event()
    others = (engine._executor.workers + 1 if busy else 0) if others is None else others
    blockers = [engine._executor.submit(release.wait, 30) for _ in range(others)]
    stream = engine.open_stream(cached=False)
    says: list[tuple[str, bool, int]] = []
    after_step = stream._after_step

    def spy_after_step(planned, latents):
        result = after_step(planned, latents)
        if not says and result[0] is not None:
            first = result[0]
            says.append((planned.text, first.blocks[0][1] - first.blocks[0][0] == stream.options.blocks.first_block_frames, len(first.durations)))
        return result

    stream._after_step = spy_after_step
    try:
        if whole:
            await stream.push(whole)  # and the end at once, as a transport sends text whole
        for token in [] if whole else gpt_like_tokens(REPLY):
            await stream.push(token)
            await asyncio.sleep(0.02)  # words arrive one by one, as from an LLM
        await stream.end()
        release.set()
        frames = [e async for e in stream if isinstance(e, AudioFrame)]
    finally:
        release.set()
        for blocker in blockers:
            blocker.result(timeout=30)
    assert frames
    return says[0]


async def test_an_idle_engine_starts_small_and_soon(engine):
    text, small_first_block, ids = await first_say(engine, busy=False)
    assert small_first_block
    assert len(text.split()) <= 4  # the first chunk's three words (and a lookahead)
    assert ids < FIRST_SAY_IDS  # "Sure," alone: the next say will not wait behind anyone


async def test_a_busy_engine_waits_for_more_words_and_a_larger_first_block(engine):
    text, small_first_block, _ = await first_say(engine, busy=True)
    assert not small_first_block
    assert len(text.split()) >= 6


async def test_with_other_work_queued_a_first_say_leaves_the_listener_enough_audio() -> None:
    """One other job on one of two threads: not a busy start, but "Sure," alone is not said,
    nor in a small first block."""
    engine = Engine(EngineConfig(workers=2, threads=1))
    try:
        await engine.warm_up()  # loaded first: a load still running when the text has all come would hold the say back
        text, small_first_block, ids = await first_say(engine, busy=False, others=1)
    finally:
        engine.close()
    assert not small_first_block
    assert ids >= FIRST_SAY_IDS
    assert len(text.split()) > 4


async def test_beside_another_live_stream_a_first_say_leaves_the_listener_enough_audio(engine) -> None:
    other = engine.open_stream(cached=False)  # open, between utterances: no job queued
    try:
        _, small_first_block, ids = await first_say(engine, busy=False)
    finally:
        await other.aclose()
    assert ids >= FIRST_SAY_IDS and not small_first_block
    assert other not in engine._live  # an ended stream no longer counts


async def test_a_long_text_sent_whole_settles_more_in_its_first_say_even_alone(engine):
    """Decided by the text, not the load, so that it is cut the same however busy the machine is;
    a short one (a six-word clause) keeps the small, fast first say."""
    text, small_first_block, ids = await first_say(engine, busy=False, whole=REPLY)
    assert ids >= FIRST_SAY_IDS and len(text.split()) >= 6
    assert small_first_block  # alone: the fast first block all the same
    text, _, ids = await first_say(engine, busy=False, whole="The kettle has just finished boiling.")
    assert ids < FIRST_SAY_IDS and len(text.split()) <= 4


async def render_whole(engine: Engine, busy: bool) -> tuple[np.ndarray, int]:
    """REPLY sent in one piece, its first chunk cut while every compute thread is held (busy) or
    not; the audio and the size of its first block."""
    release = threading.Event()
    blockers = [engine._executor.submit(release.wait, 30) for _ in range(engine._executor.workers + 1 if busy else 0)]
    stream = engine.open_stream(cached=False)
    first_blocks: list[int] = []
    after_step = stream._after_step

    def spy_after_step(planned, latents):
        result = after_step(planned, latents)
        if result[0] is not None:
            start, end = result[0].blocks[0]
            first_blocks.append(end - start)
        return result

    stream._after_step = spy_after_step
    try:
        await stream.push(REPLY)
        await stream.end()
        await asyncio.sleep(0.3)  # the first chunk is cut while the threads are held
        release.set()
        pcm = b"".join([e.pcm async for e in stream if isinstance(e, AudioFrame)])
        return np.frombuffer(pcm, dtype=np.int16), first_blocks[0]
    finally:
        release.set()
        for blocker in blockers:
            blocker.result(timeout=30)


async def beside_another_stream(engine: Engine) -> tuple[np.ndarray, int]:
    other = engine.open_stream(cached=False)  # another live stream: a shared start
    try:
        return await render_whole(engine, busy=False)
    finally:
        await other.aclose()


async def test_text_sent_in_one_piece_is_said_the_same_on_a_busy_engine(engine):
    """The audio cache and seeded replays rely on it: load must not change what is said. Beside
    another stream only the first block grows, which changes the audio by rounding at most (on
    an AMD EPYC with AVX512-BF16: up to 19 steps; on an Intel Xeon with AMX: none)."""
    idle, small = await render_whole(engine, busy=False)
    assert len(idle) and small == BlockOptions().first_block_frames
    busy, _ = await render_whole(engine, busy=True)
    beside, larger = await beside_another_stream(engine)
    assert larger > small
    for audio in (busy, beside):
        assert len(audio) == len(idle)  # the same cuts and durations
        assert np.abs(audio.astype(np.int32) - idle).max() <= 64


async def test_with_max_batch_one_the_bytes_do_not_follow_the_load() -> None:
    engine = Engine(EngineConfig(max_batch=1))
    try:
        await engine.warm_up()
        idle, small = await render_whole(engine, busy=False)
        for audio, first_block in (await render_whole(engine, busy=True), await beside_another_stream(engine)):
            assert first_block == small
            assert np.array_equal(audio, idle)
    finally:
        engine.close()
