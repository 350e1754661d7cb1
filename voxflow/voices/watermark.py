"""An inaudible watermark on every matched voice's audio, and its detection.

The network is PerTh ("perceptual threshold") by Resemble AI, MIT-licensed, with the trained
weights that ship inside the `resemble-perth` 1.0.1 wheel (perth/perth_net/pretrained/implicit:
the checkpoint at step 250,000, its hparams.yaml and id.txt). Only those files are read; this
module is our own code for the rest, for two reasons:

* PerTh's package cannot be imported here. Its STFT front end comes from `torchaudio`, which has
  no build for the torch this project pins, and `perth.perth_net` finds its weights with
  `pkg_resources`, which setuptools no longer ships. The wheel is installed without its
  dependencies, and its directory is found with `importlib.util.find_spec("perth")`, which
  locates the package without running any of its code.
* torchaudio's Spectrogram / InverseSpectrogram (power=None, center=True, reflect padding,
  one-sided, unnormalized, periodic Hann window) are thin wrappers of `torch.stft` /
  `torch.istft`, which this module calls directly with the same settings. Resampling to and
  from the network's 32 kHz is soxr's (already a dependency), not librosa's.

What the network does: at 32 kHz, an STFT (2048-point, hop 320); magnitudes in dB, floored at
-180 dB and scaled so that -180..+15 dB maps to 0..1. The embedder (a 1x1 convolution, five
7-tap convolutions of 256 channels, a 1x1 convolution, LeakyReLU between) reads the 128 bins
under 2 kHz and writes a residual for them, zero in frames that are digital silence; the audio
is rebuilt with the original phase. The detector runs three such stacks on the same bins at
1.25x, 1x and 0.75x time scale, each giving per frame an attention logit and a mark value;
PerTh's clip score is the softmax-attention-weighted mix of the branches' mark means over all
non-silent frames, near 1 for marked audio and near 0 for other audio. This module reproduces
PerTh's outputs to float precision (checked against PerTh's own code at 32 kHz: marked audio
within 5e-7, detector outputs equal to 7 decimals).

Three choices are ours:

* The mark is added, not re-synthesized: the residual is a gain on the complex STFT bins
  (mathematically PerTh's log-magnitude edit with the phase kept), and only the difference it
  makes is resampled back to the caller's rate and added to the caller's samples. Everything
  above 2 kHz, and the audio's own samples, pass through untouched.
* The clip score (`Watermarker.score`) takes each branch's *median* mark over the *loud* frames
  (within LOUD_DB of the clip's loudest, under 2 kHz) instead of the mean over every non-silent
  frame. On unmarked speech PerTh's detector reads runs of frames as strongly marked now and
  then, and a mean lets a few of them lift a clip; with the median the highest score of 2,400
  real-speech clips (1 s and 3 s, clean, Opus 16 kbit/s, MP3 32 kbit/s) fell from 0.66 to 0.06
  while marked 3 s clips still score >= 0.97 in every condition. Audio longer than
  SEGMENT_SECONDS is scored in stretches of about that length and judged by its best one: that
  bounds the memory a long upload takes, and a recording that is marked for a whole stretch
  is found however much unmarked audio surrounds it.
* THRESHOLD sits far above every false alarm measured (real speech: 99th percentile <= 0.04,
  highest 0.06; unmarked voxflow speech: highest 0.19) and far below marked 3 s clips (1st
  percentile >= 0.97 clean, after Opus 16 kbit/s and after MP3 32 kbit/s):
  benchmarks/watermark_measure.py, results in benchmarks/results/watermark.json.

Streaming: voxflow decodes audio in windows (a block plus up to ~130 ms of context each side)
and crops each block out. `Watermarker.embed` on a whole window, cropped by the caller like the
audio itself (profile.MatchProfile.effect), marks the stream so that the joined blocks detect as well as audio marked whole: block-wise marking
differs from whole-signal marking by ~0.2 % of the mark (tests/test_watermark.py checks 8-, 10-, 42-
and 74-frame blocks with 11 frames of context). It costs ~0.013 s per second of audio on one
thread, block-wise at 22050 Hz (0.008 whole); detection ~0.015.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr
import torch
import torch.nn.functional as F
from torch import nn

from ..audio_file import read_audio
from ..errors import InvalidRequest, LimitExceeded, VoxflowError

# The network's identity for consent records: PerTh's implicit model, its run id (id.txt).
PERTH_RUN_ID = "Y-GfemTlfVYp3fNWkt2zgQ"
WATERMARK_ID = "perth-implicit-" + PERTH_RUN_ID

# A clip that scores this or more carries the mark (see the module docstring and
# benchmarks/watermark_measure.py).
THRESHOLD = 0.25
# Embedding strength: 1.0 is the residual exactly as PerTh's embedder writes it. At 1.0 only
# 62 % of 3 s clips of a matched female voice (WORLD-resynthesized, ~200 Hz) were still found
# after Opus 16 kbit/s (joe's own voice: 100 %); 1.25 found all of them, its mark ~2 dB louder
# (11.8 dB below that voice's speech, 13.9 at 1.0). 0.5 was tried too: 25 %.
STRENGTH = 1.25

# Frames scored: those within this many dB of the clip's loudest, in the band under 2 kHz.
LOUD_DB = 40.0

CHECKPOINT = "perth_net_250000.pth.tar"
_MIN_SECONDS = 0.1  # shorter clips are too short to judge: scored 0
SEGMENT_SECONDS = 30.0  # longer audio is scored in stretches of about this length


class WatermarkUnavailable(VoxflowError):
    """PerTh's weights (the resemble-perth wheel) are not installed, or are not the expected ones."""

    code = "watermark_unavailable"
    http_status = 503


@dataclass(frozen=True)
class Detection:
    score: float
    found: bool
    threshold: float


def weights_dir() -> Path:
    """Where the wheel keeps the implicit model, found without importing the `perth` package."""
    spec = importlib.util.find_spec("perth")
    if spec is None or not spec.submodule_search_locations:
        raise WatermarkUnavailable("the resemble-perth wheel (PerTh's watermark weights) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "perth_net" / "pretrained" / "implicit"


def _flat_yaml(text: str) -> dict[str, object]:
    """hparams.yaml is one `key: scalar` a line; read those without a YAML dependency."""
    values: dict[str, object] = {}
    for line in text.splitlines():
        key, sep, raw = line.partition(":")
        if not sep or line.startswith((" ", "#")):
            continue
        raw = raw.strip()
        value: object = raw
        if raw in ("true", "false"):
            value = raw == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    pass
        values[key.strip()] = value
    return values


@dataclass(frozen=True)
class _Settings:
    """The hyper-parameters of the shipped run that shape inference."""

    sample_rate: int
    n_fft: int
    hop: int
    window: int
    floor: float  # smallest STFT magnitude, as an amplitude
    max_mark_hz: float
    hidden: int

    @classmethod
    def read(cls, path: Path) -> _Settings:
        hp = _flat_yaml(path.read_text())
        if hp.get("window_fn") != "hann":
            raise WatermarkUnavailable(f"{path}: expected a Hann window, not {hp.get('window_fn')!r}")
        return cls(
            sample_rate=int(hp["sample_rate"]), n_fft=int(hp["n_fft"]), hop=int(hp["hop_size"]),
            window=int(hp["window_size"]), floor=float(hp["stft_magnitude_min"]),
            max_mark_hz=float(hp["max_wmark_freq"]), hidden=int(hp["hidden_size"]),
        )

    @property
    def bins(self) -> int:
        """STFT bins the mark lives in: those under max_mark_hz."""
        return int(round((self.n_fft // 2 + 1) * self.max_mark_hz / (self.sample_rate / 2)))

    @property
    def floor_db(self) -> float:
        return 20 * math.log10(self.floor)

    @property
    def db_range(self) -> float:
        """dB per unit of the normalized magnitude: the floor up to 15 dB of headroom."""
        return 15.0 - self.floor_db


class _Stack(nn.Module):
    """1x1 convolution in, `depth` same-length convolutions of `taps`, 1x1 out; LeakyReLU between."""

    def __init__(self, n_in: int, hidden: int, n_out: int, depth: int = 5, taps: int = 7) -> None:
        super().__init__()
        sizes = [(n_in, hidden, 1)] + [(hidden, hidden, taps)] * depth + [(hidden, n_out, 1)]
        self.convs = nn.ModuleList(nn.Conv1d(i, o, k, padding=k // 2) for i, o, k in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.convs) - 1
        for index, conv in enumerate(self.convs):
            x = conv(x)
            if index < last:
                x = F.leaky_relu(x, 0.01)
        return x


# The detector's branches: the spectrogram's time axis stretched by these factors first.
_SCALES = (1.25, 1.0, 0.75)


class _PerthNet(nn.Module):
    """PerTh's embedder and three-scale detector, with our own module layout."""

    def __init__(self, settings: _Settings) -> None:
        super().__init__()
        bins, hidden = settings.bins, settings.hidden
        self.embedder = _Stack(bins, hidden, bins)
        self.readers = nn.ModuleList(_Stack(bins, hidden, 2) for _ in _SCALES)

    def load_perth(self, state: dict[str, torch.Tensor]) -> None:
        """Load PerTh's state dict, renaming its keys to this layout (and checking all are used)."""
        names = {"encoder.layers": "embedder.convs"}
        names |= {f"decoder.{branch}_layers": f"readers.{i}.convs" for i, branch in enumerate(("slow", "normal", "fast"))}
        ours = {}
        for key, tensor in state.items():
            if key.startswith("ap."):
                continue  # the STFT windows and TimeStretch's table: recomputed, not learned
            head, index, _conv, param = key.rsplit(".", 3)
            ours[f"{names[head]}.{index}.{param}"] = tensor
        self.load_state_dict(ours, strict=True)


def _frame_mask(mag: torch.Tensor) -> torch.Tensor:
    """PerTh's frames worth marking or reading: those whose summed normalized magnitude is
    over 5 % of the clip's largest (in practice: all but digital silence). (F, T) -> (T,)"""
    total = mag.sum(dim=0)
    return (total > 0.05 * total.max()).float()


def _resized(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A frame mask on another time scale (nearest frame)."""
    return F.interpolate(mask[None, None], size=size, mode="nearest")[0, 0]


def _resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    if rate_in == rate_out:
        return x.astype(np.float32, copy=False)
    return soxr.resample(x.astype(np.float32, copy=False), rate_in, rate_out, quality="HQ")


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    return x[:n] if len(x) >= n else np.pad(x, (0, n - len(x)))


class Watermarker:
    """PerTh, loaded once. Calls may come from several threads at once (no state changes)."""

    _shared: Watermarker | None = None
    _lock = threading.Lock()

    def __init__(self, directory: Path | None = None, strength: float = STRENGTH, threshold: float = THRESHOLD) -> None:
        directory = directory or weights_dir()
        try:
            run_id = (directory / "id.txt").read_text().strip()
            if run_id != PERTH_RUN_ID:
                raise WatermarkUnavailable(f"{directory} holds PerTh run {run_id}, not {PERTH_RUN_ID}")
            self.settings = _Settings.read(directory / "hparams.yaml")
            checkpoint = torch.load(directory / CHECKPOINT, map_location="cpu", weights_only=True)
        except OSError as exc:
            raise WatermarkUnavailable(f"PerTh's watermark weights cannot be read: {exc}") from exc
        self.net = _PerthNet(self.settings)
        self.net.load_perth(checkpoint["model"])
        self.net.eval().requires_grad_(False)
        self.window = torch.hann_window(self.settings.window)
        self.strength = strength
        self.threshold = threshold

    @classmethod
    def shared(cls) -> Watermarker:
        """The process's one instance, loaded on first use (~40 MB of weights)."""
        if cls._shared is None:
            with cls._lock:
                if cls._shared is None:
                    cls._shared = cls()
        return cls._shared

    # -- the STFT front end (torchaudio's Spectrogram / InverseSpectrogram settings) -------------

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        s = self.settings
        return torch.stft(
            x, s.n_fft, s.hop, s.window, self.window, center=True, pad_mode="reflect",
            normalized=False, onesided=True, return_complex=True,
        )

    def _istft(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        s = self.settings
        return torch.istft(
            spec, s.n_fft, s.hop, s.window, self.window, center=True, normalized=False, onesided=True, length=length,
        )

    def _normalized(self, spec: torch.Tensor) -> torch.Tensor:
        """|STFT| in dB, floored, scaled to PerTh's 0..1 range."""
        s = self.settings
        db = 20 * torch.log10(spec.abs().clamp_min(s.floor))
        return (db - s.floor_db) / s.db_range

    # -- embedding ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def mark_delta(self, x: torch.Tensor) -> torch.Tensor:
        """What the watermark adds to a signal at the network's rate (same length)."""
        s = self.settings
        spec = self._stft(x)
        mag = self._normalized(spec)
        residual = self.net.embedder(mag[None, : s.bins])[0] * _frame_mask(mag) * self.strength
        # PerTh adds the residual to the normalized log magnitude and keeps the phase: on the
        # complex bins that is a gain of 10^(residual * dB-range / 20).
        gain = torch.pow(10.0, residual * (s.db_range / 20))
        delta = torch.zeros_like(spec)
        delta[: s.bins] = spec[: s.bins] * (gain - 1)
        return self._istft(delta, len(x))

    @torch.inference_mode()
    def embed(self, audio: np.ndarray, rate: int) -> np.ndarray:
        """`audio` (mono float in [-1, 1]) with the watermark added: float32, the same length.

        For streaming, pass a whole decoder window (block and context) and crop the block out
        of the result as the audio is cropped.
        """
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        net_rate = self.settings.sample_rate
        x = _resample(audio, rate, net_rate)
        if len(x) <= self.settings.n_fft // 2:
            return audio.copy()  # not even half an STFT window: nothing to mark
        delta = self.mark_delta(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        delta = _fit(_resample(delta, net_rate, rate), len(audio))
        return np.clip(audio + delta, -1.0, 1.0).astype(np.float32)

    # -- detection ---------------------------------------------------------------------------------

    def _branch_outputs(self, mag: torch.Tensor) -> list[torch.Tensor]:
        """Each detector branch's (2, frames) output on its own time scale: attention logits, marks."""
        sub = mag[None, : self.settings.bins]  # (1, bins, T)
        frames = sub.shape[2]
        outputs = []
        for scale, reader in zip(_SCALES, self.net.readers):
            size = int(frames * scale)
            x = sub if size == frames else F.interpolate(sub, size=size, mode="linear", align_corners=True)
            outputs.append(reader(x)[0])
        return outputs

    def _spectrogram(self, x: torch.Tensor) -> torch.Tensor:
        return self._normalized(self._stft(x))

    def _loud(self, mag: torch.Tensor) -> torch.Tensor:
        """Non-silent frames within LOUD_DB of the clip's loudest, in the band under 2 kHz."""
        level = mag[: self.settings.bins].mean(dim=0)
        return _frame_mask(mag) * (level >= level.max() - LOUD_DB / self.settings.db_range).float()

    @staticmethod
    def _mix(outputs: list[torch.Tensor], mask: torch.Tensor, median: bool) -> float:
        """Per branch, the mean attention logit and the mean (or median) mark over the masked
        frames; the branches' marks mixed by the softmax of their attention."""
        attention, marks = [], []
        for out in outputs:
            m = _resized(mask, out.shape[1])
            if not m.any():
                m = torch.ones_like(m)
            attention.append((out[0] * m).sum() / m.sum())
            marks.append(out[1][m > 0].median() if median else (out[1] * m).sum() / m.sum())
        return float((torch.softmax(torch.stack(attention), dim=0) * torch.stack(marks)).sum())

    @torch.inference_mode()
    def perth_score(self, x: torch.Tensor) -> float:
        """PerTh's own clip score for a signal at the network's rate (unclipped): the mean over
        every non-silent frame."""
        mag = self._spectrogram(x)
        return self._mix(self._branch_outputs(mag), _frame_mask(mag), median=False)

    @torch.inference_mode()
    def loud_median_score(self, x: torch.Tensor) -> float:
        """Our clip score for a signal at the network's rate (unclipped): as PerTh's, but each
        branch's mark is the median over the loud frames instead of the mean over all non-silent
        ones. Pauses, breaths and codec noise carry no mark, and on unmarked audio a few frames
        that read as marked no longer pull the clip up: the highest scores of unmarked speech
        fall from ~0.4 to ~0.05 for the same detection (benchmarks/watermark_measure.py)."""
        mag = self._spectrogram(x)
        return self._mix(self._branch_outputs(mag), self._loud(mag), median=True)

    @torch.inference_mode()
    def both_scores(self, x: torch.Tensor) -> tuple[float, float]:
        """(perth_score, loud_median_score) from one pass of the detector, for measurements."""
        mag = self._spectrogram(x)
        outputs = self._branch_outputs(mag)
        return self._mix(outputs, _frame_mask(mag), median=False), self._mix(outputs, self._loud(mag), median=True)

    @torch.inference_mode()
    def score(self, audio: np.ndarray, rate: int) -> float:
        """The clip's score in [0, 1] (`loud_median_score`, clipped): near 1 when marked. Audio
        longer than SEGMENT_SECONDS scores as its best stretch of about that length."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        step = int(SEGMENT_SECONDS * rate)
        # Stretches of `step` samples; a remainder under half a stretch joins the last one.
        starts = [i * step for i in range(max(1, (2 * len(audio) + step) // (2 * step)))]
        ends = starts[1:] + [len(audio)]
        return max(self._score_piece(audio[a:b], rate) for a, b in zip(starts, ends))

    def _score_piece(self, audio: np.ndarray, rate: int) -> float:
        if len(audio) < _MIN_SECONDS * rate or not np.any(audio):
            return 0.0
        x = torch.from_numpy(np.ascontiguousarray(_resample(audio, rate, self.settings.sample_rate)))
        return min(max(self.loud_median_score(x), 0.0), 1.0)

    def detect(self, audio: np.ndarray, rate: int) -> Detection:
        score = self.score(audio, rate)
        return Detection(score=score, found=score >= self.threshold, threshold=self.threshold)


def embed(audio: np.ndarray, rate: int) -> np.ndarray:
    return Watermarker.shared().embed(audio, rate)


def detect(audio: np.ndarray, rate: int) -> Detection:
    return Watermarker.shared().detect(audio, rate)


def detect_command(path: str) -> int:
    """`voxflow watermark detect FILE`: prints the score; exit status 0 when the watermark is
    found, 1 when it is not, 2 when the file cannot be read."""
    try:
        audio, rate = read_audio(path)
    except (InvalidRequest, LimitExceeded) as exc:
        print(f"voxflow: error [{exc.code}]: {path}: {exc}", file=sys.stderr)
        return 2
    result = detect(audio, rate)
    verdict = "found" if result.found else "not found"
    print(f"{path}: watermark {verdict} (score {result.score:.3f}, threshold {result.threshold:g}, {WATERMARK_ID})")
    return 0 if result.found else 1
