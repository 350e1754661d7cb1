"""Each node of the agent alone, in a small graph with a capture node after it, on real
components: webrtcvad and the turn rules on engine-made speech, pocketsphinx, the echo
responder, the engine's synthesis streams."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from conversation_audio import compose, speech, to_pcm16
from speech import normalize_words, transcribe, word_error_rate
from voxflow.agent.asr_pocketsphinx import PocketsphinxRecognizer
from voxflow.agent.conversation import Conversation
from voxflow.agent.events import ReplyEvent, SpeechStarted, SpeechStopped, TranscriptEvent
from voxflow.agent.frames import (
    InputAudio,
    Interruption,
    ReplyEnd,
    ReplyText,
    Transcript,
    UserAudio,
    UserStartedSpeaking,
    UserStoppedSpeaking,
    VoiceFrame,
)
from voxflow.agent.graph import Clock, Graph, Node
from voxflow.agent.listening import AsrNode, TurnNode, VadNode
from voxflow.agent.llm import EchoResponder, Message
from voxflow.agent.speaking import LlmNode, TtsNode
from voxflow.agent.turn_metrics import TurnTimer
from voxflow.agent.turns import TurnOptions, TurnTracker
from voxflow.agent.vad import VoiceActivity
from voxflow.streaming.events import AudioFrame, StreamEnd, WordTimestamp
from voxflow.voices.styles import resolve_style
import waiting

LIGHTS = "please turn on the kitchen lights"
MOTHER = "Sure, I will call your mother on the phone."
WEATHER = "The weather today will be sunny in the morning with clouds later and a light wind from the west."


class Capture(Node):
    """The last node of a harness graph: keeps what the node under test emits."""

    name = "capture"

    def __init__(self, *, interruptible: bool = False) -> None:
        super().__init__()
        self.interruptible = interruptible
        self.got: list[object] = []
        self.interrupts: list[Interruption] = []

    async def process(self, frame: object) -> None:
        self.got.append(frame)

    def interrupt(self, frame: Interruption) -> None:
        self.interrupts.append(frame)

    def of(self, kind: type) -> list:
        return [f for f in self.got if isinstance(f, kind)]


class Harness:
    def __init__(self, *nodes: Node, interruptible_capture: bool = False) -> None:
        self.capture = Capture(interruptible=interruptible_capture)
        self.events: list = []
        self.graph = Graph([*nodes, self.capture], Clock(), self.events.append)
        self.graph.start()

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    async def until(self, predicate, timeout: float = 20.0) -> None:
        await waiting.until(predicate, timeout)

    async def aclose(self) -> None:
        await self.graph.aclose()


@pytest.fixture
async def harnesses():
    made: list[Harness] = []

    def make(*nodes: Node, **options) -> Harness:
        harness = Harness(*nodes, **options)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        await harness.aclose()


@pytest.fixture(scope="module")
def recognizer() -> Iterator[PocketsphinxRecognizer]:
    made = PocketsphinxRecognizer()
    yield made
    asyncio.run(made.aclose())


def chunks(pcm: bytes, size: int) -> Iterator[bytes]:
    return (pcm[i : i + size] for i in range(0, len(pcm), size))


# -- VadNode, TurnNode --


@pytest.mark.parametrize("rate", [16_000, 48_000])
async def test_vad_node_frames_the_input_at_16_khz(engine, harnesses, rate: int) -> None:
    call = compose(engine, [("silence", 0.5), ("say", LIGHTS), ("silence", 0.8)], rate=rate, seed=11)
    h = harnesses(VadNode(VoiceActivity(rate)))
    for piece in chunks(to_pcm16(call.audio), rate * 2 * 20 // 1000):
        await h.graph.put(InputAudio(piece, rate))
    expected = int(call.duration / 0.03) - (1 if rate != 16_000 else 0)  # soxr holds back a little
    await h.until(lambda: len(h.capture.got) >= expected)
    frames = h.capture.got
    assert all(isinstance(f, VoiceFrame) and len(f.pcm) == 960 for f in frames)
    assert [round(f.start / 0.03) for f in frames] == list(range(len(frames)))
    (span,) = call.speech_spans
    inside = [f.speech for f in frames if span[0] + 0.1 <= f.start and f.end <= span[1] - 0.1]
    outside = [f.speech for f in frames if f.end < span[0] - 0.1 or f.start > span[1] + 0.2]
    assert sum(inside) / len(inside) > 0.7
    assert sum(outside) / len(outside) < 0.1
    assert h.events == []  # the VAD reports nothing itself


async def test_turn_node_finds_the_turn_in_engine_speech(engine, harnesses) -> None:
    call = compose(engine, [("silence", 0.6), ("say", LIGHTS), ("silence", 1.2)], seed=12)
    conversation, timer_events = Conversation("", 10), []
    timer = TurnTimer(timer_events.append)
    h = harnesses(VadNode(VoiceActivity(16_000)), TurnNode(TurnTracker(TurnOptions()), conversation, timer))
    for piece in chunks(to_pcm16(call.audio), 640):
        await h.graph.put(InputAudio(piece, 16_000))
    await h.until(lambda: h.capture.of(UserStoppedSpeaking))
    got = h.capture.got
    assert isinstance(got[0], UserStartedSpeaking) and isinstance(got[-1], UserStoppedSpeaking)
    assert all(isinstance(f, UserAudio) for f in got[1:-1]) and len(got) > 10
    assert {f.turn for f in got} == {1}
    (span,) = call.speech_spans
    started, stopped = got[0], got[-1]
    assert abs(started.speech_start - span[0]) < 0.15
    assert abs(stopped.speech_end - span[1]) < 0.2 and not stopped.forced
    # The person's audio from pre-roll before the start to the end of the turn, all of it once.
    audio = sum(len(f.pcm) for f in got[1:-1]) / 32_000
    assert stopped.speech_end - started.speech_start <= audio <= stopped.speech_end - started.speech_start + 0.3 + 0.8
    # The events say the same, in order.
    assert [type(e) for e in h.events] == [SpeechStarted, SpeechStopped]
    assert (h.events[0].turn, h.events[0].speech_start) == (1, started.speech_start)
    assert (h.events[1].turn, h.events[1].speech_end, h.events[1].forced) == (1, stopped.speech_end, False)
    # A reply is pending from the end of the turn, and the turn's end was marked for metrics.
    assert conversation.active_reply == 1
    timer.no_reply(1, h.graph.clock.now())
    (m,) = timer_events
    assert 600 <= m.end_of_turn_ms <= 800  # the silence waited after the speech


async def test_turn_node_interrupts_a_pending_reply(engine, harnesses) -> None:
    call = compose(engine, [("silence", 0.5), ("say", LIGHTS), ("silence", 1.0)], seed=13)
    conversation = Conversation("", 10)
    conversation.begin_reply(7)  # the bot is answering an earlier turn
    h = harnesses(
        VadNode(VoiceActivity(16_000)),
        TurnNode(TurnTracker(TurnOptions()), conversation, TurnTimer(lambda e: None)),
        interruptible_capture=True,
    )
    for piece in chunks(to_pcm16(call.audio), 640):
        await h.graph.put(InputAudio(piece, 16_000))
    await h.until(lambda: h.of(SpeechStopped))
    (started,) = h.of(SpeechStarted)
    assert h.capture.interrupts == [Interruption(1, started.t)]
    # Once the new turn is over, it is the reply pending.
    assert conversation.active_reply == 1


# -- AsrNode --


async def test_asr_node_transcribes_a_turn(engine, harnesses, recognizer) -> None:
    voice = np.concatenate([np.zeros(4800, np.float32), speech(engine, LIGHTS), np.zeros(4800, np.float32)])
    conversation, metrics = Conversation("", 10), []
    timer = TurnTimer(metrics.append)
    timer.turn_over(1, 0.0, 0.6)
    conversation.begin_reply(1)
    h = harnesses(AsrNode(recognizer, conversation, timer))
    await h.graph.put(UserStartedSpeaking(1, 0.3, 0.0))
    for piece in chunks(to_pcm16(voice), 960):
        await h.graph.put(UserAudio(1, piece))
    await h.graph.put(UserStoppedSpeaking(1, 2.0, 0.0))
    await h.until(lambda: h.capture.got)
    (transcript,) = h.capture.got
    assert isinstance(transcript, Transcript) and transcript.turn == 1
    assert word_error_rate([LIGHTS], [transcript.text]) <= 0.5, transcript.text
    (event,) = h.of(TranscriptEvent)
    assert (event.turn, event.text) == (1, transcript.text)
    assert conversation.active_reply == 1  # still pending: the LLM answers it next
    timer.first_audio(1, h.graph.clock.now())
    assert metrics[0].asr_ms is not None and metrics[0].asr_ms >= 0


async def test_asr_node_empty_transcript_clears_the_pending_reply(harnesses, recognizer) -> None:
    conversation, metrics = Conversation("", 10), []
    timer = TurnTimer(metrics.append)
    timer.turn_over(2, 0.0, 0.6)
    conversation.begin_reply(2)
    h = harnesses(AsrNode(recognizer, conversation, timer))
    await h.graph.put(UserStartedSpeaking(2, 0.0, 0.0))
    for piece in chunks(bytes(32_000), 960):  # a second of digital silence
        await h.graph.put(UserAudio(2, piece))
    await h.graph.put(UserStoppedSpeaking(2, 1.0, 0.0))
    await h.until(lambda: h.of(TranscriptEvent))
    await asyncio.sleep(0.05)
    assert h.capture.got == []  # nothing to answer
    assert [(e.turn, e.text) for e in h.of(TranscriptEvent)] == [(2, "")]
    assert conversation.active_reply is None
    (m,) = metrics  # the turn is over without a reply
    assert m.turn == 2 and m.asr_ms is not None and m.voice_to_voice_ms is None and m.llm_first_token_ms is None


async def test_asr_node_abandons_a_turn_that_never_ended(engine, harnesses, recognizer) -> None:
    conversation = Conversation("", 10)
    conversation.begin_reply(4)
    h = harnesses(AsrNode(recognizer, conversation, TurnTimer(lambda e: None)))
    await h.graph.put(UserStartedSpeaking(3, 0.0, 0.0))
    for piece in chunks(to_pcm16(speech(engine, "thank you very much")), 960):
        await h.graph.put(UserAudio(3, piece))
    # Turn 3 is dropped without an end; turn 4 gets a session of its own.
    await h.graph.put(UserStartedSpeaking(4, 0.0, 0.0))
    for piece in chunks(to_pcm16(speech(engine, LIGHTS)), 960):
        await h.graph.put(UserAudio(4, piece))
    await h.graph.put(UserStoppedSpeaking(4, 2.0, 0.0))
    await h.until(lambda: h.capture.got)
    (transcript,) = h.capture.got
    assert transcript.turn == 4
    assert word_error_rate([LIGHTS], [transcript.text]) <= 0.5, transcript.text
    assert not {"thank", "much"} & set(normalize_words(transcript.text))


# -- LlmNode --


async def test_llm_node_streams_the_reply_then_ends_it(harnesses) -> None:
    conversation, metrics = Conversation("Be brief.", 10), []
    timer = TurnTimer(metrics.append)
    timer.turn_over(1, 0.0, 0.6)
    timer.transcribed(1, 0.1)
    conversation.begin_reply(1)
    h = harnesses(LlmNode(EchoResponder(), conversation, timer, max_reply_chars=4000))
    await h.graph.put(Transcript(1, "turn on the lights"))
    await h.until(lambda: h.capture.of(ReplyEnd))
    assert h.capture.got == [
        ReplyText(1, "turn "), ReplyText(1, "on "), ReplyText(1, "the "), ReplyText(1, "lights"), ReplyEnd(1, ""),
    ]
    (reply,) = h.of(ReplyEvent)
    assert (reply.turn, reply.text, reply.error) == (1, "turn on the lights", "")
    # The person's words are in the history now; the reply only once it has been heard.
    assert conversation.messages() == [Message("system", "Be brief."), Message("user", "turn on the lights")]
    conversation.reply_heard(1)
    assert conversation.messages()[-1] == Message("assistant", "turn on the lights")
    timer.first_audio(1, 0.5)
    assert metrics[0].llm_first_token_ms is not None  # the first text was marked


async def test_llm_node_cuts_a_reply_at_max_reply_chars(harnesses) -> None:
    conversation = Conversation("", 10)
    conversation.begin_reply(1)
    h = harnesses(LlmNode(EchoResponder(), conversation, TurnTimer(lambda e: None), max_reply_chars=7))
    await h.graph.put(Transcript(1, "turn on the kitchen lights"))
    await h.until(lambda: h.capture.of(ReplyEnd))
    assert h.capture.got == [ReplyText(1, "turn "), ReplyText(1, "on"), ReplyEnd(1, "")]
    assert h.of(ReplyEvent)[0].text == "turn on"
    conversation.reply_heard(1)
    assert conversation.messages()[-1] == Message("assistant", "turn on")


async def test_llm_node_skips_a_transcript_whose_reply_was_cut(harnesses) -> None:
    conversation = Conversation("", 10)
    conversation.begin_reply(1)
    conversation.begin_reply(2)  # the person spoke again while turn 1 was being transcribed
    h = harnesses(LlmNode(EchoResponder(), conversation, TurnTimer(lambda e: None), max_reply_chars=4000))
    await h.graph.put(Transcript(1, "hello there"))
    await h.graph.put(Transcript(2, "what time is it"))
    await h.until(lambda: h.capture.of(ReplyEnd))
    assert {f.turn for f in h.capture.got} == {2}  # turn 1 got no answer
    assert [e.turn for e in h.of(ReplyEvent)] == [2]
    # Both of the person's turns are in the history, in order.
    assert [m.content for m in conversation.messages()] == ["hello there", "what time is it"]


# -- TtsNode --


async def test_tts_node_speaks_the_reply(engine, harnesses) -> None:
    tts = TtsNode(engine, voice=None, style=resolve_style(None), sample_rate=16_000, frame_ms=20)
    h = harnesses(tts)
    await h.graph.put(ReplyText(3, "Sure, I will call "))
    await h.graph.put(ReplyText(3, "your mother on the phone."))
    await h.graph.put(ReplyEnd(3))
    await h.until(lambda: h.capture.of(StreamEnd))
    await asyncio.sleep(0.05)
    frames = h.capture.of(AudioFrame)
    assert frames and all(f.context_id == "reply-3" and f.sample_rate == 16_000 for f in frames)
    assert all(f.samples == 320 for f in frames[:-1]) and 0 < frames[-1].samples <= 320
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert h.capture.got[-1] == StreamEnd("reply-3", "done")
    words = h.capture.of(WordTimestamp)
    assert normalize_words(" ".join(w.word for w in words)) == normalize_words(MOTHER)
    assert all(w.context_id == "reply-3" and w.start < w.end for w in words)
    audio = np.frombuffer(b"".join(f.pcm for f in frames), "<i2").astype(np.float32) / 32768
    heard = transcribe(audio, 16_000)
    assert word_error_rate([MOTHER], [heard]) <= 0.3, heard
    assert tts._stream is None  # the reply's stream is done and let go


async def test_tts_node_interrupt_cancels_the_stream(engine, harnesses) -> None:
    tts = TtsNode(engine, voice=None, style=resolve_style(None), sample_rate=24_000, frame_ms=20)
    h = harnesses(tts, interruptible_capture=True)
    await h.graph.put(ReplyText(4, WEATHER))  # no end: the LLM is still writing
    await h.until(lambda: h.capture.of(AudioFrame))
    stream = tts._stream
    assert stream is not None and not stream.done
    h.graph.interrupt(Interruption(5, h.graph.clock.now()))
    assert stream.done  # cancelled before interrupt() returned
    assert tts._stream is None
    count = len(h.capture.of(AudioFrame))
    await asyncio.sleep(0.5)
    assert len(h.capture.of(AudioFrame)) == count  # not one more frame
    assert not [f for f in h.capture.got if isinstance(f, StreamEnd) and f.context_id == "reply-4"]
    leftover = [t.get_name() for t in asyncio.all_tasks() if t.get_name() in ("voxflow-stream-reply-4", "voxflow-agent-tts-4")]
    assert leftover == []
    # The node goes on: the next reply gets a stream of its own.
    await h.graph.put(ReplyText(6, "Thank you very much."))
    await h.graph.put(ReplyEnd(6))
    await h.until(lambda: h.capture.of(StreamEnd))
    assert h.capture.of(StreamEnd) == [StreamEnd("reply-6", "done")]
    assert {f.context_id for f in h.capture.of(AudioFrame)[count:]} == {"reply-6"}
    assert all(f.sample_rate == 24_000 and f.samples <= 480 for f in h.capture.of(AudioFrame))


async def test_tts_node_closed_right_after_an_interruption_leaves_no_stream(engine) -> None:
    before = asyncio.all_tasks()
    tts = TtsNode(engine, voice=None, style=resolve_style(None), sample_rate=16_000, frame_ms=20)
    h = Harness(tts, interruptible_capture=True)
    try:
        await h.graph.put(ReplyText(8, WEATHER))
        await h.until(lambda: h.capture.of(AudioFrame))
        await h.graph.put(ReplyText(8, " And more."))
        h.graph.interrupt(Interruption(9, h.graph.clock.now()))
    finally:
        await h.aclose()  # at once: the cancelled stream is still unwinding
    assert {t.get_name() for t in asyncio.all_tasks() - before} == set()


async def test_tts_node_interrupt_after_the_text_is_complete_still_cancels_the_stream(engine, harnesses) -> None:
    """The usual barge-in: the LLM finished writing long ago (ReplyEnd is in) and the engine is
    still working through the text while the bot speaks."""
    tts = TtsNode(engine, voice=None, style=resolve_style(None), sample_rate=16_000, frame_ms=20)
    h = harnesses(tts, interruptible_capture=True)
    await h.graph.put(ReplyText(4, " ".join([WEATHER] * 4)))
    await h.graph.put(ReplyEnd(4))
    await h.until(lambda: h.capture.of(AudioFrame))
    await asyncio.sleep(0.05)
    streams = [t for t in asyncio.all_tasks() if t.get_name() == "voxflow-stream-reply-4"]
    assert streams and not streams[0].done()  # still synthesizing
    h.graph.interrupt(Interruption(5, h.graph.clock.now()))
    count = len(h.capture.of(AudioFrame))
    await asyncio.sleep(0.3)
    assert streams[0].done()  # the engine stopped working on the cut reply
    assert len(h.capture.of(AudioFrame)) == count
    assert not [f for f in h.capture.got if isinstance(f, StreamEnd)]
