"""Streamed speech against the same text rendered whole: lookahead, context, pauses, block sizes.

Noise is off (expressiveness 0), so whole and streamed renderings are deterministic and any
difference comes from what the streaming path could not see when it spoke.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from voxflow.streaming.chunker import ChunkerOptions
from voxflow.streaming.decoder_blocks import BlockDecoder, BlockOptions
from voxflow.streaming.events import AudioFrame, StreamEnd, WordTimestamp
from voxflow.streaming.stream import StreamOptions
from voxflow.voices.styles import Style
from waiting import until

NOISE_OFF = Style(expressiveness=0.0)

# Long sentences whose first four words are spoken before the rest exists.
SENTENCES = [
    "I checked your calendar and you have a free slot tomorrow afternoon between two and four, so I can book it.",
    "The train to the city leaves every twenty minutes, and the last one departs just before midnight.",
    "If you want, I can set a reminder for the dentist appointment on Thursday at nine in the morning.",
    "Your package was delivered this morning and left at the front door next to the blue flower pot.",
]


class Listener:
    def __init__(self, stream) -> None:
        self.events: list = []
        self.first_audio = asyncio.Event()
        self.task = asyncio.create_task(self._read(stream))

    async def _read(self, stream) -> None:
        async for event in stream:
            self.events.append(event)
            if isinstance(event, AudioFrame):
                self.first_audio.set()

    async def done(self) -> list:
        await asyncio.wait_for(self.task, timeout=120)
        return self.events


async def stream_first_words_then_rest(engine, text: str, style: Style = NOISE_OFF, seed: int = 0) -> list:
    """Four words arrive and are spoken; the rest of the sentence arrives while they play."""
    words = text.split()
    # No stall while the first words are computed, however busy the machine: this is about
    # lookahead and context, not pauses.
    patient = StreamOptions(chunker=ChunkerOptions(stall_timeout_s=10.0))
    stream = engine.open_stream(style=style, cached=False, seed=seed, options=patient)
    listener = Listener(stream)
    await stream.push(" ".join(words[:5]))  # the fifth word is not complete yet: four are cut
    await asyncio.wait_for(listener.first_audio.wait(), timeout=60)
    await stream.push(" " + " ".join(words[5:]))
    await stream.end()
    return await listener.done()


def word_durations(words) -> list[tuple[str, float]]:
    return [(w.word, round(w.end - w.start, 4)) for w in words]


async def equal_word_durations(engine, style: Style, seed: int = 0) -> tuple[float, list[float]]:
    """The fraction of words as long streamed as whole, and each sentence's length ratio."""
    same = total = 0
    duration_ratios = []
    for text in SENTENCES:
        whole = engine.synthesize(text, style=style, seed=seed)
        events = await stream_first_words_then_rest(engine, text, style, seed)
        assert isinstance(events[-1], StreamEnd) and events[-1].reason == "done"
        streamed = [e for e in events if isinstance(e, WordTimestamp)]
        assert [w.word for w in streamed] == [w.word for w in whole.words]
        pairs = list(zip(word_durations(whole.words), word_durations(streamed)))
        same += sum(abs(a[1] - b[1]) < 1e-3 for a, b in pairs)
        total += len(pairs)
        duration_ratios.append(streamed[-1].end / whole.words[-1].end)
    return same / total, duration_ratios


async def test_streamed_words_last_as_long_as_in_the_whole_rendering(engine):
    same, duration_ratios = await equal_word_durations(engine, NOISE_OFF)
    # Speaking each chunk as it came, with no lookahead and a 48-id left context, kept the
    # length of 26 of these 75 words (35 %), and totals were off by up to 5.7 %.
    assert same >= 0.75
    assert all(abs(r - 1) < 0.02 for r in duration_ratios), duration_ratios


async def test_with_noise_on_a_seed_draws_the_same_noise_streamed_as_whole(engine):
    """So a streamed reply differs from the whole one only where the model saw less text."""
    same, duration_ratios = await equal_word_durations(engine, Style(), seed=3)
    assert same >= 0.75
    assert all(abs(r - 1) < 0.03 for r in duration_ratios), duration_ratios


async def test_a_pause_in_the_text_continues_the_sentence(engine, monkeypatch):
    voice = engine.voice()
    calls: list[tuple[str, bool, bool]] = []
    phonemize = voice.phonemizer.phonemize

    def spy(text: str, *, bos: bool = True, eos: bool = True):
        calls.append((text, bos, eos))
        return phonemize(text, bos=bos, eos=eos)

    monkeypatch.setattr(voice.phonemizer, "phonemize", spy)
    stream = engine.open_stream(style=NOISE_OFF, cached=False)
    listener = Listener(stream)
    await stream.push("Well, I think that we should")
    # The text stalls: everything so far is said, including the words held for lookahead.
    await until(lambda: any(isinstance(e, WordTimestamp) and e.word == "should" for e in listener.events), 60, poll=0.01)
    await asyncio.sleep(0.5)  # the last frames of the paused part are out
    before_pause = len(listener.events)
    context_kept = list(stream._acoustic.context)
    await stream.push(" go to the park tomorrow.")
    await stream.end()
    events = await listener.done()

    assert context_kept, "the sentence's context was dropped at the pause"
    assert calls[0][1:] == (True, False)  # the sentence opens once ...
    assert all(not bos for _, bos, _ in calls[1:])  # ... and is never reopened
    assert [eos for _, _, eos in calls].count(True) == 1 and calls[-1][2]  # closed once, at the end
    words = [e.word for e in events if isinstance(e, WordTimestamp)]
    assert words == ["Well,", "I", "think", "that", "we", "should", "go", "to", "the", "park", "tomorrow."]
    # The silence of the pause is clean: the audio fades out before it and in after it.
    after = [e for e in events[before_pause:] if isinstance(e, AudioFrame)]
    resumed = np.frombuffer(after[0].pcm, dtype=np.int16).astype(np.float32) / 32768
    loudest = max(np.abs(np.frombuffer(e.pcm, dtype=np.int16)).max() for e in after) / 32768
    assert np.abs(resumed[:16]).max() < 0.05 * loudest


def test_the_first_block_after_a_release_is_small_again(engine):
    voice = engine.voice()
    decoder = BlockDecoder(voice.model.dec, voice.hop_length, voice.decoder_receptive_frames)
    first_plan = [(0, 10), (10, 52), (52, 100)]
    assert decoder.plan(100) == first_plan
    z = torch.zeros(1, voice.model.cfg.inter_channels, 100)
    joined = decoder.begin_chunk(z)
    for start, end in decoder.plan(100):
        decoder.decode_block(joined, start, end)
    assert decoder.plan(100) == [(0, 100)]  # mid-utterance: large blocks (a short rest joins the last)
    decoder.release()
    assert decoder.plan(100) == first_plan


@pytest.mark.parametrize("receptive", [8, 11])
def test_decoder_context_comes_from_the_voice(engine, receptive):
    voice = engine.voice()
    assert voice.decoder_receptive_frames == 11  # medium voice: HiFi-GAN type 2, (8, 8, 4)
    decoder = BlockDecoder(voice.model.dec, voice.hop_length, receptive)
    assert decoder.context == receptive
    assert BlockDecoder(voice.model.dec, voice.hop_length, receptive, BlockOptions(context_frames=5)).context == 5


def test_whole_text_is_rendered_sentence_by_sentence_never_clause_by_clause(engine, monkeypatch):
    # The reference streaming is measured against: Piper's rendering, one espeak sentence per
    # model call. A comma must not end a sentence there.
    voice = engine.voice()
    lengths: list[int] = []
    infer_latents = voice.model.infer_latents

    def spy(ids, *args, **kwargs):
        lengths.append(ids.shape[1])
        return infer_latents(ids, *args, **kwargs)

    monkeypatch.setattr(voice.model, "infer_latents", spy)
    engine.synthesize("Happy birthday, Emma! On every other day, it is open from ten, until six.", style=NOISE_OFF)
    expected = [len(p.ids) for p in voice.phonemizer.phonemize_sentences("Happy birthday, Emma! On every other day, it is open from ten, until six.")]
    assert lengths == expected and len(lengths) == 2
