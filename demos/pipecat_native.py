"""Speak an LLM-like reply through a Pipecat pipeline with voxflow's native TTS service.

    .venv/bin/voxflow serve                      # in another terminal
    .venv/bin/python demos/pipecat_native.py [--server ws://127.0.0.1:8765/v1/stream] [-o pipecat.wav]

The reply arrives as LLM tokens (LLMTextFrame, 50 per second), as Pipecat's LLM services send
them; `Recorder` stands where a transport's output would be. Each word is printed as its
TTSTextFrame arrives, with its time in the audio (the frames' pts, less the first word's), and
the audio goes to a WAV file. Needs `pip install voxflow[pipecat]`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import wave

from loguru import logger
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from voxflow.integrations.pipecat import VoxflowTTSService
from voxflow.streaming.tokens import gpt_like_tokens, paced

REPLY = "Sure! The museum opens at ten, so we have time for breakfast and a short walk by the river."
SAMPLE_RATE = 24000


class Recorder(FrameProcessor):
    """Keeps the audio and prints the words, where a transport would play them."""

    def __init__(self) -> None:
        super().__init__()
        self.pcm = bytearray()
        self._first_word_pts: int | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self.pcm += frame.audio
        elif isinstance(frame, TTSTextFrame) and frame.pts is not None:
            self._first_word_pts = self._first_word_pts or frame.pts
            print(f"  {(frame.pts - self._first_word_pts) / 1e9:6.2f} s  {frame.text}")
        await self.push_frame(frame, direction)


async def main(server: str, output: str) -> None:
    tts = VoxflowTTSService(url=server, settings=VoxflowTTSService.Settings(style="calm"))
    recorder = Recorder()
    worker = PipelineWorker(
        Pipeline([tts, recorder]), params=PipelineParams(audio_out_sample_rate=SAMPLE_RATE), cancel_on_idle_timeout=False
    )

    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def on_started(worker: PipelineWorker, frame: Frame) -> None:
        started.set()

    @worker.event_handler("on_pipeline_error")
    async def on_error(worker: PipelineWorker, frame: Frame) -> None:
        print(f"error: {frame}")

    async def reply() -> None:
        await started.wait()
        await worker.queue_frame(LLMFullResponseStartFrame())
        async for token in paced(gpt_like_tokens(REPLY), 50):
            await worker.queue_frame(LLMTextFrame(token))
        await worker.queue_frames([LLMFullResponseEndFrame(), EndFrame()])

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.gather(runner.run(), reply())

    with wave.open(output, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(recorder.pcm)
    print(f"wrote {len(recorder.pcm) / 2 / SAMPLE_RATE:.1f} s of audio to {output}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="ws://127.0.0.1:8765/v1/stream")
    parser.add_argument("-o", "--output", default="pipecat.wav")
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")  # Pipecat traces every frame at DEBUG
    asyncio.run(main(args.server, args.output))
