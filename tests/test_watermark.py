"""The watermark on matched voices' audio (voxflow/voices/watermark.py) and its detection from
the library, the CLI and HTTP. Real components throughout: PerTh's shipped weights, voxflow
speech, real recordings (tests/recordings.py) and FFmpeg's codecs; every input is seeded."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soxr
import torch

from recordings import SPEAKERS, load
from recordings import RATE as RECORDING_RATE
from server_harness import run_server
from voxflow.audio_file import read_audio
from voxflow.streaming.decoder_blocks import BlockDecoder, BlockOptions
from voxflow.transports import watermark_http
from voxflow.transports.protocols.audio_encoding import AvEncoder
from voxflow.voices import watermark
from voxflow.voices.watermark import WATERMARK_ID, Watermarker
from voxflow.wav import wav_file

VOICE_RATE = 22_050
HOP = 256
CONTEXT_FRAMES = 11
SENTENCES = [
    "Please remember to call your mother this evening.",
    "Your order has shipped and should arrive on Thursday afternoon.",
    "The meeting has been moved to half past three in the small conference room.",
]
TIMEOUT = 120

_SCRIPT = Path(sys.executable).with_name("voxflow")
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "voxflow.cli"]


@pytest.fixture(scope="module")
def marker() -> Watermarker:
    return Watermarker.shared()


@pytest.fixture(scope="module")
def speech(engine) -> np.ndarray:
    """About 10 s of voxflow speech: three sentences, seeded, with short pauses between."""
    gap = np.zeros(VOICE_RATE // 4, np.float32)
    parts = [engine.synthesize(text, seed=i).audio for i, text in enumerate(SENTENCES)]
    return np.concatenate([x for p in parts for x in (p, gap)])


@pytest.fixture(scope="module")
def marked(marker: Watermarker, speech: np.ndarray) -> np.ndarray:
    return mark_in_blocks(marker, speech)


def mark_in_blocks(marker: Watermarker, audio: np.ndarray, options: BlockOptions = BlockOptions()) -> np.ndarray:
    """Mark `audio` the way the stream does: each decoder window (a block of 10, then 42 and 74
    frames of 256 samples, with 11 frames of context each side) marked whole, then cropped and
    joined with a 256-sample crossfade by voxflow's own BlockDecoder, whose 'latents' here are
    frame numbers."""
    frames = -(-len(audio) // HOP)
    padded = np.pad(audio, (0, frames * HOP - len(audio)))

    def render(latents: torch.Tensor) -> torch.Tensor:
        first, count = int(latents[0, 0, 0]), latents.shape[2]
        return torch.from_numpy(marker.embed(padded[first * HOP : (first + count) * HOP], VOICE_RATE))[None, None]

    blocks = BlockDecoder(render, HOP, CONTEXT_FRAMES, options)
    joined = blocks.begin_chunk(torch.arange(frames, dtype=torch.float32)[None, None])
    pieces = [blocks.decode_block(joined, start, end) for start, end in blocks.plan(frames)]
    pieces.append(blocks.release())
    return np.concatenate(pieces)[: len(audio)]


def encoded(audio: np.ndarray, rate: int, container: str, codec: str, bit_rate: int | None = None) -> bytes:
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    encoder = AvEncoder(rate, container=container, codec=codec, options={}, bit_rate=bit_rate)
    return encoder.encode(pcm) + encoder.finish()


def through_opus_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    """Ogg/Opus at 16 kbit/s (libopus, 48 kHz) and back to `rate`."""
    data = encoded(soxr.resample(audio, rate, 48_000), 48_000, "ogg", "libopus", 16_000)
    decoded, decoded_rate = read_audio(io.BytesIO(data))
    assert decoded_rate == 48_000
    return soxr.resample(decoded, 48_000, rate)


def segments(audio: np.ndarray, rate: int, seconds: float) -> list[np.ndarray]:
    n = int(seconds * rate)
    return [audio[i : i + n] for i in range(0, len(audio) - n + 1, n)]


def test_marked_speech_detects_and_unmarked_does_not(marker: Watermarker, speech: np.ndarray) -> None:
    whole = marker.embed(speech, VOICE_RATE)
    found, missed = marker.detect(whole, VOICE_RATE), marker.detect(speech, VOICE_RATE)
    assert found.found and found.score > 0.9, found
    assert not missed.found and missed.score < 0.1, missed
    assert found.threshold == missed.threshold == watermark.THRESHOLD


def test_the_mark_is_quiet_and_stays_under_2_khz(marker: Watermarker, speech: np.ndarray) -> None:
    out = marker.embed(speech, VOICE_RATE)
    assert out.dtype == np.float32 and out.shape == speech.shape and np.abs(out).max() <= 1.0
    mark = out - speech
    assert 10 * np.log10(np.sum(speech**2) / np.sum(mark**2)) > 10  # dB
    spectrum = np.abs(np.fft.rfft(mark)) ** 2
    hz = np.fft.rfftfreq(len(mark), 1 / VOICE_RATE)
    assert spectrum[hz > 3000].sum() < 1e-3 * spectrum.sum()  # the audio above is left as it was


def test_real_speech_is_not_taken_for_marked(marker: Watermarker) -> None:
    for speaker in SPEAKERS.values():
        for path in speaker.held_out()[:3]:
            recording = load(path)
            assert not marker.detect(recording, RECORDING_RATE).found, path
            for clip in segments(recording, RECORDING_RATE, 3.0):
                assert not marker.detect(clip, RECORDING_RATE).found, path


def test_block_wise_marking_detects_as_well_as_marking_whole(marker: Watermarker, speech: np.ndarray, marked: np.ndarray) -> None:
    whole = marker.embed(speech, VOICE_RATE)
    assert marked.shape == speech.shape
    # The windows' edges barely change the mark (it differs from the whole-signal one by ~0.2 %).
    assert np.sqrt(np.mean((marked - whole) ** 2)) < 0.05 * np.sqrt(np.mean((whole - speech) ** 2))
    assert marker.detect(marked, VOICE_RATE).score > 0.9
    for seconds in (1.0, 3.0):
        pieces = [(b, w) for b, w in zip(segments(marked, VOICE_RATE, seconds), segments(whole, VOICE_RATE, seconds))]
        block_scores = np.array([marker.score(b, VOICE_RATE) for b, _ in pieces])
        whole_scores = np.array([marker.score(w, VOICE_RATE) for _, w in pieces])
        assert np.all(block_scores >= watermark.THRESHOLD), (seconds, block_scores)
        assert np.mean(block_scores) >= np.mean(whole_scores) - 0.02, (block_scores, whole_scores)


def test_long_audio_is_judged_by_its_stretches(marker: Watermarker, marked: np.ndarray) -> None:
    real = np.concatenate([load(path) for s in SPEAKERS.values() for path in s.held_out()[:6]])
    real = soxr.resample(real, RECORDING_RATE, VOICE_RATE)[: 70 * VOICE_RATE]
    assert len(real) == 70 * VOICE_RATE and not marker.detect(real, VOICE_RATE).found
    # The last 40 s stretch is mostly marked speech.
    assert marker.detect(np.concatenate([real[: 40 * VOICE_RATE], np.tile(marked, 3)]), VOICE_RATE).found


def test_other_block_sizes_and_tiny_windows(marker: Watermarker, speech: np.ndarray) -> None:
    # Every window as small as the stream's first block: still marked throughout.
    small = mark_in_blocks(marker, speech, BlockOptions(first_block_frames=8, block_frames=(8,)))
    assert marker.detect(small, VOICE_RATE).found
    # Windows too short to hold a frame come back as they were, at their length.
    for n in (0, 1, 100, 700):
        x = speech[:n].copy()
        out = marker.embed(x, VOICE_RATE)
        assert out.shape == x.shape and out.dtype == np.float32


def test_silence_and_short_clips_are_not_marked(marker: Watermarker) -> None:
    silence = np.zeros(VOICE_RATE * 2, np.float32)
    assert np.array_equal(marker.embed(silence, VOICE_RATE), silence)
    assert marker.detect(silence, VOICE_RATE).score == 0.0
    assert not marker.detect(np.full(100, 0.1, np.float32), VOICE_RATE).found


def test_three_seconds_after_opus_16_kbps_still_detect(marker: Watermarker, speech: np.ndarray, marked: np.ndarray) -> None:
    start = VOICE_RATE // 2
    clip = marked[start : start + 3 * VOICE_RATE]
    result = marker.detect(through_opus_16k(clip, VOICE_RATE), VOICE_RATE)
    assert result.found, result
    plain = marker.detect(through_opus_16k(speech[start : start + 3 * VOICE_RATE], VOICE_RATE), VOICE_RATE)
    assert not plain.found, plain


def test_worker_threads_get_the_same_marks(marker: Watermarker, speech: np.ndarray) -> None:
    windows = [speech[i : i + 64 * HOP] for i in range(0, 6 * 64 * HOP, 64 * HOP)]
    alone = [marker.embed(w, VOICE_RATE) for w in windows]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda w: marker.embed(w, VOICE_RATE), windows))
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_read_audio_formats(marked: np.ndarray) -> None:
    clip = marked[: 2 * VOICE_RATE]
    for container, codec in (("wav", "pcm_s16le"), ("flac", "flac"), ("mp3", "libmp3lame")):
        audio, rate = read_audio(io.BytesIO(encoded(clip, VOICE_RATE, container, codec)))
        assert rate == VOICE_RATE and abs(len(audio) - len(clip)) < 0.1 * VOICE_RATE, container
    with pytest.raises(watermark.InvalidRequest):
        read_audio(io.BytesIO(b"RIFF, but not a wave at all" * 10))
    with pytest.raises(watermark.LimitExceeded):
        read_audio(io.BytesIO(wav_file((clip * 32767).astype("<i2").tobytes(), VOICE_RATE)), max_seconds=1.0)


# -- the command --------------------------------------------------------------------------------


def voxflow(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXFLOW_")}
    return subprocess.run([*COMMAND, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def test_cli_detect_exit_statuses(tmp_path: Path, speech: np.ndarray, marked: np.ndarray) -> None:
    (tmp_path / "marked.wav").write_bytes(wav_file((marked * 32767).astype("<i2").tobytes(), VOICE_RATE))
    (tmp_path / "plain.mp3").write_bytes(encoded(speech, VOICE_RATE, "mp3", "libmp3lame", 64_000))
    (tmp_path / "broken.wav").write_bytes(b"RIFF" + bytes(range(256)) * 4)

    found = voxflow("watermark", "detect", "marked.wav", cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    assert "watermark found" in found.stdout and "score" in found.stdout and WATERMARK_ID in found.stdout

    missing = voxflow("watermark", "detect", "plain.mp3", cwd=tmp_path)
    assert missing.returncode == 1, missing.stderr
    assert "not found" in missing.stdout

    for name in ("broken.wav", "no-such-file.wav"):
        broken = voxflow("watermark", "detect", name, cwd=tmp_path)
        assert broken.returncode == 2, broken.stdout + broken.stderr
        assert "Traceback" not in broken.stderr and "error" in broken.stderr


# -- HTTP ---------------------------------------------------------------------------------------


def test_http_detect(server, speech: np.ndarray, marked: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"{server.http}/v1/watermark/detect"
    marked_wav = wav_file((marked[: 3 * VOICE_RATE] * 32767).astype("<i2").tobytes(), VOICE_RATE)

    r = httpx.post(url, content=marked_wav, headers={"content-type": "audio/wav"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"found", "score", "threshold", "watermark"}
    assert body["found"] is True and body["score"] >= body["threshold"] == watermark.THRESHOLD
    assert body["watermark"] == WATERMARK_ID

    plain_flac = encoded(speech[: 3 * VOICE_RATE], VOICE_RATE, "flac", "flac")
    r = httpx.post(url, files={"file": ("plain.flac", plain_flac, "audio/flac")}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["found"] is False

    marked_ogg = encoded(soxr.resample(marked[: 3 * VOICE_RATE], VOICE_RATE, 48_000), 48_000, "ogg", "libopus", 16_000)
    r = httpx.post(url, content=marked_ogg, headers={"content-type": "audio/ogg"}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["found"] is True, r.text

    def refused(response: httpx.Response, status: int, code: str) -> None:
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code and response.json()["error"]["message"]

    refused(httpx.post(url, content=b"ID3 but no frames" * 50, headers={"content-type": "audio/mpeg"}, timeout=TIMEOUT),
            400, "invalid_request")
    refused(httpx.post(url, content=marked_wav, headers={"content-type": "text/plain"}, timeout=TIMEOUT), 400, "invalid_request")
    refused(httpx.post(url, files={"audio": ("x.wav", marked_wav, "audio/wav")}, timeout=TIMEOUT), 400, "invalid_request")
    refused(httpx.post(url, content=b"", headers={"content-type": "audio/wav"}, timeout=TIMEOUT), 400, "invalid_request")
    monkeypatch.setattr(watermark_http, "MAX_UPLOAD_MB", 64 / 2**20)  # 64 bytes
    refused(httpx.post(url, content=marked_wav, headers={"content-type": "audio/wav"}, timeout=TIMEOUT), 413, "limit_exceeded")


def test_http_detect_is_refused_past_the_checks_in_flight(engine, marked: np.ndarray) -> None:
    """Each check holds a compute thread: past `max_watermark_checks` in flight, 503 (here the
    cap is 0, so the first one is past it) and nothing is decoded."""
    with run_server(engine, max_watermark_checks=0) as busy:
        r = httpx.post(f"{busy.http}/v1/watermark/detect", content=wav_file((marked[:VOICE_RATE] * 32767).astype("<i2").tobytes(), VOICE_RATE),
                       headers={"content-type": "audio/wav"}, timeout=TIMEOUT)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "limit_exceeded" and "watermark check" in r.json()["error"]["message"]
