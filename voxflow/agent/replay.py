"""Replaying a recorded call through the real agent, at the pace it was recorded.

The input WAV is fed 20 ms at a time, each piece when it would have finished arriving from a
microphone; the bot's audio is written to a WAV on the same timeline (silence where it does
not speak, so the two files line up sample for sample), and every event goes to a JSON-lines
file as it happens.
"""

from __future__ import annotations

import asyncio
import json
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import AgentConfig
from ..streaming.engine import Engine
from ..streaming.events import AudioFrame
from .agent import Agent
from .asr import SpeechRecognizer
from .events import AgentEvent, event_to_dict
from .llm import LanguageModel, Message
from .vad import InvalidAudio

FEED_MS = 20
_SILENCE_CHUNK = bytes(2 * 48_000)


def read_call(path: str | Path) -> tuple[bytes, int]:
    """A WAV file as mono PCM16 and its rate; stereo is mixed down, other widths refused."""
    try:
        with wave.open(str(path), "rb") as wav:
            width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            data = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise InvalidAudio(f"{path}: not a PCM WAV file" + (f" ({exc})" if str(exc) else "")) from None
    except OSError as exc:  # missing, a directory, unreadable: a message, not a traceback
        raise InvalidAudio(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if width != 2:
        raise InvalidAudio(f"{path}: {8 * width}-bit samples; the agent takes 16-bit PCM")
    if channels > 1:
        samples = np.frombuffer(data, "<i2").reshape(-1, channels).astype(np.int32)
        data = (samples.sum(axis=1) // channels).astype("<i2").tobytes()
    return data, rate


class WavSink:
    """The bot's audio into a mono WAV, each frame at the sample its due time names."""

    def __init__(self, path: str | Path, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._wav = wave.open(str(path), "wb")
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(sample_rate)
        self._written = 0  # samples

    async def play(self, frame: AudioFrame, due: float) -> None:
        self._pad_to(round(due * self.sample_rate))
        self._wav.writeframes(frame.pcm)
        self._written += frame.samples

    @property
    def seconds(self) -> float:
        return self._written / self.sample_rate

    def stop(self, context_id: str) -> None:
        """Nothing is held here: a frame is written when it is due."""

    def _pad_to(self, sample: int) -> None:
        while self._written < sample:
            n = min(sample - self._written, len(_SILENCE_CHUNK) // 2)
            self._wav.writeframes(_SILENCE_CHUNK[: 2 * n])
            self._written += n

    def close(self, seconds: float) -> None:
        """Pads with silence to at least `seconds` (the input's length) and closes the file."""
        self._pad_to(round(seconds * self.sample_rate))
        self._wav.close()


@dataclass
class ReplayResult:
    events: list[AgentEvent] = field(default_factory=list)
    input_seconds: float = 0.0
    output_seconds: float = 0.0
    settled: bool = True  # false: the bot was still busy when tail_seconds ran out
    history: list[Message] = field(default_factory=list)  # the conversation as the LLM last saw it


async def replay(
    engine: Engine,
    config: AgentConfig,
    input_wav: str | Path,
    output_wav: str | Path,
    events_path: str | Path | None = None,
    *,
    recognizer: SpeechRecognizer | None = None,
    llm: LanguageModel | None = None,
    tail_seconds: float = 30.0,
) -> ReplayResult:
    """Runs the call; after its end waits (up to tail_seconds) for the bot to finish replying."""
    pcm, rate = read_call(input_wav)
    result = ReplayResult(input_seconds=len(pcm) / 2 / rate)
    sink = WavSink(output_wav, rate)
    log = open(events_path, "w", encoding="utf-8") if events_path else None
    try:
        async with Agent(engine, config, sink, input_rate=rate, recognizer=recognizer, llm=llm) as agent:

            async def record() -> None:
                async for event in agent.events():
                    result.events.append(event)
                    if log is not None:
                        log.write(json.dumps(event_to_dict(event)) + "\n")
                        log.flush()

            recorder = asyncio.get_running_loop().create_task(record(), name="voxflow-replay-events")
            step = rate * FEED_MS // 1000 * 2
            for index, offset in enumerate(range(0, len(pcm), step)):
                arrives = (index + 1) * FEED_MS / 1000
                if (wait := arrives - agent.clock.now()) > 0:
                    await asyncio.sleep(wait)
                await agent.feed(pcm[offset : offset + step])
            result.settled = await _settle(agent, tail_seconds)
            result.history = agent.conversation.messages()
        await recorder
    finally:
        sink.close(result.input_seconds)
        result.output_seconds = sink.seconds
        if log is not None:
            log.close()
    return result


async def _settle(agent: Agent, tail_seconds: float) -> bool:
    """Waits for a turn still open at the end of the call to close and its reply to play."""
    # The silence that closes a turn is fed as it would arrive: a call that ends mid-sentence
    # still gets its answer.
    silence = bytes(2 * agent.input_rate * FEED_MS // 1000)
    end = agent.clock.now() + tail_seconds
    while agent.clock.now() < end:
        if agent.quiet and agent.playout.idle:
            return True
        await asyncio.sleep(FEED_MS / 1000)
        if agent.tracker.in_turn:
            await agent.feed(silence)
    return False
