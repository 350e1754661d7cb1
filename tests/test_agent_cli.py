"""`voxflow agent`: a recorded call replayed through the agent by the real command, in a process
of its own, the way a user debugs a call."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from conversation_audio import compose, write_wav
from speech import normalize_words, word_error_rate
from voxflow.agent.events import SpeechStarted, TranscriptEvent, TurnMetrics, event_from_dict, event_to_dict

LIGHTS = "please turn on the kitchen lights"
RATE = 22_050  # not the VAD's 16 kHz: the output must follow the input's rate
TIMEOUT = 120  # a fresh process loads torch and the voice

_SCRIPT = Path(sys.executable).with_name("voxflow")
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "voxflow.cli"]


def voxflow(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXFLOW_") and k != "OPENAI_API_KEY"}
    return subprocess.run([*COMMAND, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth()) == (1, 2)
        rate = wav.getframerate()
        audio = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").astype(np.float32) / 32768
    return audio, rate


@pytest.fixture(scope="module")
def run(engine, tmp_path_factory):
    folder = tmp_path_factory.mktemp("agent-cli")
    call = compose(engine, [("silence", 0.5), ("say", LIGHTS), ("silence", 2.5)], rate=RATE, seed=41)
    write_wav(folder / "call.wav", call.audio, RATE)
    proc = voxflow("agent", "--input-wav", "call.wav", "--output-wav", "bot.wav", "--events", "events.jsonl", cwd=folder)
    return proc, folder, call


def test_agent_command_succeeds(run) -> None:
    proc, _, _ = run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_wavs_line_up(run) -> None:
    proc, folder, call = run
    assert proc.returncode == 0, proc.stderr
    bot, rate = read_wav(folder / "bot.wav")
    person, person_rate = read_wav(folder / "call.wav")
    assert rate == person_rate == RATE
    assert len(bot) >= len(person)  # at least as long, so they line up sample for sample
    assert float(np.abs(bot).max()) > 0.05  # the bot spoke
    # It did not speak over the person: silent while they talked.
    (span,) = call.speech_spans
    assert float(np.abs(bot[: int(span[1] * rate)]).max()) == 0.0


def test_the_events_file_parses_and_tells_the_turn(run) -> None:
    proc, folder, _ = run
    assert proc.returncode == 0, proc.stderr
    lines = (folder / "events.jsonl").read_text().splitlines()
    events = [event_from_dict(json.loads(line)) for line in lines]
    assert [json.loads(line) for line in lines] == [event_to_dict(e) for e in events]  # round trip
    assert isinstance(events[0], SpeechStarted)
    (heard,) = [e for e in events if isinstance(e, TranscriptEvent)]
    assert word_error_rate([LIGHTS], [heard.text]) <= 0.5, heard.text
    (metrics,) = [e for e in events if isinstance(e, TurnMetrics)]
    assert metrics.turn == 1 and metrics.voice_to_voice_ms is not None and metrics.voice_to_voice_ms > 0
    assert [e.t for e in events] == sorted(e.t for e in events)


def test_stdout_tells_each_turn(run) -> None:
    proc, folder, _ = run
    assert proc.returncode == 0, proc.stderr
    events = [event_from_dict(json.loads(line)) for line in (folder / "events.jsonl").read_text().splitlines()]
    (heard,) = [e for e in events if isinstance(e, TranscriptEvent)]
    lines = proc.stdout.splitlines()
    turn_line = next(line for line in lines if line.startswith("turn 1: heard"))
    assert repr(heard.text) in turn_line and "-> replied" in turn_line
    replied = ast.literal_eval(turn_line.split("-> replied ", 1)[1])
    assert normalize_words(replied) == normalize_words(heard.text)  # the echo
    assert any(line.strip().startswith("voice-to-voice") and "end of turn" in line for line in lines)
    assert any(line.startswith("wrote bot.wav") for line in lines)


def test_a_bad_input_file_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "junk.wav").write_bytes(b"RIFF, but not really a wav file")
    proc = voxflow("agent", "--input-wav", "junk.wav", "--output-wav", "out.wav", cwd=tmp_path)
    assert proc.returncode == 2
    assert "error [invalid_audio]" in proc.stderr and "junk.wav" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out.wav").exists()  # nothing written for a call that was never read
    # A file that is not there is refused the same way, not with a traceback.
    proc = voxflow("agent", "--input-wav", "missing.wav", "--output-wav", "out.wav", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "error [invalid_audio]" in proc.stderr and "missing.wav" in proc.stderr
    assert "Traceback" not in proc.stderr
