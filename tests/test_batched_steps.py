"""Acoustic steps of several streams taken in one batch: each stream gets its own step's result."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from voxflow.config import EngineConfig
from voxflow.streaming import acoustic
from voxflow.streaming.acoustic import AcousticState, StepRequest, step_together
from voxflow.streaming.engine import Engine
from voxflow.streaming.events import AudioFrame
from voxflow.voices.scales import Scales
from voxflow.voices.voice import Voice
from test_voice_shapes import CASES, random_model

# Different lengths, so every batch pads all but its longest sequence.
TEXTS = [
    "Sure, I can help",
    "I checked your calendar and you have a free slot tomorrow afternoon.",
    "Of course.",
    "The recipe needs two cups of flour and a pinch of salt",
]


@pytest.fixture(scope="module")
def voice(engine) -> Voice:
    """The default voice all in float32: batched and alone then agree to float32 rounding.
    (With the bfloat16 flow they agree to bfloat16's, amplified through the flow.)"""
    return Voice.load(engine.voice().info, decoder_precision="float32", flow_precision="float32")


def states(voice: Voice) -> list[AcousticState]:
    return [AcousticState(voice.model, voice.info.defaults, None, seed) for seed in range(len(TEXTS))]


def settle_all_but_the_last_word(durations: list[int]) -> int:
    return max(1, len(durations) - 6)


def two_steps_each(voice: Voice, batched: bool):
    """Two steps per stream (the second with the first's context), batched or one by one."""
    ids = [voice.phonemizer.phonemize(text, bos=True, eos=False).ids for text in TEXTS]
    streams = states(voice)
    out = []
    for settle in (settle_all_but_the_last_word, None):
        requests = [StepRequest(state, sequence, settle) for state, sequence in zip(streams, ids)]
        out.append(step_together(requests) if batched else [step_together([r])[0] for r in requests])
    return out, streams


def test_batched_steps_give_each_stream_its_own_steps_result(voice):
    (alone, alone_states), (batched, batched_states) = two_steps_each(voice, False), two_steps_each(voice, True)
    for step_alone, step_batched in zip(alone, batched):
        for a, b in zip(step_alone, step_batched):
            assert a.ids == b.ids
            assert torch.equal(a.durations, b.durations)
            assert a.z.shape == b.z.shape and a.right.shape == b.right.shape
            torch.testing.assert_close(b.z, a.z, atol=2e-3, rtol=0)
            torch.testing.assert_close(b.right, a.right, atol=2e-3, rtol=0)
    for a, b in zip(alone_states, batched_states):  # what the next step builds on
        assert a.context == b.context
        torch.testing.assert_close(b.prior_tail, a.prior_tail, atol=1e-4, rtol=0)
        assert torch.equal(a.duration_noise, b.duration_noise)


def test_a_batch_of_one_runs_unpadded_like_the_whole_rendering(voice):
    """A lone step of a whole fresh sentence is the whole-sentence rendering, to the bit: no
    mask or padding enters the arithmetic of a batch of one."""
    ids = voice.phonemizer.phonemize(TEXTS[1], bos=True, eos=True).ids
    latents = step_together([StepRequest(states(voice)[0], ids)])[0]
    with torch.inference_mode():
        whole, durations = voice.model.infer_latents(torch.as_tensor(ids)[None], voice.info.defaults)
    assert torch.equal(latents.durations, durations)
    assert torch.equal(latents.z, whole)


def test_each_stream_of_a_batch_keeps_its_own_speaker():
    """A multi-speaker voice: speaker conditioning [batch, gin, 1] reaches each row's step."""
    model = random_model(CASES["medium_multi_speaker"].cfg).eval()
    ids = [[1, 20, 3, 21, 4, 22, 2], [1, 30, 5, 31, 6, 32, 7, 33, 8, 34, 2], [1, 40, 2]]
    speakers = [0, 2, 1]

    def fresh() -> list[AcousticState]:
        return [AcousticState(model, Scales(), speaker, seed) for seed, speaker in enumerate(speakers)]

    alone = [step_together([StepRequest(state, sequence)])[0] for state, sequence in zip(fresh(), ids)]
    batched = step_together([StepRequest(state, sequence) for state, sequence in zip(fresh(), ids)])
    for a, b in zip(alone, batched):
        assert torch.equal(a.durations, b.durations)
        torch.testing.assert_close(b.z, a.z, atol=2e-3, rtol=0)
    assert not torch.equal(alone[0].z[:, :, :4], alone[1].z[:, :, :4])  # the speakers do differ


def test_steps_of_different_models_are_refused(voice, engine):
    other = AcousticState(engine.voice().model, voice.info.defaults, None, 0)
    ids = voice.phonemizer.phonemize("Hello.", bos=True, eos=True).ids
    with pytest.raises(ValueError, match="share a model"):
        step_together([StepRequest(states(voice)[0], ids), StepRequest(other, ids)])


async def replies(engine: Engine, texts: list[str]) -> list[np.ndarray]:
    """Each text in one piece on its own stream, all opened at once."""

    async def one(text: str) -> np.ndarray:
        stream = engine.open_stream(cached=False)
        await stream.push(text)
        await stream.end()
        pcm = b"".join([e.pcm async for e in stream if isinstance(e, AudioFrame)])
        return np.frombuffer(pcm, dtype=np.int16)

    return await asyncio.wait_for(asyncio.gather(*(one(text) for text in texts)), 120)


@pytest.fixture()
def batch_sizes(monkeypatch) -> list[int]:
    sizes: list[int] = []
    real = acoustic.step_together

    def counting(requests):
        sizes.append(len(requests))
        return real(requests)

    monkeypatch.setattr("voxflow.streaming.stream.step_together", counting)
    return sizes


async def test_streams_that_start_together_share_steps_and_sound_as_alone(batch_sizes):
    engine = Engine(EngineConfig(workers=1, threads=1), concurrent=True)
    try:
        await engine.warm_up()
        alone = [(await replies(engine, [text]))[0] for text in TEXTS]
        batch_sizes.clear()
        together = await replies(engine, TEXTS)
    finally:
        engine.close()
    assert max(batch_sizes) > 1  # the first steps, queued at once, ran as one
    for a, b in zip(alone, together):
        assert len(a) == len(b)  # same durations: same words, same timing
        # The same audio up to rounding (bfloat16 in the flow and decoder here): nearly all of
        # the signal's energy is shared.
        residual = np.sum((a.astype(np.float64) - b) ** 2) / np.sum(a.astype(np.float64) ** 2)
        assert residual < 0.05


async def test_max_batch_one_keeps_every_reply_bit_identical_under_load(batch_sizes):
    engine = Engine(EngineConfig(workers=1, threads=1, max_batch=1), concurrent=True)
    try:
        await engine.warm_up()
        alone = [(await replies(engine, [text]))[0] for text in TEXTS]
        together = await replies(engine, TEXTS)
    finally:
        engine.close()
    assert set(batch_sizes) == {1}
    for a, b in zip(alone, together):
        assert np.array_equal(a, b)


def test_max_batch_below_one_is_refused():
    with pytest.raises(Exception, match="max_batch"):
        Engine(EngineConfig(max_batch=0))
