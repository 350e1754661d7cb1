"""The streaming path end to end on the real voice: frames, joins, cancel, determinism, limits."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from voxflow.errors import InvalidRequest, LimitExceeded, StreamClosed
from voxflow.streaming.acoustic import AcousticState
from voxflow.streaming.decoder_blocks import BlockDecoder, BlockOptions
from voxflow.streaming.events import AudioFrame, StreamEnd, WordTimestamp
from voxflow.streaming.stream import StreamOptions
from voxflow.streaming.tokens import gpt_like_tokens
from voxflow.voices.styles import Style

PARAGRAPH = (
    "Sure, I can help with that. The weather tomorrow looks mild, with a light breeze in the "
    "morning and some sun in the afternoon. If you are heading out, a thin jacket should be enough."
)


async def collect(stream) -> list:
    return [event async for event in stream]


async def speak(engine, text: str, **kwargs) -> list:
    stream = engine.open_stream(**kwargs)
    for token in gpt_like_tokens(text):
        await stream.push(token)
    await stream.end()
    return await collect(stream)


def pcm(events) -> np.ndarray:
    frames = [e for e in events if isinstance(e, AudioFrame)]
    return np.frombuffer(b"".join(f.pcm for f in frames), dtype=np.int16).astype(np.float32) / 32768


@pytest.fixture(scope="module")
def voice(engine):
    return engine.voice()


def chunk_latents(voice, texts: list[str], seed: int = 0):
    state = AcousticState(voice.model, voice.info.defaults, None, seed)
    out = []
    for i, text in enumerate(texts):
        ids = voice.phonemizer.phonemize(text, bos=i == 0, eos=i == len(texts) - 1).ids
        out.append(state.step(ids))
    return state, out


def stitch(voice, latents, options: BlockOptions = BlockOptions()) -> tuple[np.ndarray, list[int]]:
    """Decode chunk latents the way a stream does; returns audio and the join sample positions."""
    decoder = BlockDecoder(voice.model.dec, voice.hop_length, voice.decoder_receptive_frames, options)
    pieces, joins, total = [], [], 0
    for chunk in latents:
        joined = decoder.begin_chunk(chunk.z)
        joins.append(total)
        for start, end in decoder.plan(chunk.z.shape[2]):
            pieces.append(decoder.decode_block(joined, start, end))
        total += chunk.z.shape[2] * voice.hop_length
    pieces.append(decoder.release())
    return np.concatenate(pieces), joins[1:]


def test_blocks_inside_a_chunk_match_a_whole_chunk_decode(voice):
    _, [chunk] = chunk_latents(voice, ["This sentence is long enough to need several decoder blocks, one after another."])
    assert chunk.z.shape[2] > 100  # several blocks of 8, 16, 32, 48 frames
    stitched, _ = stitch(voice, [chunk])
    with torch.inference_mode():
        whole = voice.model.dec(chunk.z)[0, 0].numpy()
    assert stitched.shape == whole.shape
    assert np.abs(stitched - whole).max() <= 1e-3


def click_measure(audio: np.ndarray, seams: list[int]) -> float:
    """Largest sample-to-sample step within 4 samples of any seam, over the audio's own
    99.9th-percentile step. A click is a discontinuity, so it shows as a step far above what
    the voice itself produces; smooth joins stay well below 1."""
    steps = np.abs(np.diff(audio))
    return float(max(steps[max(s - 4, 0) : s + 4].max() for s in seams) / np.percentile(steps, 99.9))


CLICK_LIMIT = 0.35


def test_chunk_joins_have_no_clicks(voice):
    # Joins inside voiced speech, where a seam is audible if the waveforms do not meet.
    texts = ["I would really", "love a warm", "mug of", "milk now"]
    _, latents = chunk_latents(voice, texts)
    audio, joins = stitch(voice, latents)
    assert len(joins) == 3
    # The crossfade splices at both ends of the held tail.
    xfade = BlockOptions().crossfade_samples
    assert click_measure(audio, joins + [j - xfade for j in joins]) <= CLICK_LIMIT
    # The same chunks decoded alone and butted together do click: the measure can tell.
    with torch.inference_mode():
        parts = [voice.model.dec(c.z)[0, 0].numpy() for c in latents]
    naive_joins = np.cumsum([len(p) for p in parts])[:-1].tolist()
    assert click_measure(np.concatenate(parts), naive_joins) > CLICK_LIMIT


def test_acoustic_cost_stays_flat_as_the_utterance_grows(voice):
    sentence = "Each new clause is encoded against a bounded window of earlier phonemes,"
    state, latents = chunk_latents(voice, [sentence] * 12)
    lengths = list(state.encoded_lengths)
    middle_ids = len(voice.phonemizer.phonemize(sentence, bos=False, eos=False).ids)
    # Once earlier chunks fill the window, every chunk sees exactly it plus its own phonemes.
    window = state.context_ids
    filled = -(-window // middle_ids) + 1  # chunks before one whose left context is full
    assert filled < 11
    assert lengths[filled:-1] == [window + middle_ids] * (11 - filled)
    assert all(chunk.z.shape[2] > 0 for chunk in latents)


@pytest.mark.parametrize("rate", [16000, 22050, 24000, 48000])
async def test_frames_are_fixed_size_and_numbered(engine, rate):
    events = await speak(engine, "Frames come in twenty millisecond steps.", options=StreamOptions(sample_rate=rate))
    frames = [e for e in events if isinstance(e, AudioFrame)]
    assert isinstance(events[-1], StreamEnd) and events[-1].reason == "done"
    assert len(frames) > 20
    assert {len(f.pcm) for f in frames} == {rate * 20 // 1000 * 2}
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert all(f.sample_rate == rate for f in frames)
    assert frames[-1].pts == pytest.approx((len(frames) - 1) * 0.02)


async def test_word_timestamps_follow_the_words_in_order(engine):
    events = await speak(engine, PARAGRAPH)
    words = [e for e in events if isinstance(e, WordTimestamp)]
    audio_seconds = len(pcm(events)) / 22050
    expected = [w.strip(",.") for w in PARAGRAPH.split()]
    assert [w.word.strip(",.") for w in words] == expected
    assert all(w.start < w.end for w in words)
    assert all(a.end <= b.start + 1e-6 for a, b in zip(words, words[1:]))
    assert words[-1].end <= audio_seconds + 1e-6
    # Every word event arrives before the audio it describes has all been delivered.
    first_frame = next(i for i, e in enumerate(events) if isinstance(e, AudioFrame))
    assert events.index(words[0]) < first_frame


async def test_same_seed_same_audio_other_seed_other_audio(engine):
    a = pcm(await speak(engine, "Determinism matters for tests.", seed=7))
    b = pcm(await speak(engine, "Determinism matters for tests.", seed=7))
    c = pcm(await speak(engine, "Determinism matters for tests.", seed=8))
    assert np.array_equal(a, b)
    assert not (len(a) == len(c) and np.array_equal(a, c))


async def test_cancel_stops_within_one_block_and_emits_nothing_after(engine):
    stream = engine.open_stream()
    await stream.push(PARAGRAPH * 3)
    await stream.end()
    seen = []
    async for event in stream:
        seen.append(event)
        if sum(isinstance(e, AudioFrame) for e in seen) == 3:
            blocks_at_cancel = stream._decoder.blocks_done
            stream.cancel()
    assert isinstance(seen[-1], StreamEnd) and seen[-1].reason == "cancelled"
    after_cancel = seen[seen.index(next(e for e in seen if isinstance(e, AudioFrame))) + 3 :]
    assert after_cancel == [seen[-1]]
    await asyncio.sleep(0.5)
    assert stream._decoder.blocks_done <= blocks_at_cancel + 1
    assert stream._task.done()
    with pytest.raises(StreamClosed):
        await stream.push("more")


async def test_aclose_leaves_no_task_behind(engine):
    before = {t for t in asyncio.all_tasks() if t.get_name().startswith("voxflow")}
    stream = engine.open_stream()
    await stream.push(PARAGRAPH)
    await stream.flush()
    async for event in stream:
        if isinstance(event, AudioFrame):
            break
    await stream.aclose()
    after = {t for t in asyncio.all_tasks() if t.get_name().startswith("voxflow")}
    assert after == before


async def test_a_stalled_stream_speaks_what_it_has(engine):
    stream = engine.open_stream()
    await stream.push("Half a sentence and then")
    first = await asyncio.wait_for(anext(aiter(stream)), timeout=30)
    assert isinstance(first, (WordTimestamp, AudioFrame))
    await stream.aclose()


async def test_flush_delivers_all_audio_so_far(engine):
    stream = engine.open_stream()
    await stream.push("Speak this right now.")
    await stream.flush()
    frames = []
    async for event in stream:
        if isinstance(event, AudioFrame):
            frames.append(event)
        if sum(f.duration for f in frames) > 1.0:
            break
    assert sum(f.duration for f in frames) > 1.0
    await stream.aclose()


async def test_styles_change_speed_and_volume(engine):
    base = pcm(await speak(engine, "How fast and how loud is this?"))
    fast = pcm(await speak(engine, "How fast and how loud is this?", style=Style(speed=1.6)))
    quiet = pcm(await speak(engine, "How fast and how loud is this?", style=Style(volume=0.5)))
    assert len(fast) < 0.8 * len(base)
    assert np.sqrt(np.mean(quiet**2)) == pytest.approx(0.5 * np.sqrt(np.mean(base**2)), rel=0.05)
    with pytest.raises(InvalidRequest):
        Style(speed=10)


@pytest.mark.parametrize(
    "text",
    ["", "   \n\t ", "\ud800 lone surrogate", "control\x00\x07 characters\x1b", "日本語のテキスト", "🙂🙂🙂", "**##**"],
)
async def test_odd_text_never_crashes_or_hangs(engine, text):
    events = await asyncio.wait_for(speak(engine, text), timeout=60)
    assert isinstance(events[-1], StreamEnd)
    assert events[-1].reason in ("done", "error")
    if events[-1].reason == "error":
        assert events[-1].code and events[-1].message


async def test_text_limits_are_enforced(engine):
    stream = engine.open_stream(options=StreamOptions(max_text_chars=1000))
    await stream.push("a" * 1000)
    with pytest.raises(LimitExceeded):
        await stream.push("b")
    with pytest.raises(InvalidRequest):
        await stream.push(b"bytes")  # type: ignore[arg-type]
    await stream.aclose()


async def test_hundred_thousand_characters_are_refused_cleanly(engine):
    stream = engine.open_stream()
    with pytest.raises(LimitExceeded):
        await stream.push("word " * 20_001)
    await stream.aclose()


def test_whole_path_is_deterministic_and_timed(engine):
    a = engine.synthesize("A whole sentence at once.", seed=3)
    b = engine.synthesize("A whole sentence at once.", seed=3)
    assert np.array_equal(a.audio, b.audio)
    assert [w.word for w in a.words] == ["A", "whole", "sentence", "at", "once."]
    assert a.words[-1].end <= a.duration + 1e-6


def test_whole_path_splits_run_on_text(engine, monkeypatch):
    """Text without punctuation must not reach the quadratic encoder in one piece."""
    model = engine.voice().model
    seen: list[int] = []
    original = model.infer_latents

    def spy(ids, *args):
        seen.append(ids.shape[1])
        return original(ids, *args)

    monkeypatch.setattr(model, "infer_latents", spy)
    utt = engine.synthesize("word " * 400)
    assert len(utt.words) == 400
    assert len(seen) >= 400 // 60
    per_word = len(engine.voice().phonemizer.phonemize("word " * 10).ids) / 10
    assert max(seen) <= 61 * per_word  # the split's 60-word cap, plus BOS/EOS


async def test_a_reader_that_pauses_gets_everything_with_bounded_buffering(engine):
    options = StreamOptions(output_queue=16)
    stream = engine.open_stream(options=options)
    await stream.push(PARAGRAPH)
    await stream.end()
    await asyncio.sleep(1.5)  # far longer than synthesising the paragraph takes
    assert stream._output.qsize() <= 16  # the producer waits for the reader
    assert not stream._task.done()
    events = await asyncio.wait_for(collect(stream), timeout=60)
    assert events[-1] == StreamEnd(stream.context_id, "done")
    assert len(pcm(events)) / 22050 > 5  # the whole paragraph, nothing dropped


async def test_cancel_frees_a_push_that_waits_for_room(engine):
    """A client that stops reading and keeps sending fills the queues; dropping its context
    must free the handler stuck in push(), or the connection's slot is lost for good."""
    stream = engine.open_stream(cached=False, options=StreamOptions(input_queue=2, output_queue=2))
    await stream.push("One. ")
    await stream.push("Two. ")
    await asyncio.sleep(0.5)  # the stream runs until its output is full, then waits for a reader
    pushes = asyncio.create_task(_push_forever(stream))
    await asyncio.sleep(0.2)
    assert not pushes.done()  # waiting for room
    stream.cancel()
    with pytest.raises(StreamClosed):
        await asyncio.wait_for(pushes, timeout=5)
    await stream.aclose()


async def _push_forever(stream) -> None:
    while True:
        await stream.push("More words. ")
