"""Runs a Pipecat TTS service inside a real Pipeline, as an application would, and collects what
comes out of it: audio, the words it times, the text frames it pushes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pipecat.frames.frames import EndFrame, Frame, TTSAudioRawFrame, TTSSpeakFrame, TTSStoppedFrame, TTSTextFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.tts_service import TTSService
from pipecat.workers.runner import WorkerRunner


class RecordsWordTimes:
    """Mixed into a Pipecat TTS service as shipped: notes the word times it rebuilds (seconds
    from its context's first audio, what its word-timestamp tracker turns into frame times)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.word_times: list[tuple[str, float]] = []

    async def add_word_timestamps(self, word_times, context_id=None, **kwargs):
        self.word_times += word_times
        await super().add_word_timestamps(word_times, context_id, **kwargs)


class Collector(FrameProcessor):
    def __init__(self, until: type[Frame]) -> None:
        super().__init__()
        self.audio = bytearray()
        self.words: list[str] = []
        self.done = asyncio.Event()
        self._until = until

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self.audio += frame.audio
        elif isinstance(frame, TTSTextFrame):
            self.words.append(frame.text)
        if isinstance(frame, self._until):
            self.done.set()
        await self.push_frame(frame, direction)


async def run_pipeline(
    tts: TTSService, frames: Sequence[Frame], sample_rate: int, timeout: float, until: type[Frame] = TTSStoppedFrame
) -> Collector:
    """`frames` through [tts, collector] until a frame of type `until` comes out, then the end."""
    collector = Collector(until)
    worker = PipelineWorker(
        Pipeline([tts, collector]), cancel_on_idle_timeout=False, params=PipelineParams(audio_out_sample_rate=sample_rate)
    )
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _on_started(worker, frame):
        started.set()

    runner = WorkerRunner()
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    try:
        async with asyncio.timeout(timeout):
            await started.wait()
            for frame in frames:
                await worker.queue_frame(frame)
            await collector.done.wait()
            await worker.queue_frame(EndFrame())
            await running
    finally:
        running.cancel()
    return collector


async def speak_through(tts: TTSService, text: str, sample_rate: int, timeout: float) -> bytes:
    """`text` as a TTSSpeakFrame; the PCM that came out once the service said it stopped."""
    return bytes((await run_pipeline(tts, [TTSSpeakFrame(text)], sample_rate, timeout)).audio)


def assert_words_match(rebuilt: list[tuple[str, float]], truth: list[tuple[str, float]], tolerance: float = 0.020) -> None:
    """Every word a client rebuilt is the server's, within one 20 ms frame of when it was spoken."""
    assert [w for w, _ in rebuilt] == [w for w, _ in truth]
    worst = max(abs(a - b) for (_, a), (_, b) in zip(rebuilt, truth))
    assert worst <= tolerance, f"a word {worst * 1000:.0f} ms off its audio"
