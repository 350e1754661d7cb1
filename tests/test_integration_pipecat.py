"""voxflow.integrations.pipecat inside a real Pipecat pipeline (PipelineWorker, WorkerRunner)
against a live server: what reaches the pipeline's end is checked against what the server sent."""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    TTSUpdateSettingsFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.tts_service import TextAggregationMode
from pipecat.workers.runner import WorkerRunner

import voxflow.client as client_module
from server_harness import RunningServer, free_port
from test_client import LONG_TEXT, SENTENCE, TIMEOUT, Wire, drop_connections, plain_words, stream_url, tap_wire
from voxflow.client import StyleSpec
from voxflow.integrations.pipecat import VoxflowTTSService
from voxflow.streaming.tokens import gpt_like_tokens
from voxflow.transports.protocols.native_protocol import (
    Cancelled,
    Done,
    End,
    Error,
    Flush,
    Metrics,
    Ready,
    Start,
    Text,
    Word,
)
from waiting import until

RATE = 24000
FRAME_SECONDS = 0.02


class Sink(FrameProcessor):
    """The pipeline's last processor: every frame that reaches the end, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[Frame] = []
        self.audio_arrived = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction is FrameDirection.DOWNSTREAM:
            self.frames.append(frame)
            if isinstance(frame, TTSAudioRawFrame):
                self.audio_arrived.set()
        await self.push_frame(frame, direction)

    def of(self, kind: type[Frame], context_id: str) -> list:
        return [f for f in self.frames if isinstance(f, kind) and getattr(f, "context_id", None) == context_id]


@dataclass
class Run:
    worker: PipelineWorker
    sink: Sink
    errors: list[ErrorFrame] = field(default_factory=list)


Script = Callable[[Run], Awaitable[None]]


async def run_pipeline(service: VoxflowTTSService, script: Script) -> Run:
    """Run [service, sink] until `script` has queued its frames and an EndFrame has gone through."""
    sink = Sink()
    worker = PipelineWorker(
        Pipeline([service, sink]), params=PipelineParams(audio_out_sample_rate=RATE), cancel_on_idle_timeout=False
    )
    run = Run(worker, sink)
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def on_started(_worker: PipelineWorker, _frame: Frame) -> None:
        started.set()

    @worker.event_handler("on_pipeline_error")
    async def on_error(_worker: PipelineWorker, frame: ErrorFrame) -> None:
        run.errors.append(frame)

    async def drive() -> None:
        await asyncio.wait_for(started.wait(), TIMEOUT)
        await script(run)
        await worker.queue_frame(EndFrame())

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    async with asyncio.timeout(TIMEOUT), asyncio.TaskGroup() as group:
        group.create_task(runner.run())
        group.create_task(drive())
    return run


def queue(*frames: Frame) -> Script:
    async def script(run: Run) -> None:
        await run.worker.queue_frames(frames)

    return script


def opened(wire: Wire) -> list[Start]:
    return [m for m in wire.sent if isinstance(m, Start)]


def seconds(frames: list[TTSAudioRawFrame]) -> float:
    return sum(len(f.audio) for f in frames) / 2 / RATE


def check_context(run: Run, wire: Wire, context_id: str, text: str) -> None:
    """The context's audio and words at the end of the pipeline are the server's."""
    audio = run.sink.of(TTSAudioRawFrame, context_id)
    assert audio and all(f.sample_rate == RATE and f.num_channels == 1 for f in audio)
    [metrics] = [m for m in wire.of(context_id) if isinstance(m, Metrics)]
    assert seconds(audio) == pytest.approx(metrics.audio_seconds, abs=FRAME_SECONDS)
    server_words = [m for m in wire.of(context_id) if isinstance(m, Word)]
    words = run.sink.of(TTSTextFrame, context_id)
    assert [w.text for w in words] == [w.word for w in server_words]
    assert [w.text.strip(",.!?").lower() for w in words] == plain_words(text)
    # A word's pts is the pipeline clock when the context's first audio played, plus its time.
    assert [(w.pts - words[0].pts) / 1e9 for w in words] == pytest.approx(
        [w.start - server_words[0].start for w in server_words], abs=FRAME_SECONDS
    )
    framed = [f for f in run.sink.frames if isinstance(f, (TTSStartedFrame, TTSAudioRawFrame, TTSStoppedFrame))]
    framed = [f for f in framed if f.context_id == context_id]
    assert isinstance(framed[0], TTSStartedFrame) and isinstance(framed[-1], TTSStoppedFrame) and framed[1:-1] == audio


async def test_a_speak_frame_is_spoken_with_the_servers_words(server: RunningServer) -> None:
    with tap_wire() as wire:
        run = await run_pipeline(VoxflowTTSService(url=stream_url(server)), queue(TTSSpeakFrame(SENTENCE)))
    [start] = opened(wire)
    assert start.sample_rate == RATE and start.style is None
    assert isinstance(wire.of(start.context)[-1], Done)
    check_context(run, wire, start.context, SENTENCE)
    assert run.errors == []


@pytest.mark.parametrize("mode", [TextAggregationMode.TOKEN, TextAggregationMode.SENTENCE])
async def test_an_llm_reply_is_one_context(server: RunningServer, mode: TextAggregationMode) -> None:
    reply = "Good morning to you. The weather is lovely today."
    frames = [LLMFullResponseStartFrame(), *(LLMTextFrame(t) for t in gpt_like_tokens(reply)), LLMFullResponseEndFrame()]
    with tap_wire() as wire:
        run = await run_pipeline(VoxflowTTSService(url=stream_url(server), text_aggregation_mode=mode), queue(*frames))
    [start] = opened(wire)
    sent = [m for m in wire.sent if isinstance(m, (Text, Flush, End))]
    assert "".join(m.text for m in sent if isinstance(m, Text)).strip() == reply
    if mode is TextAggregationMode.TOKEN:  # tokens go out as they come; voxflow chunks them
        assert len(sent) > 10 and not any(isinstance(m, Flush) for m in sent)
    else:  # each sentence is spoken as it is sent
        assert [type(m) for m in sent] == [Text, Flush, Text, Flush, End]
    assert isinstance(sent[-1], End)
    check_context(run, wire, start.context, reply)
    last_audio = max(i for i, f in enumerate(run.sink.frames) if isinstance(f, TTSAudioRawFrame))
    assert any(isinstance(f, LLMFullResponseEndFrame) for f in run.sink.frames[last_audio:])
    assert run.errors == []


async def test_two_utterances_share_the_socket_and_stay_apart(server: RunningServer) -> None:
    texts = ("Good morning to you.", "The weather is lovely today.")
    calm = TTSUpdateSettingsFrame(delta=VoxflowTTSService.Settings(style="calm", speed=1.2))
    with tap_wire() as wire:
        run = await run_pipeline(
            VoxflowTTSService(url=stream_url(server)), queue(TTSSpeakFrame(texts[0]), calm, TTSSpeakFrame(texts[1]))
        )
    first, second = opened(wire)
    assert (first.style, second.style) == (None, StyleSpec(preset="calm", speed=1.2))
    assert len([m for m in wire.received if isinstance(m, Ready)]) == 1  # one socket
    for start, text in zip((first, second), texts):
        check_context(run, wire, start.context, text)
    order = [f.context_id for f in run.sink.frames if isinstance(f, TTSAudioRawFrame)]
    assert order == sorted(order, key=[first.context, second.context].index)  # one after the other, unmixed
    assert run.errors == []


async def test_an_interruption_cancels_the_context_at_once(server: RunningServer) -> None:
    service = VoxflowTTSService(url=stream_url(server))

    async def script(run: Run) -> None:
        await run.worker.queue_frame(TTSSpeakFrame(LONG_TEXT))
        await asyncio.wait_for(run.sink.audio_arrived.wait(), TIMEOUT)
        await run.worker.queue_frame(InterruptionFrame())
        context_id = opened(wire)[0].context
        await until(lambda: any(isinstance(m, Cancelled) for m in wire.of(context_id)), TIMEOUT)
        await until(lambda: not any(context_id in task.get_name() for task in asyncio.all_tasks()), TIMEOUT)
        await run.worker.queue_frame(TTSSpeakFrame("Hello there."))

    with tap_wire() as wire:
        run = await run_pipeline(service, script)
    interrupted, after = opened(wire)
    assert not any(isinstance(m, Done) for m in wire.of(interrupted.context))
    cut = next(i for i, f in enumerate(run.sink.frames) if isinstance(f, InterruptionFrame))
    assert not [f for f in run.sink.frames[cut:] if getattr(f, "context_id", None) == interrupted.context]
    assert seconds(run.sink.of(TTSAudioRawFrame, interrupted.context)) < 20  # the whole text runs over a minute
    check_context(run, wire, after.context, "Hello there.")
    assert run.errors == []


async def test_a_dropped_socket_ends_the_utterance_and_the_next_one_reconnects(server: RunningServer) -> None:
    async def script(run: Run) -> None:
        await run.worker.queue_frame(TTSSpeakFrame(LONG_TEXT))
        await asyncio.wait_for(run.sink.audio_arrived.wait(), TIMEOUT)
        await drop_connections(server)
        await until(lambda: bool(run.errors), TIMEOUT)
        await run.worker.queue_frame(TTSSpeakFrame("We are back."))

    with tap_wire() as wire:
        run = await run_pipeline(VoxflowTTSService(url=stream_url(server)), script)
    lost, back = opened(wire)
    assert len(run.sink.of(TTSStoppedFrame, lost.context)) == 1
    assert not any(isinstance(m, (Done, Cancelled, Error)) for m in wire.of(lost.context))
    assert len(run.errors) == 1 and "connection_lost" in run.errors[0].error
    assert run.errors[0].processor.is_usable
    assert len([m for m in wire.received if isinstance(m, Ready)]) == 2
    check_context(run, wire, back.context, "We are back.")


async def test_without_a_server_each_turn_fails_once_and_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "backoff_delay", lambda *_: 0.0)
    tokens = ["Hello", " there", ",", " how", " are", " you", "?"]
    frames = [LLMFullResponseStartFrame(), *(LLMTextFrame(t) for t in tokens), LLMFullResponseEndFrame()]
    with tap_wire() as wire:
        run = await run_pipeline(VoxflowTTSService(url=f"ws://127.0.0.1:{free_port()}/v1/stream"), queue(*frames))
    assert opened(wire) == []
    failures = [e for e in run.errors if "connection_failed" in e.error]
    assert len(failures) == 2  # the connection made at start, then the turn's context: not one per token
    assert [type(f) for f in run.sink.frames if isinstance(f, (TTSStartedFrame, TTSStoppedFrame))] == [
        TTSStartedFrame,
        TTSStoppedFrame,
    ]
    assert not any(isinstance(f, TTSAudioRawFrame) for f in run.sink.frames)


async def test_no_task_outlives_the_pipeline(server: RunningServer) -> None:
    await run_pipeline(VoxflowTTSService(url=stream_url(server)), queue(TTSSpeakFrame("One more.")))
    await until(lambda: not [t for t in asyncio.all_tasks() if "voxflow" in t.get_name().lower()], TIMEOUT)


async def test_a_bad_setting_makes_the_service_unusable_with_a_clear_error(server: RunningServer) -> None:
    service = VoxflowTTSService(url=stream_url(server), settings=VoxflowTTSService.Settings(style="grumpy"))
    with tap_wire() as wire:
        run = await run_pipeline(service, queue(TTSSpeakFrame("Hello.")))
    assert opened(wire) == []
    assert len(run.errors) == 1 and "unknown style 'grumpy'" in run.errors[0].error
    assert [type(f) for f in run.sink.frames if isinstance(f, (TTSStartedFrame, TTSStoppedFrame))] == [
        TTSStartedFrame,
        TTSStoppedFrame,
    ]
    assert not service.is_usable


def test_importing_without_pipecat_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pipecat.frames.frames", None)
    monkeypatch.delitem(sys.modules, "voxflow.integrations.pipecat")
    with pytest.raises(ImportError, match=r"pip install 'voxflow\[pipecat\]'"):
        importlib.import_module("voxflow.integrations.pipecat")
