"""Voice matching: move a voice's pitch, formants and spectral colour toward a reference speaker.

This is not cloning. No model learns the speaker: the base voice still chooses every sound, its
rhythm and its accent; a signal transform (WORLD analysis and resynthesis) then changes what a
speaker encoder and a listener hear as voice colour:
- pitch: log F0 moved from the base voice's mean and spread to the reference's (the spread
  scaled by a tuned `pitch_spread`);
- formants: the spectral envelope's frequency axis stretched by a tuned `formant_ratio` (> 1 moves
  formants up, as from a longer vocal tract to a shorter one);
- colour: an equaliser curve, the difference between the reference's long-term envelope and the
  warped base voice's, scaled by a tuned strength. It also copies the recording's channel
  (a phone line's band limit, a room's colour), which is part of what the encoders hear.
  Voiced and unvoiced speech get a curve each: a speaker's fricatives and breath have their own
  colour, which the voiced frames' average says nothing about.
The three tuned numbers are chosen by speaker similarity (the d-vector encoder) between the
transformed base voice and reference sentences held out of the analysis (`tune`).

Pitch comes from Praat's autocorrelation tracker (parselmouth), not WORLD's own: WORLD's DIO
reads joe's ~90 Hz voice at 150-170 Hz and marks half its voiced frames unvoiced.

In a stream the transform runs per decoder window (profile.MatchProfile.effect), on the block's
own span plus a margin of the window's context, so it needs no audio beyond what the block
decoder already has: no extra wait before the first frame, only its compute (docs/voices.md
has the measured figures).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import soxr

FRAME_MS = 5.0
PITCH_FLOOR, PITCH_CEILING = 50.0, 500.0
SHORTEST_S = 3.2 / PITCH_FLOOR  # Praat's pitch window is 3 periods of the floor; it refuses less
# The equaliser curve's frequency grid: references are often 16 kHz (8 kHz wide); above its top
# the curve holds its last value.
EQ_GRID = np.linspace(0.0, 8000.0, 129)
EQ_BAND = (80.0, 7000.0)  # where the curve is measured; outside it holds the band's edge values
EQ_LIMIT_DB = 24.0
AP_POINTS = 129
UNVOICED_AP = 0.999  # WORLD's aperiodicity of a frame without pitch
# Unvoiced frames that count as speech (fricatives, breath) rather than the pauses' noise floor:
# within this much of the recording's loud frames (its 95th percentile of frame energy).
SPEECH_FLOOR_DB = 40.0
# Context on each side of a block's span that the window transform analyses with: Praat's
# pitch window (3 periods of PITCH_FLOOR, 60 ms) and WORLD's envelope window (3 periods of the
# local pitch) reach half their length, ~30 ms, past a frame. More costs time before the
# first frame (the first block's span is only 116 ms).
MARGIN_S = 0.04


@dataclass(frozen=True)
class PitchStats:
    """Log-F0 statistics of voiced speech."""

    mean: float
    std: float

    @classmethod
    def of(cls, f0: np.ndarray) -> "PitchStats":
        voiced = np.log(f0[f0 > 0])
        if len(voiced) < 50:
            raise ValueError("too little voiced speech to measure pitch")
        return cls(float(voiced.mean()), float(voiced.std()))

    @property
    def median_hz(self) -> float:
        return float(np.exp(self.mean))


@dataclass(frozen=True)
class MatchParams:
    """What a matched voice applies to its base voice's audio."""

    base_pitch: PitchStats
    target_pitch: PitchStats
    formant_ratio: float
    pitch_spread: float
    eq_db: tuple[float, ...]  # voiced frames, on EQ_GRID, strength already applied
    # The base voice's mean aperiodicity in voiced frames, on AP_POINTS points from 0 Hz to
    # half its rate. Resynthesis uses it instead of measuring each block's (WORLD's D4C): that
    # halves the transform's cost and measured no change in similarity or WER.
    aperiodicity: tuple[float, ...]
    # Unvoiced frames' equaliser, on EQ_GRID; None: the voiced one (profiles made before it).
    unvoiced_eq_db: tuple[float, ...] | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "MatchParams":
        def curve(key: str, points: int = len(EQ_GRID)) -> tuple[float, ...] | None:
            if data.get(key) is None:
                return None
            values = tuple(float(v) for v in data[key])
            if len(values) != points:
                raise ValueError(f"{key} must have {points} values")
            return values

        eq, ap = curve("eq_db"), curve("aperiodicity", AP_POINTS)
        if eq is None or ap is None:
            raise ValueError("eq_db and aperiodicity are required")
        return cls(
            PitchStats(**data["base_pitch"]),
            PitchStats(**data["target_pitch"]),
            float(data["formant_ratio"]),
            float(data["pitch_spread"]),
            eq,
            ap,
            curve("unvoiced_eq_db"),
        )


def _pyworld():
    import pyworld

    return pyworld


def pitch(audio: np.ndarray, rate: int, frames: int) -> np.ndarray:
    """F0 in Hz on WORLD's frame grid (0 where unvoiced)."""
    import parselmouth

    track = parselmouth.Sound(audio, rate).to_pitch_ac(
        time_step=FRAME_MS / 1000, pitch_floor=PITCH_FLOOR, pitch_ceiling=PITCH_CEILING
    )
    f0, times = track.selected_array["frequency"], track.xs()
    t = np.arange(frames) * FRAME_MS / 1000
    index = np.clip(np.round((t - times[0]) / (FRAME_MS / 1000)).astype(int), 0, len(f0) - 1)
    out = f0[index]
    out[(t < times[0] - FRAME_MS / 1000) | (t > times[-1] + FRAME_MS / 1000)] = 0.0
    return out


@dataclass
class Analysis:
    f0: np.ndarray
    envelope: np.ndarray  # WORLD spectral envelope, power, [frames, bins]
    aperiodicity: np.ndarray
    rate: int


def analyse(audio: np.ndarray, rate: int, aperiodicity: bool = True) -> Analysis:
    pw = _pyworld()
    x = np.ascontiguousarray(audio, dtype=np.float64)
    frames = int(len(x) / rate * 1000 / FRAME_MS) + 1
    f0 = pitch(x, rate, frames)
    t = np.arange(frames) * FRAME_MS / 1000
    envelope = pw.cheaptrick(x, f0, t, rate)
    return Analysis(f0, envelope, pw.d4c(x, f0, t, rate) if aperiodicity else np.zeros(0), rate)


def mean_aperiodicity(analysis: Analysis) -> tuple[float, ...]:
    voiced = analysis.aperiodicity[analysis.f0 > 0].mean(axis=0)
    points = np.linspace(0, analysis.rate / 2, AP_POINTS)
    return tuple(round(float(v), 5) for v in np.interp(points, _bin_freqs(len(voiced), analysis.rate), voiced))


def _bin_freqs(bins: int, rate: int) -> np.ndarray:
    return np.linspace(0.0, rate / 2, bins)


def long_term_envelope(analysis: Analysis, voiced: bool = True) -> np.ndarray:
    """Mean log envelope (dB) on EQ_GRID of the voiced frames, or of the unvoiced frames that
    are speech rather than pause."""
    if voiced:
        frames = analysis.f0 > 0
    else:
        power = analysis.envelope.sum(axis=1) + 1e-16
        frames = (analysis.f0 == 0) & (power > np.percentile(power, 95) * 10 ** (-SPEECH_FLOOR_DB / 10))
    if not frames.any():
        raise ValueError("no voiced speech" if voiced else "no unvoiced speech")
    db = 10 * np.log10(analysis.envelope[frames] + 1e-16).mean(axis=0)
    return np.interp(EQ_GRID, _bin_freqs(len(db), analysis.rate), db)


def _smooth(curve: np.ndarray, width: int = 17) -> np.ndarray:
    kernel = np.hanning(width)
    kernel /= kernel.sum()
    return np.convolve(np.pad(curve, width // 2, mode="edge"), kernel, mode="valid")


def eq_curve(reference_db: np.ndarray, base_db: np.ndarray, formant_ratio: float, strength: float) -> np.ndarray:
    """The equaliser that takes the formant-warped base envelope to the reference's, level-neutral."""
    warped = np.interp(EQ_GRID / formant_ratio, EQ_GRID, base_db)
    band = (EQ_GRID >= EQ_BAND[0]) & (EQ_GRID <= EQ_BAND[1])
    diff = reference_db - warped
    diff -= diff[band].mean()
    edges = diff[band]
    diff = np.where(EQ_GRID < EQ_BAND[0], edges[0], np.where(EQ_GRID > EQ_BAND[1], edges[-1], diff))
    return np.clip(_smooth(diff) * strength, -EQ_LIMIT_DB, EQ_LIMIT_DB)


class VoiceTransform:
    """Applies MatchParams to audio at the base voice's rate."""

    def __init__(self, params: MatchParams, rate: int) -> None:
        self.params = params
        self.rate = rate
        self._scale = params.target_pitch.std * params.pitch_spread / max(params.base_pitch.std, 1e-6)
        self._curves: dict[int, _Curves] = {}  # per envelope bin count

    def _curves_for(self, bins: int) -> "_Curves":
        curves = self._curves.get(bins)
        if curves is None:
            p = self.params
            freqs = _bin_freqs(bins, self.rate)

            def on_bins(curve: tuple[float, ...]) -> np.ndarray:
                return np.interp(np.minimum(freqs, EQ_GRID[-1]), EQ_GRID, np.asarray(curve))

            natural = np.log(10) / 10  # dB to natural log of power
            voiced_gain = on_bins(p.eq_db) * natural
            curves = self._curves[bins] = _Curves(
                voiced_gain,
                voiced_gain if p.unvoiced_eq_db is None else on_bins(p.unvoiced_eq_db) * natural,
                np.interp(freqs, np.linspace(0, self.rate / 2, AP_POINTS), np.asarray(p.aperiodicity)),
            )
        return curves

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """The whole signal transformed (same length)."""
        if len(audio) < SHORTEST_S * self.rate:
            return audio  # a tiny isolated chunk (a one-phoneme utterance): left as spoken
        pw = _pyworld()
        a = analyse(audio, self.rate, aperiodicity=False)
        p = self.params
        f0 = a.f0.copy()
        voiced = f0 > 0
        f0[voiced] = np.exp((np.log(f0[voiced]) - p.base_pitch.mean) * self._scale + p.target_pitch.mean)
        freqs = _bin_freqs(a.envelope.shape[1], self.rate)
        log_env = np.log(a.envelope + 1e-16)
        # Formant stretch: each output bin reads the envelope at f / ratio.
        source = np.clip(freqs / p.formant_ratio, 0, freqs[-1])
        lo = np.minimum(np.searchsorted(freqs, source, side="right") - 1, len(freqs) - 2)
        frac = (source - freqs[lo]) / (freqs[lo + 1] - freqs[lo])
        warped = log_env[:, lo] * (1 - frac) + log_env[:, lo + 1] * frac
        c = self._curves_for(len(freqs))
        column = voiced[:, None]
        # C order for WORLD: indexing columns leaves the result in Fortran order.
        envelope = np.ascontiguousarray(np.exp(warped + np.where(column, c.voiced_gain, c.unvoiced_gain)))
        aperiodicity = np.where(column, c.voiced_ap[None, :], UNVOICED_AP)
        out = pw.synthesize(f0, envelope, aperiodicity, self.rate, FRAME_MS)
        return out[: len(audio)].astype(np.float32) if len(out) >= len(audio) else np.pad(out, (0, len(audio) - len(out))).astype(np.float32)


@dataclass(frozen=True)
class _Curves:
    """MatchParams' curves on one envelope's bins, natural-log power where they are gains."""

    voiced_gain: np.ndarray
    unvoiced_gain: np.ndarray
    voiced_ap: np.ndarray


@dataclass(frozen=True)
class TuningGrid:
    """The values tried for each parameter. Measured on a female and a male reference
    (docs/BENCHMARKS.md, "Voices"): female voices peak near a ratio of 1.2, male near 1.1, and
    the equaliser does best overdone (1.5-2.5x the measured difference), as WORLD's resynthesis
    smooths part of it away."""

    formant_ratios: tuple[float, ...] = (0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.25)
    pitch_spreads: tuple[float, ...] = (1.0, 1.5, 2.0)
    eq_strengths: tuple[float, ...] = (1.0, 1.5, 2.0, 2.5)
    start: tuple[float, float, float] = (1.1, 1.5, 1.5)  # ratio, spread, strength
    rounds: int = 2


@dataclass
class MatchResult:
    params: MatchParams
    base_similarity: float  # base voice vs the held-out reference sentences
    similarity: float  # matched voice vs the same


def tune(
    reference: np.ndarray,
    held_out: np.ndarray,
    rate: int,
    base_speech: np.ndarray,
    base_rate: int,
    embed: Callable[[np.ndarray, int], np.ndarray],
    grid: TuningGrid = TuningGrid(),
) -> MatchResult:
    """Analyse the reference, then pick the parameters whose output sounds most like `held_out`.

    `reference` and `held_out` are the same speaker's speech, never the same sentences;
    `base_speech` is the base voice reading ordinary sentences; `embed` a speaker encoder.
    The search moves one parameter at a time over its grid values (a few dozen renderings
    instead of every combination), `grid.rounds` times.
    """
    ref = analyse(reference, rate, aperiodicity=False)
    base = analyse(base_speech, base_rate)
    ref_db, base_db = long_term_envelope(ref), long_term_envelope(base)
    try:
        unvoiced: tuple[np.ndarray, np.ndarray] | None = (long_term_envelope(ref, voiced=False), long_term_envelope(base, voiced=False))
    except ValueError:  # no voiceless sound at all (a sung vowel): the voiced curve serves for every frame
        unvoiced = None
    target = embed(held_out, rate)
    base_pitch, target_pitch = PitchStats.of(base.f0), PitchStats.of(ref.f0)
    scores: dict[tuple[float, float, float], float] = {}

    aperiodicity = mean_aperiodicity(base)

    def rounded(curve: np.ndarray) -> tuple[float, ...]:
        return tuple(round(float(v), 3) for v in curve)

    def params(ratio: float, spread: float, strength: float) -> MatchParams:
        return MatchParams(
            base_pitch,
            target_pitch,
            ratio,
            spread,
            rounded(eq_curve(ref_db, base_db, ratio, strength)),
            aperiodicity,
            # One strength for both curves: a fourth tuned number would double the renderings.
            None if unvoiced is None else rounded(eq_curve(*unvoiced, ratio, strength)),
        )

    def score(point: tuple[float, float, float]) -> float:
        if point not in scores:
            audio = VoiceTransform(params(*point), base_rate)(base_speech)
            scores[point] = float(np.dot(embed(audio, base_rate), target))
        return scores[point]

    best = grid.start
    axes = (grid.formant_ratios, grid.pitch_spreads, grid.eq_strengths)
    for _ in range(grid.rounds):
        for axis, values in enumerate(axes):
            points = [best[:axis] + (v,) + best[axis + 1 :] for v in values]
            best = max(points, key=score)
    return MatchResult(params(*best), float(np.dot(embed(base_speech, base_rate), target)), scores[best])


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    return audio if rate == target else soxr.resample(audio, rate, target).astype(np.float32)


def split_reference(clips: Sequence[np.ndarray], held_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Analysis speech and held-out speech for tuning: whole clips at the end when there are
    several, else the last fifth of the one recording."""
    total = sum(len(c) for c in clips)
    if len(clips) >= 3:
        held, n = [], 0
        for clip in reversed(clips):
            if n >= held_fraction * total:
                break
            held.insert(0, clip)
            n += len(clip)
        return np.concatenate(clips[: len(clips) - len(held)]), np.concatenate(held)
    joined = np.concatenate(list(clips))
    cut = int(len(joined) * (1 - held_fraction))
    return joined[:cut], joined[cut:]
