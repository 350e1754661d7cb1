"""Intelligibility: an off-the-shelf recogniser must understand what the engine says.

Every sentence is rendered twice, whole-text and streamed as LLM-like tokens, and both are
transcribed with pocketsphinx. The thresholds are loose because pocketsphinx is a weak
recogniser even on clean speech; what they catch is audio that turned into noise, clicks,
silence, garbled joins between streamed chunks, or the streaming path drifting from the
whole-text path.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import pytest

from voxflow.streaming.engine import Engine
from voxflow.streaming.events import AudioFrame, StreamEnd
from voxflow.streaming.tokens import gpt_like_tokens

# tests/ is not a package; pytest puts it on sys.path, so the helper imports by its bare name.
from speech import pcm_to_float, transcribe, word_error_rate

# Everyday assistant replies in common words, so that recognition errors come from the audio
# rather than from gaps in pocketsphinx's language model.
SENTENCES = [
    "Sure, I can help you with that right now.",
    "The weather today is sunny with a light breeze.",
    "Your meeting has been moved to three o'clock this afternoon.",
    "I have added milk and bread to your shopping list.",
    "It will take about twenty minutes to get there by car.",
    "Please remember to call your mother this evening.",
    "The store closes at nine tonight, so you still have time.",
    "I could not find any new messages in your inbox.",
    "Would you like me to play some music while you work?",
    "The train leaves from the station at half past seven.",
    "Thank you for waiting, your order is on the way.",
    "I set an alarm for six in the morning.",
    "There is a small restaurant around the corner that serves good food.",
    "You have two new emails and one missed call.",
    "The temperature will drop below freezing later tonight.",
    "Let me know if you need anything else today.",
    "I turned off the lights in the kitchen and the living room.",
    "Traffic is heavy on the main road, so leave a little early.",
    "Your package was delivered to the front door an hour ago.",
    "Drinking water every day is good for your health.",
    "The library is open from ten in the morning until six.",
    "I am sorry, but I did not understand the question.",
    "Here is a simple recipe for chicken soup with rice.",
    "The next bus should arrive in about five minutes.",
    "Do not forget to bring an umbrella because it might rain.",
    "I will remind you about the doctor appointment next week.",
]

MAX_WHOLE_WER = 0.30
MAX_STREAM_WER_GAP = 0.05  # streaming may cost a little, never much, against whole-text rendering
MIN_RMS = 0.01  # speech from this voice sits around 0.05; silence or a few clicks stay far below


@dataclass(frozen=True)
class Rendering:
    text: str
    whole: np.ndarray
    whole_rate: int
    streamed: np.ndarray
    streamed_rate: int
    whole_hyp: str
    streamed_hyp: str


async def _render_streamed(engine: Engine, text: str) -> tuple[np.ndarray, int]:
    """Feed the text as chat-model tokens, all at once: the chunker cuts on word counts and
    punctuation, not on arrival times, so pacing would only make the test slower."""
    stream = engine.open_stream(seed=0)
    for token in gpt_like_tokens(text):
        await stream.push(token)
    await stream.end()
    frames: list[AudioFrame] = []
    end: StreamEnd | None = None
    async for event in stream:
        if isinstance(event, AudioFrame):
            frames.append(event)
        elif isinstance(event, StreamEnd):
            end = event
    assert end is not None and end.reason == "done", f"stream for {text!r} ended with {end}"
    assert frames, f"stream for {text!r} produced no audio"
    assert len({f.sample_rate for f in frames}) == 1, "frames of one stream changed sample rate"
    return pcm_to_float(frames), frames[0].sample_rate


async def _render_all_streamed(engine: Engine) -> list[tuple[np.ndarray, int]]:
    return [await _render_streamed(engine, text) for text in SENTENCES]


@pytest.fixture(scope="module")
def renderings(engine: Engine) -> list[Rendering]:
    """Render and transcribe every sentence once; the tests below only read the results."""
    streamed = asyncio.run(_render_all_streamed(engine))
    out = []
    for text, (audio, rate) in zip(SENTENCES, streamed):
        utt = engine.synthesize(text, seed=0)
        out.append(
            Rendering(
                text, utt.audio, utt.sample_rate, audio, rate,
                transcribe(utt.audio, utt.sample_rate), transcribe(audio, rate),
            )
        )
    return out


def test_sentences_are_intelligible_whole_and_streamed(renderings: list[Rendering]) -> None:
    refs = [r.text for r in renderings]
    whole_wer = word_error_rate(refs, [r.whole_hyp for r in renderings])
    streamed_wer = word_error_rate(refs, [r.streamed_hyp for r in renderings])
    for r in renderings:
        print(f"\n  ref:      {r.text}\n  whole:    {r.whole_hyp}\n  streamed: {r.streamed_hyp}")
    print(f"\nWER whole {whole_wer:.3f}, streamed {streamed_wer:.3f} over {len(refs)} sentences")
    assert whole_wer <= MAX_WHOLE_WER
    assert streamed_wer <= whole_wer + MAX_STREAM_WER_GAP


@pytest.mark.parametrize("index", range(len(SENTENCES)))
def test_streamed_audio_is_speech_of_plausible_length(renderings: list[Rendering], index: int) -> None:
    r = renderings[index]
    assert r.streamed_rate == r.whole_rate  # no rate was requested, so both use the voice's own
    rms = float(np.sqrt(np.mean(r.streamed.astype(np.float64) ** 2)))
    assert rms > MIN_RMS, f"streamed audio is near silent (rms {rms:.4f})"
    # The two paths chunk differently and draw different noise, so lengths differ a little;
    # a lost or repeated chunk shows up as a much larger ratio.
    ratio = (len(r.streamed) / r.streamed_rate) / (len(r.whole) / r.whole_rate)
    assert 0.6 <= ratio <= 1.6, f"streamed/whole duration ratio {ratio:.2f}"
