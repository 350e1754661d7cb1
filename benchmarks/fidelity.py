"""Fidelity of streamed speech: how close a reply fed token by token, as an LLM writes it,
sounds to the same reply rendered whole.

Every reply in ITEMS is rendered whole (`Engine.synthesize`) and streamed as LLM-like tokens
at 20 and 50 tokens/s (`Engine.open_stream`), all in this process:

- Noise off (`Style(expressiveness=0)`, which makes both paths deterministic): the phoneme
  durations the two paths settle (ids aligned with difflib; the share of the whole
  rendering's ids whose streamed duration is the same), the total-duration ratio, and on the
  audio, trimmed of leading and trailing silence, mel-cepstral distortion along a DTW path and
  the correlation of the F0 contours along that same path.
- Default style (noise on, as served): pocketsphinx word error rate of every rendering, summed
  over several noise seeds (--seeds, default 6), and first audio after the first token (first
  seed). Six, not three: on one code, streamed-minus-whole WER at 20 tokens/s was +0.016 over
  seeds 0-2 and -0.006 over seeds 3-5, so three seeds (1,734 words) could not tell the 0.01
  target from chance.
- First frame after a six-word clause pushed whole and flushed.

The MCD is taken over librosa MFCCs (c1-c24, in natural-log units so that the usual
10 / ln 10 factor gives dB), not over the SPTK mel-cepstra of the literature, so its values
are not comparable with published figures: compare it between runs of this benchmark
(--baseline), not with papers.

The table gives each target; --check exits with status 1 when one is missed. MCD and F0
correlation have a target only against --baseline (an earlier JSON of this benchmark, same
items): half the baseline's distance.

    python benchmarks/fidelity.py [--items N] [--seeds N] [--baseline PATH] [--check] [--out PATH]
        [--lookahead-phonemes N] [--context-phonemes N] [--first-chunk-words N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any
from unittest.mock import patch

import jiwer
import librosa
import numpy as np
import parselmouth
import soxr
import torch
from pocketsphinx import Decoder

from voxflow.config import EngineConfig
from voxflow.streaming.acoustic import AcousticOptions, ChunkLatents, StepRequest, step_together
from voxflow.streaming.chunker import ChunkerOptions
from voxflow.streaming.engine import Engine
from voxflow.streaming.events import AudioFrame, StreamEnd
from voxflow.streaming.stream import StreamOptions
from voxflow.streaming.tokens import gpt_like_tokens, paced
from voxflow.voices.styles import Style
from voxflow.voices.vits.model import VitsSynthesizer
from report import add_check_flag, finish, print_table, stamp, write_json

# Numbers are written as words: the reference must be what espeak says and what pocketsphinx
# can write back, and neither side of that is reliable for digits.
ITEMS: list[tuple[str, str]] = [
    ("short", "Sure!"),
    ("short", "Happy birthday, Emma!"),
    ("short", "Great, thank you."),
    ("short", "No problem at all."),
    ("short", "Of course, right away."),
    ("short", "That sounds great to me."),
    ("short", "Good morning!"),
    ("short", "I am not sure."),
    ("short", "Yes, please."),
    ("short", "See you tomorrow."),
    ("short", "Thank you so much!"),
    ("short", "Let me think."),
    ("names", "Jonathan Miller called, and John Miller will call back later."),
    ("names", "Mary Thompson says the report is ready."),
    ("names", "Maria Lopez can see you right after Peter Wilson."),
    ("names", "Michelle and Michael both asked about the schedule."),
    ("names", "I sent the invitation to Robert Taylor and his sister Susan."),
    ("names", "Your next meeting is with David Brown from the sales team."),
    ("names", "Jennifer Johnson says hello to you and Peter."),
    ("names", "Ask Rachel Green if she has the car keys."),
    ("names", "Steven Clark will be late today. He will join the call at ten."),
    ("numbers", "The meeting starts at twenty five past nine."),
    ("numbers", "Your flight leaves on the fourth of July at seven in the evening."),
    ("numbers", "That comes to forty two dollars and fifty cents."),
    ("numbers", "The store opens at eight thirty on Saturday morning."),
    ("numbers", "There are three hundred and twelve people on the list."),
    ("numbers", "You see the dentist on Tuesday, the twelfth of March."),
    ("numbers", "It is eighteen degrees outside, and it will reach twenty four by noon."),
    ("numbers", "Please call back in fifteen minutes."),
    ("numbers", "The box weighs three pounds. Shipping is nine dollars."),
    ("lists", "You need eggs, flour, sugar, butter and milk."),
    ("lists", "Bring a towel, a blanket, sunscreen and some water."),
    ("lists", "We have red, green, blue and yellow paint."),
    ("lists", "We visited Paris, Rome, Madrid and London last summer."),
    ("lists", "Tonight you can have pizza, pasta, rice or noodles."),
    ("lists", "Remember your passport, your tickets, your wallet and a warm jacket."),
    ("lists", "The team needs a designer, three engineers and a manager."),
    ("lists", "Monday, Wednesday and Friday are all free next week."),
    ("lists", "Buy apples, bananas, lemons and oranges for the party."),
    ("long", "I looked at the forecast for the weekend, and it should stay dry on Saturday, but you should bring a coat on Sunday afternoon when the storm comes."),
    ("long", "The library closes early on holidays, so if you want to return the books before the weekend, you should go there tomorrow morning before lunch."),
    ("long", "Your order was sent this morning and should reach you on Thursday, although some deliveries in your area can take a little longer."),
    ("long", "I can book a table for six at the Italian place near the station, or we could try the new bakery that opened down the street last month."),
    ("long", "The software update fixes several problems with the camera, but the phone needs to restart, so please save your work before you install it tonight."),
    ("long", "When you reach the end of the road, turn right at the bakery, keep walking past the park, and you will see the museum on your left."),
    ("long", "My brother wanted to learn the piano when he was a child, but he spent most of his time playing football with his friends in the garden instead."),
    ("long", "The hotel has a quiet room on the third floor with a view over the lake, and breakfast is served every morning between seven and ten."),
    ("long", "If the heating still does not work after you restart the boiler, call the repair service, and they will send someone out within two days."),
    ("long", "We delivered the project a week early because everyone worked well together, and the customer was so happy that she asked us to start another one."),
    ("long", "The museum does not open on Mondays. On every other day it is open from ten in the morning until six in the evening."),
]
SIX_WORDS = [
    "The kettle has just finished boiling.",
    "Your taxi will arrive very soon.",
    "I saved the file for you.",
    "The printer on floor two jammed.",
    "Please sign the form before noon.",
    "She already replied to your message.",
    "The lights in the hall dimmed.",
    "We can meet after your class.",
    "That song was playing all morning.",
    "The bakery sells fresh bread daily.",
]

RATES = (20, 50)  # tokens per second
QUIET = Style(expressiveness=0.0)  # both noise terms zero: whole and streamed are deterministic
NOISY = Style()
SEED = 0
SHORT_WORDS = 5
FLUSH_RUNS = 20

# Features: the common TTS analysis at 22050 Hz (1024-point FFT, 80 mels, hop 256 = 11.6 ms);
# F0 uses the same hop so one DTW path serves both measures.
HOP = 256
N_FFT = 1024
N_MELS = 80
N_MFCC = 25
TRIM_DB = 40
MCD_SCALE = 10 / np.log(10)
# librosa's MFCCs are cepstra of a dB mel spectrum; the MCD formula expects natural-log cepstra
# (its 10 / ln 10 is what turns those into dB), so they are converted first.
DB_TO_NEPER = np.log(10) / 10
MIN_VOICED_FRAMES = 10  # fewer frames voiced in both gives no meaningful correlation
ASR_RATE = 16_000  # pocketsphinx's en-us acoustic model is trained on 16 kHz audio
# pocketsphinx often mishears the first word of speech that starts at the first sample; the
# same silence around every rendering keeps that from deciding a comparison.
ASR_PAD_SECONDS = 0.3

WER_MARGIN = 0.01
MIN_EQUAL_DURATIONS = 0.90
MAX_DURATION_DRIFT = 0.02
FIRST_AUDIO_P50_MS = {20: 250.0, 50: 200.0}
FLUSH_P50_MS = 50.0


@dataclass
class DurationTrace:
    """The phoneme ids one rendering spoke, in order, and the frames the model gave each."""

    ids: list[int] = field(default_factory=list)
    durations: list[int] = field(default_factory=list)

    def add(self, ids: list[int], durations: list[int]) -> None:
        if len(ids) != len(durations):
            raise ValueError(f"{len(ids)} phoneme ids but {len(durations)} durations")
        self.ids += ids
        self.durations += durations

    @property
    def frames(self) -> int:
        return sum(self.durations)


def _ints(ids: Sequence[int] | torch.Tensor) -> list[int]:
    return [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]


@contextmanager
def recorded_durations() -> Iterator[DurationTrace]:
    """Durations settled by the whole path (per sentence) and the streamed path (per chunk).

    The model class and the stream module's step function are patched, not an instance, so
    the calls made on the engine's compute threads are seen too; hence only one rendering may
    run inside the block.
    """
    trace = DurationTrace()
    infer_latents = VitsSynthesizer.infer_latents

    def recording_infer_latents(model: VitsSynthesizer, ids: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        z, durations = infer_latents(model, ids, *args, **kwargs)
        trace.add(_ints(ids[0]), _ints(durations))
        return z, durations

    def recording_steps(requests: Sequence[StepRequest]) -> list[ChunkLatents]:
        results = step_together(requests)
        for latents in results:  # the ids each step settled (the rest wait for more context)
            trace.add(list(latents.ids), _ints(latents.durations))
        return results

    with patch.object(VitsSynthesizer, "infer_latents", recording_infer_latents), patch("voxflow.streaming.stream.step_together", recording_steps):
        yield trace


def equal_durations(whole: DurationTrace, streamed: DurationTrace) -> int:
    """How many of the whole rendering's ids the streamed one matched with the same duration."""
    matcher = SequenceMatcher(None, whole.ids, streamed.ids, autojunk=False)
    return sum(
        whole.durations[a + k] == streamed.durations[b + k]
        for a, b, size in matcher.get_matching_blocks()
        for k in range(size)
    )


def _as_delivered(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32) / 32767.0


async def render_streamed(
    engine: Engine, text: str, style: Style, tps: float, options: StreamOptions, seed: int = SEED
) -> tuple[np.ndarray, int, float]:
    """(audio, rate, first audio in ms after the first token was pushed)."""
    stream = engine.open_stream(style=style, cached=False, seed=seed, options=options)
    first_push: float | None = None

    async def feed() -> None:
        nonlocal first_push
        async for token in paced(gpt_like_tokens(text), tps):
            if first_push is None:
                first_push = time.perf_counter()
            await stream.push(token)
        await stream.end()

    feeder = asyncio.create_task(feed())
    pcm: list[bytes] = []
    rates: set[int] = set()
    first_audio: float | None = None
    async for event in stream:
        if isinstance(event, AudioFrame):
            if first_audio is None:
                first_audio = time.perf_counter()
            pcm.append(event.pcm)
            rates.add(event.sample_rate)
        elif isinstance(event, StreamEnd) and event.reason != "done":
            raise RuntimeError(f"stream for {text!r} ended with {event}")
    await feeder
    if first_push is None or first_audio is None or len(rates) != 1:
        raise RuntimeError(f"stream for {text!r} gave no audio or changed rate ({sorted(rates)})")
    audio = _as_delivered(np.frombuffer(b"".join(pcm), dtype="<i2"))
    return audio, rates.pop(), (first_audio - first_push) * 1000


def render_whole(engine: Engine, text: str, style: Style, seed: int = SEED) -> tuple[np.ndarray, int]:
    utterance = engine.synthesize(text, style=style, seed=seed)
    # The stream's framer turns float audio into PCM16 this way; both renderings are compared as delivered.
    pcm = np.clip(utterance.audio * 32767.0, -32767, 32767).astype(np.int16)
    return _as_delivered(pcm), utterance.sample_rate


def _cepstra(audio: np.ndarray, rate: int) -> np.ndarray:
    mfcc = librosa.feature.mfcc(y=audio, sr=rate, n_mfcc=N_MFCC, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS)
    return mfcc[1:] * DB_TO_NEPER  # c0 is loudness, not spectral shape


def _f0_on_frames(audio: np.ndarray, rate: int, n_frames: int) -> np.ndarray:
    """F0 in Hz on the MFCC frames (0 where unvoiced or outside Praat's frames)."""
    pitch = parselmouth.Sound(audio.astype(np.float64), sampling_frequency=rate).to_pitch(time_step=HOP / rate)
    f0 = pitch.selected_array["frequency"]
    # MFCC frame k is centred on sample k * HOP; Praat's frames start at x1, every dx seconds.
    index = np.rint((np.arange(n_frames) * HOP / rate - pitch.x1) / pitch.dx).astype(int)
    inside = (index >= 0) & (index < len(f0))
    out = np.zeros(n_frames)
    out[inside] = f0[index[inside]]
    return out


def signal_distance(whole: np.ndarray, streamed: np.ndarray, rate: int) -> tuple[float, float | None]:
    """(MCD along the DTW path, Pearson correlation of F0 over frames voiced in both)."""
    a, _ = librosa.effects.trim(whole, top_db=TRIM_DB)
    b, _ = librosa.effects.trim(streamed, top_db=TRIM_DB)
    ca, cb = _cepstra(a, rate), _cepstra(b, rate)
    _, path = librosa.sequence.dtw(X=ca, Y=cb, metric="euclidean")
    i, j = path[:, 0], path[:, 1]
    diff = ca[:, i] - cb[:, j]
    mcd = float(np.mean(MCD_SCALE * np.sqrt(2.0 * np.sum(diff**2, axis=0))))
    fa, fb = _f0_on_frames(a, rate, ca.shape[1])[i], _f0_on_frames(b, rate, cb.shape[1])[j]
    voiced = (fa > 0) & (fb > 0)
    if voiced.sum() < MIN_VOICED_FRAMES:
        return mcd, None
    corr = float(np.corrcoef(fa[voiced], fb[voiced])[0, 1])
    return mcd, corr if np.isfinite(corr) else None


class Transcriber:
    """pocketsphinx's en-us model, one whole utterance at a time."""

    def __init__(self) -> None:
        # The decoder's default batch CMN normalises each utterance by itself, so a transcript
        # does not depend on what was decoded before it.
        self._decoder = Decoder(samprate=ASR_RATE)

    def __call__(self, audio: np.ndarray, rate: int) -> str:
        resampled = soxr.resample(audio, rate, ASR_RATE) if rate != ASR_RATE else audio
        silence = np.zeros(int(ASR_PAD_SECONDS * ASR_RATE), dtype=np.float32)
        padded = np.concatenate([silence, resampled, silence])
        pcm = (np.clip(padded, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        self._decoder.start_utt()
        self._decoder.process_raw(pcm, full_utt=True)
        self._decoder.end_utt()
        hyp = self._decoder.hyp()
        return hyp.hypstr if hyp is not None else ""


def words(text: str) -> list[str]:
    """Lower-case words, punctuation dropped (a hyphen separates); apostrophes stay: "don't"."""
    return re.findall(r"[a-z']+", text.lower().replace("\u2019", "'"))


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Word substitutions, deletions and insertions from `ref` to `hyp`."""
    out = jiwer.process_words(" ".join(ref), " ".join(hyp))
    return out.substitutions + out.deletions + out.insertions


@dataclass(frozen=True)
class Closeness:
    """One streamed rendering against the whole one, noise off."""

    equal_ids: int
    frames: int
    mcd: float
    f0_corr: float | None


@dataclass(frozen=True)
class Heard:
    hypotheses: list[str]  # one per noise seed
    edits: int  # over all seeds


@dataclass(frozen=True)
class ItemResult:
    category: str
    text: str
    reference_words: int  # per rendering
    seeds: int
    whole_ids: int
    whole_frames: int
    closeness: dict[str, Closeness]  # by token rate
    heard: dict[str, Heard]  # "whole" and by token rate, default style
    first_audio_ms: dict[str, float]  # by token rate, default style


async def measure(engine: Engine, transcribe: Transcriber, category: str, text: str, options: StreamOptions, seeds: int) -> ItemResult:
    with recorded_durations() as whole_trace:
        whole, rate = render_whole(engine, text, QUIET)
    closeness: dict[str, Closeness] = {}
    for tps in RATES:
        with recorded_durations() as trace:
            streamed, streamed_rate, _ = await render_streamed(engine, text, QUIET, tps, options)
        if streamed_rate != rate:
            raise RuntimeError(f"streamed at {streamed_rate} Hz, whole at {rate} Hz")
        mcd, f0_corr = signal_distance(whole, streamed, rate)
        closeness[str(tps)] = Closeness(equal_durations(whole_trace, trace), trace.frames, mcd, f0_corr)

    reference = words(text)

    # With noise on, whole and streamed renderings draw their noise in a different order, so
    # each seed hears a different sample of both: WER is summed over several seeds.
    hypotheses: dict[str, list[str]] = {"whole": [], **{str(tps): [] for tps in RATES}}
    first_audio: dict[str, float] = {}
    for seed in range(seeds):
        hypotheses["whole"].append(transcribe(*render_whole(engine, text, NOISY, seed)))
        for tps in RATES:
            audio, audio_rate, first_ms = await render_streamed(engine, text, NOISY, tps, options, seed)
            hypotheses[str(tps)].append(transcribe(audio, audio_rate))
            first_audio.setdefault(str(tps), first_ms)
    heard = {key: Heard(heard, sum(edit_distance(reference, words(h)) for h in heard)) for key, heard in hypotheses.items()}
    return ItemResult(category, text, len(reference), seeds, len(whole_trace.ids), whole_trace.frames, closeness, heard, first_audio)


async def first_frame_after_flush(engine: Engine, text: str, options: StreamOptions) -> float:
    stream = engine.open_stream(cached=False, seed=SEED, options=options)
    start = time.perf_counter()
    await stream.push(text)
    await stream.flush()
    elapsed: float | None = None
    async for event in stream:
        if isinstance(event, AudioFrame):
            elapsed = time.perf_counter() - start
            break
    await stream.aclose()
    if elapsed is None:
        raise RuntimeError(f"no audio for {text!r}")
    return elapsed * 1000


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1)


def _wer(items: list[ItemResult], key: str) -> float:
    return sum(item.heard[key].edits for item in items) / sum(item.reference_words * item.seeds for item in items)


def summarize(items: list[ItemResult], flush_ms: list[float]) -> dict[str, Any]:
    rates = [str(tps) for tps in RATES]
    short = [item for item in items if item.reference_words <= SHORT_WORDS]
    worse = [item for item in items if any(item.heard[r].edits > item.heard["whole"].edits for r in rates)]
    first_audio_ms = {r: [item.first_audio_ms[r] for item in items] for r in rates}
    durations: dict[str, dict[str, Any]] = {}
    signal: dict[str, dict[str, Any]] = {}
    first_audio: dict[str, dict[str, float]] = {}
    for r in rates:
        ratios = [item.closeness[r].frames / item.whole_frames for item in items]
        correlations = [c for item in items if (c := item.closeness[r].f0_corr) is not None]
        durations[r] = {
            "equal_fraction": round(sum(item.closeness[r].equal_ids for item in items) / sum(item.whole_ids for item in items), 4),
            "total_ratio": round(sum(item.closeness[r].frames for item in items) / sum(item.whole_frames for item in items), 4),
            "item_ratio_range": [round(min(ratios), 4), round(max(ratios), 4)],
        }
        signal[r] = {
            "mcd": round(float(np.mean([item.closeness[r].mcd for item in items])), 3),
            "f0_corr": round(float(np.mean(correlations)), 4) if correlations else None,
            "f0_items": len(correlations),
        }
        first_audio[r] = {"p50": _pct(first_audio_ms[r], 50), "p95": _pct(first_audio_ms[r], 95), "n": len(items)}
    return {
        "items": len(items),
        "wer": {
            "reference_words": sum(item.reference_words for item in items),
            "seeds": items[0].seeds,
            **{k: round(_wer(items, k), 4) for k in ["whole", *rates]},
        },
        "wer_short": {"items": len(short), **({k: round(_wer(short, k), 4) for k in ["whole", *rates]} if short else {})},
        "short_items_streamed_worse": [item.text for item in worse if item.reference_words <= SHORT_WORDS],
        "streamed_worse": [{"category": item.category, "text": item.text, "edits": {k: h.edits for k, h in item.heard.items()}} for item in worse],
        "durations": durations,
        "signal": signal,
        "first_audio_ms": first_audio,
        "first_frame_after_flush_6_words_ms": {"p50": _pct(flush_ms, 50), "p95": _pct(flush_ms, 95), "n": len(flush_ms)},
    }


def judge(result: dict[str, Any], baseline: dict[str, Any] | None) -> tuple[list[tuple[str, str, str]], dict[str, bool | None]]:
    """Table rows and each target's verdict (None: reported only)."""
    rates = [str(tps) for tps in RATES]
    both = " / ".join(rates) + " tok/s"
    wer, durations, signal = result["wer"], result["durations"], result["signal"]
    short = result["wer_short"]
    flush = result["first_frame_after_flush_6_words_ms"]
    targets: dict[str, bool | None] = {
        **{f"wer_streamed_{r}": wer[r] <= wer["whole"] + WER_MARGIN for r in rates},
        "short_items_no_worse": not result["short_items_streamed_worse"],
        **{f"equal_durations_{r}": durations[r]["equal_fraction"] >= MIN_EQUAL_DURATIONS for r in rates},
        **{f"duration_ratio_{r}": abs(durations[r]["total_ratio"] - 1) <= MAX_DURATION_DRIFT for r in rates},
        **{f"first_audio_p50_{tps}": result["first_audio_ms"][str(tps)]["p50"] <= limit for tps, limit in FIRST_AUDIO_P50_MS.items()},
        "flush_p50": flush["p50"] <= FLUSH_P50_MS,
    }
    if baseline is None:
        mcd_target = f0_target = "report only"
        for r in rates:
            targets[f"mcd_{r}"] = targets[f"f0_corr_{r}"] = None
    else:
        base = baseline["signal"]
        mcd_target = "<= " + " / ".join(f"{base[r]['mcd'] / 2:.3f}" for r in rates) + " (baseline / 2)"
        f0_target = ">= " + " / ".join(f"{1 - (1 - base[r]['f0_corr']) / 2:.4f}" for r in rates) + " ((1 - r) halved)"
        for r in rates:
            targets[f"mcd_{r}"] = signal[r]["mcd"] <= base[r]["mcd"] / 2
            corr = signal[r]["f0_corr"]
            targets[f"f0_corr_{r}"] = corr is not None and 1 - corr <= (1 - base[r]["f0_corr"]) / 2
    worse = result["streamed_worse"]
    first_audio = [(tps, result["first_audio_ms"][str(tps)]) for tps in RATES]
    rows = [
        (f"WER whole, default style ({wer['reference_words']} words x {wer['seeds']} seeds)", f"{wer['whole']:.3f}", ""),
        (f"WER streamed, {both}", " / ".join(f"{wer[r]:.3f}" for r in rates), f"<= whole + {WER_MARGIN} ({wer['whole'] + WER_MARGIN:.3f})"),
        (f"WER on items of <= {SHORT_WORDS} words, whole / {both}", " / ".join(f"{short[k]:.3f}" for k in ["whole", *rates]) if short["items"] else "no such items", ""),
        (f"items of <= {SHORT_WORDS} words with streamed WER above whole", f"{len(result['short_items_streamed_worse'])} of {short['items']}", "0"),
        ("items where streamed is worse than whole (either rate)", f"{len(worse)} of {result['items']}", ""),
        (f"equal phoneme durations, noise off, {both}", " / ".join(f"{durations[r]['equal_fraction']:.3f}" for r in rates), f">= {MIN_EQUAL_DURATIONS:.2f}"),
        (f"total duration streamed / whole, noise off, {both}", " / ".join(f"{durations[r]['total_ratio']:.4f}" for r in rates), f"1 +- {MAX_DURATION_DRIFT}"),
        (f"MCD after DTW, noise off, mean, {both}", " / ".join(f"{signal[r]['mcd']:.3f}" for r in rates), mcd_target),
        (f"F0 correlation, noise off, mean, {both}", " / ".join("n/a" if signal[r]["f0_corr"] is None else f"{signal[r]['f0_corr']:.4f}" for r in rates), f0_target),
        *(
            (f"first audio after first token, {tps} tok/s, p50 / p95 (n={fa['n']})", f"{fa['p50']:.1f} / {fa['p95']:.1f} ms", f"p50 <= {FIRST_AUDIO_P50_MS[tps]:.0f} ms")
            for tps, fa in first_audio
        ),
        (f"first frame after flush, 6 words, p50 / p95 (n={flush['n']})", f"{flush['p50']:.1f} / {flush['p95']:.1f} ms", f"p50 <= {FLUSH_P50_MS:.0f} ms"),
    ]
    return rows, targets


def load_baseline(path: str, items: int) -> dict[str, Any]:
    baseline = json.loads(Path(path).read_text(encoding="utf-8"))
    # Means over different item sets say nothing about each other.
    if baseline.get("items") != items:
        raise SystemExit(f"baseline {path} covers {baseline.get('items')} items, this run {items}: run both with the same --items")
    return baseline


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/fidelity.json")
    parser.add_argument("--items", type=int, default=len(ITEMS), help="use only the first N items (a quick run)")
    parser.add_argument("--baseline", help="an earlier fidelity.json: MCD and F0 correlation must halve their distance from it")
    add_check_flag(parser)
    parser.add_argument("--seeds", type=int, default=6, help="noise seeds the WER is summed over")
    # The streaming settings whose defaults this benchmark chose (docs/ARCHITECTURE.md).
    parser.add_argument("--lookahead-phonemes", type=int, default=AcousticOptions().lookahead_phonemes)
    parser.add_argument("--context-phonemes", type=int, default=AcousticOptions().context_phonemes)
    parser.add_argument("--first-chunk-words", type=int, default=ChunkerOptions().first_chunk_words)
    args = parser.parse_args()
    if not 1 <= args.items <= len(ITEMS):
        parser.error(f"--items must be in [1, {len(ITEMS)}]")
    items = ITEMS[: args.items]
    baseline = load_baseline(args.baseline, len(items)) if args.baseline else None

    options = StreamOptions(
        acoustic=AcousticOptions(context_phonemes=args.context_phonemes, lookahead_phonemes=args.lookahead_phonemes),
        chunker=ChunkerOptions(first_chunk_words=args.first_chunk_words),
    )
    engine = Engine(EngineConfig())
    await engine.warm_up()
    transcribe = Transcriber()
    results = []
    for n, (category, text) in enumerate(items, 1):
        results.append(await measure(engine, transcribe, category, text, options, args.seeds))
        print(f"[{n}/{len(items)}] {text}", file=sys.stderr)
    flush_ms = [await first_frame_after_flush(engine, SIX_WORDS[i % len(SIX_WORDS)], options) for i in range(FLUSH_RUNS)]
    engine.close()

    settings = {"lookahead_phonemes": args.lookahead_phonemes, "context_phonemes": args.context_phonemes, "first_chunk_words": args.first_chunk_words}
    result = {**stamp(), "settings": settings, **summarize(results, flush_ms), "baseline": args.baseline}
    rows, targets = judge(result, baseline)
    result["targets"] = targets
    result["per_item"] = [asdict(item) for item in results]
    print_table(rows)
    for item in result["streamed_worse"]:
        edits = ", ".join(f"{k if k == 'whole' else k + ' tok/s'} {v}" for k, v in item["edits"].items())
        print(f"  streamed worse [{item['category']}] {item['text']}  (word edits: {edits})")
    write_json(args.out, result)
    finish([name for name, met in targets.items() if met is False], args.check)


if __name__ == "__main__":
    asyncio.run(main())
