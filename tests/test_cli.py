"""The `voxflow` command, run as a real process the way a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

# tests/ is not a package; pytest puts it on sys.path, so the helper imports by its bare name.
from speech import transcribe, word_error_rate

TEXT = "Please remember to call your mother this evening."
VOICE_RATE = 22_050
TIMEOUT = 120  # seconds; the first run of a fresh process loads torch and the voice

# The installed console script when there is one (it tests the entry point too), else the module.
_SCRIPT = Path(sys.executable).with_name("voxflow")
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "voxflow.cli"]


def voxflow(*args: str, cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    # VOXFLOW_* variables from the developer's shell would change voice, seed or config.
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXFLOW_")}
    return subprocess.run(
        [*COMMAND, *args], cwd=cwd, env=env, input=stdin, capture_output=True, timeout=TIMEOUT, check=False
    )


def no_traceback(proc: subprocess.CompletedProcess[bytes]) -> None:
    assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Check the WAV is mono PCM16 and return its samples as floats and its rate."""
    with wave.open(str(path), "rb") as wav:
        assert wav.getnchannels() == 1
        assert wav.getsampwidth() == 2
        rate = wav.getframerate()
        pcm = wav.readframes(wav.getnframes())
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0, rate


def figures(stream: bytes) -> dict:
    """The JSON figures object: the last non-empty line, so stray log lines before it don't matter."""
    lines = [line for line in stream.decode().splitlines() if line.strip()]
    assert lines, "nothing printed"
    return json.loads(lines[-1])


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) if len(audio) else 0.0


# -- say --------------------------------------------------------------------------------------


def test_say_whole_writes_an_intelligible_wav(tmp_path: Path) -> None:
    proc = voxflow("say", TEXT, "-o", "out.wav", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    info = figures(proc.stdout)
    audio, rate = read_wav(tmp_path / "out.wav")
    assert rate == VOICE_RATE
    assert len(audio) / rate > 0.5
    assert info["mode"] == "whole"
    assert info["audio_seconds"] > 0
    assert info["audio_seconds"] == pytest.approx(len(audio) / rate, abs=0.01)
    # A byte-order or scaling slip in the WAV writer would still give a valid file of noise.
    assert word_error_rate([TEXT], [transcribe(audio, rate)]) <= 0.5


def test_say_stream_reports_latency_and_writes_a_wav(tmp_path: Path) -> None:
    proc = voxflow("say", "--stream", "--tps", "50", TEXT, "-o", "out.wav", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    info = figures(proc.stdout)
    assert info["mode"] == "stream"
    assert info["first_audio_ms"] > 0
    assert info["rtf"] > 0
    assert info["chunks"] >= 1
    audio, rate = read_wav(tmp_path / "out.wav")
    assert rate == VOICE_RATE
    assert len(audio) / rate > 0.5
    assert info["audio_seconds"] == pytest.approx(len(audio) / rate, abs=0.01)
    assert rms(audio) > 0.01


@pytest.mark.parametrize("mode", [[], ["--stream", "--tps", "200"]], ids=["whole", "stream"])
def test_say_rate_option_resamples_the_wav(tmp_path: Path, mode: list[str]) -> None:
    proc = voxflow("say", *mode, TEXT, "-o", "out.wav", "--rate", "16000", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    audio, rate = read_wav(tmp_path / "out.wav")
    assert rate == 16_000
    assert figures(proc.stdout)["sample_rate"] == 16_000
    # Resampling must keep the duration; a file tagged 16 kHz but holding 22.05 kHz samples would not.
    assert len(audio) / rate == pytest.approx(figures(proc.stdout)["audio_seconds"], abs=0.02)


def test_say_from_stdin_writes_raw_pcm_to_stdout(tmp_path: Path) -> None:
    proc = voxflow("say", "-", "--json", cwd=tmp_path, stdin=TEXT.encode())
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    pcm = proc.stdout
    assert len(pcm) > 0
    assert len(pcm) % 2 == 0  # whole PCM16 samples only
    audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    assert rms(audio) > 0.01
    # stdout carries only audio, so the figures go to stderr.
    info = figures(proc.stderr)
    assert info["sample_rate"] == VOICE_RATE
    assert info["audio_seconds"] == pytest.approx(len(audio) / VOICE_RATE, abs=0.01)


# -- voices -----------------------------------------------------------------------------------


def test_voices_lists_the_default_voice(tmp_path: Path) -> None:
    proc = voxflow("voices", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert "en_US-joe-medium" in proc.stdout.decode()


def test_voices_json(tmp_path: Path) -> None:
    proc = voxflow("voices", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    voices = {v["name"]: v for v in json.loads(proc.stdout)}
    assert voices["en_US-joe-medium"]["sample_rate"] == VOICE_RATE


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [[], ["--stream"]], ids=["whole", "stream"])
def test_say_empty_text_writes_an_empty_wav(tmp_path: Path, mode: list[str]) -> None:
    proc = voxflow("say", *mode, "", "-o", "out.wav", cwd=tmp_path)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    audio, rate = read_wav(tmp_path / "out.wav")
    assert rate == VOICE_RATE
    assert len(audio) == 0


def test_say_without_output_is_refused(tmp_path: Path) -> None:
    proc = voxflow("say", TEXT, cwd=tmp_path)
    no_traceback(proc)
    assert proc.returncode == 2
    assert b"--output is required" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--style", "furious"], b"--style"),  # argparse's own refusal
        (["--speed", "10"], b"speed"),
        (["--stream", "--speed", "10"], b"speed"),
        (["--voice", "nope"], b"unknown voice"),
    ],
    ids=["style", "speed-whole", "speed-stream", "voice"],
)
def test_bad_options_are_refused_without_output(tmp_path: Path, args: list[str], message: bytes) -> None:
    proc = voxflow("say", TEXT, "-o", "out.wav", *args, cwd=tmp_path)
    no_traceback(proc)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "out.wav").exists()
