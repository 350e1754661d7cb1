"""Runs a Pipecat TTS service inside a real Pipeline, as an application would, and collects its audio."""

from __future__ import annotations

import asyncio

from pipecat.frames.frames import EndFrame, Frame, TTSAudioRawFrame, TTSSpeakFrame, TTSStoppedFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.tts_service import TTSService
from pipecat.workers.runner import WorkerRunner


class _Collector(FrameProcessor):
    def __init__(self) -> None:
        super().__init__()
        self.audio = bytearray()
        self.stopped = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self.audio += frame.audio
        elif isinstance(frame, TTSStoppedFrame):
            self.stopped.set()
        await self.push_frame(frame, direction)


async def speak_through(tts: TTSService, text: str, sample_rate: int, timeout: float) -> bytes:
    """`text` as a TTSSpeakFrame through [tts, collector]; the PCM that came out, once the
    service said it stopped."""
    collector = _Collector()
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
            await worker.queue_frame(TTSSpeakFrame(text))
            await collector.stopped.wait()
            await worker.queue_frame(EndFrame())
            await running
    finally:
        running.cancel()
    return bytes(collector.audio)
