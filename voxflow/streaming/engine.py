"""The engine: voices, worker threads, streams, and whole-text synthesis.

It knows nothing of transports; they open streams and translate the events.
"""

from __future__ import annotations

import asyncio
import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..config import EngineConfig
from ..errors import InvalidRequest, LimitExceeded
from ..voices.registry import VoiceRegistry
from ..voices.styles import Style
from ..voices.voice import Voice
from .alignment import word_timestamps
from .events import WordTimestamp
from .stream import StreamOptions, SynthesisStream


@dataclass(frozen=True)
class Utterance:
    """A whole rendering: float audio in [-1, 1] at the voice's rate and its word timings."""

    audio: np.ndarray
    sample_rate: int
    words: list[WordTimestamp]

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


class Engine:
    def __init__(self, config: EngineConfig = EngineConfig()) -> None:
        self.config = config
        torch.set_num_threads(config.torch_threads)
        self.voices = VoiceRegistry(config.voice_dirs, config.device, config.half)
        self._executor = ThreadPoolExecutor(max(1, config.workers), thread_name_prefix="voxflow-synth")
        self._ids = itertools.count()

    def voice(self, name: str | None = None) -> Voice:
        return self.voices.get(name or self.config.voice)

    def open_stream(
        self,
        *,
        voice: str | None = None,
        style: Style = Style(),
        speaker: str | int | None = None,
        seed: int | None = None,
        context_id: str | None = None,
        options: StreamOptions | None = None,
    ) -> SynthesisStream:
        """Start a synthesis context; must be called with an event loop running."""
        options = options or StreamOptions(max_text_chars=self.config.max_text_chars)
        return SynthesisStream(
            self.voice(voice),
            context_id=context_id or f"ctx-{next(self._ids)}",
            style=style,
            speaker=speaker,
            seed=self.config.seed if seed is None else seed,
            options=options,
            executor=self._executor,
        )

    async def warm_up(self, voice: str | None = None) -> None:
        """Load a voice and run it once so the first real request pays no first-call costs."""
        stream = self.open_stream(voice=voice)
        await stream.push("Warming up the voice.")
        await stream.end()
        async for _ in stream:
            pass

    @torch.inference_mode()
    def synthesize(
        self,
        text: str,
        *,
        voice: str | None = None,
        style: Style = Style(),
        speaker: str | int | None = None,
        seed: int | None = None,
    ) -> Utterance:
        """Whole-text synthesis, one sentence at a time, the way Piper renders it (blocking)."""
        if not isinstance(text, str):
            raise InvalidRequest(f"text must be a string, got {type(text).__name__}")
        if len(text) > self.config.max_text_chars:
            raise LimitExceeded(f"text exceeds {self.config.max_text_chars} characters")
        v = self.voice(voice)
        scales = style.scales(v.info.defaults)
        generator = torch.Generator(device=v.device).manual_seed(self.config.seed if seed is None else seed)
        sid = v.speaker_id(speaker)
        seconds_per_frame = v.hop_length / v.sample_rate
        pieces: list[np.ndarray] = []
        words: list[WordTimestamp] = []
        offset = 0.0
        for sentence in v.phonemizer.phonemize_sentences(text):
            ids = torch.as_tensor([sentence.ids], dtype=torch.long, device=v.device)
            audio, durations = v.model.infer(ids, scales, sid, generator)
            words += word_timestamps("", sentence.words, durations, seconds_per_frame, offset)
            pieces.append(audio[0, 0].float().cpu().numpy())
            offset += len(pieces[-1]) / v.sample_rate
        audio = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        return Utterance(np.clip(audio * style.volume, -1.0, 1.0), v.sample_rate, words)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def __aenter__(self) -> "Engine":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)
