"""Speech recognition plug-ins: streaming pocketsphinx, an OpenAI-compatible server, the factory."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
import soxr

from openai_transcription_double import TranscriptionDouble, transcription_double
from server_harness import free_port
from speech import normalize_words, word_error_rate
from voxflow.agent.asr import RecognitionError, RecognitionSession
from voxflow.agent.asr_openai import OpenAITranscriber
from voxflow.agent.asr_pocketsphinx import PocketsphinxRecognizer
from voxflow.agent.recognizers import recognizer_from_config
from voxflow.config import AgentConfig
from voxflow.errors import InvalidRequest
from voxflow.streaming.engine import Engine

RATE = 16_000
FRAME_BYTES = RATE * 2 * 30 // 1000
LIGHTS = "please turn on the kitchen lights"
CALL = "call my mother on the phone please"
TIMER = "set a timer for ten minutes"


@pytest.fixture(scope="module")
def speech(engine: Engine) -> dict[str, bytes]:
    """16 kHz PCM16 of each phrase, with the 300 ms of silence around it a turn detector keeps."""
    silence = np.zeros(RATE * 3 // 10, dtype=np.float32)
    phrases = {}
    for text in (LIGHTS, CALL, TIMER):
        utterance = engine.synthesize(text)
        audio = soxr.resample(np.asarray(utterance.audio, dtype=np.float32), utterance.sample_rate, RATE)
        audio = np.concatenate([silence, audio, silence])
        phrases[text] = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    return phrases


@pytest.fixture(scope="module")
def pocketsphinx() -> Iterator[PocketsphinxRecognizer]:
    recognizer = PocketsphinxRecognizer()
    yield recognizer
    asyncio.run(recognizer.aclose())


@pytest.fixture
def double() -> Iterator[TranscriptionDouble]:
    with transcription_double() as running:
        yield running


def chunks(pcm: bytes, size: int) -> Iterator[bytes]:
    return (pcm[i : i + size] for i in range(0, len(pcm), size))


async def recognize(session: RecognitionSession, pcm: bytes, chunk_bytes: int = FRAME_BYTES, pace: float | None = None) -> str:
    """Feed `pcm` in chunks, sleeping `pace` seconds after each (None: no pause), then finish."""
    for chunk in chunks(pcm, chunk_bytes):
        await session.feed(chunk)
        if pace is not None:
            await asyncio.sleep(pace)
    return await session.finish()


# --- pocketsphinx -------------------------------------------------------------------------


async def test_pocketsphinx_transcribes_frames(pocketsphinx: PocketsphinxRecognizer, speech: dict[str, bytes]) -> None:
    text = await recognize(pocketsphinx.open_session(), speech[LIGHTS])
    assert word_error_rate([LIGHTS], [text]) <= 0.5, text
    assert text == text.lower()


async def test_pocketsphinx_ignores_chunk_boundaries(pocketsphinx: PocketsphinxRecognizer, speech: dict[str, bytes]) -> None:
    framed = await recognize(pocketsphinx.open_session(), speech[CALL])
    odd = await recognize(pocketsphinx.open_session(), speech[CALL], chunk_bytes=333 * 2)
    whole = await recognize(pocketsphinx.open_session(), speech[CALL], chunk_bytes=len(speech[CALL]))
    assert word_error_rate([CALL], [framed]) <= 0.5, framed
    assert odd == framed == whole


async def test_pocketsphinx_empty_and_noise(pocketsphinx: PocketsphinxRecognizer) -> None:
    assert await pocketsphinx.open_session().finish() == ""
    noise = (np.random.default_rng(7).standard_normal(2 * RATE) * 100).astype("<i2").tobytes()  # about -50 dBFS
    text = await recognize(pocketsphinx.open_session(), noise)
    assert len(normalize_words(text)) <= 1, text


async def test_pocketsphinx_abandoned_session_returns_its_decoder(speech: dict[str, bytes]) -> None:
    recognizer = PocketsphinxRecognizer()
    try:
        await recognizer.warm_up()
        assert (await recognizer.stats()).idle_decoders == 1
        abandoned = recognizer.open_session()
        for chunk in chunks(speech[TIMER][: len(speech[TIMER]) // 2], FRAME_BYTES):
            await abandoned.feed(chunk)
        assert (await recognizer.stats()).open_sessions == 1  # its utterance has started
        await abandoned.aclose()
        await abandoned.aclose()
        stats = await recognizer.stats()
        assert (stats.idle_decoders, stats.open_sessions) == (1, 0)
        with pytest.raises(RecognitionError):
            await abandoned.feed(speech[TIMER][:FRAME_BYTES])
        text = await recognize(recognizer.open_session(), speech[LIGHTS])
        assert word_error_rate([LIGHTS], [text]) <= 0.5, text
        # One decoder served both sessions: a second one would be idle now too.
        assert (await recognizer.stats()).idle_decoders == 1
    finally:
        await recognizer.aclose()
    with pytest.raises(RecognitionError):
        await recognizer.stats()
    with pytest.raises(RecognitionError):
        recognizer.open_session()


async def test_pocketsphinx_decodes_in_a_process_of_its_own(pocketsphinx: PocketsphinxRecognizer) -> None:
    # pocketsphinx holds the GIL while it works: in this process it would pause the event loop.
    assert (await pocketsphinx.stats()).pid != os.getpid()


async def test_pocketsphinx_cancelled_finish_leaves_no_decoder_held(pocketsphinx: PocketsphinxRecognizer, speech: dict[str, bytes]) -> None:
    session = pocketsphinx.open_session()
    for chunk in chunks(speech[CALL], FRAME_BYTES):
        await session.feed(chunk)
    finishing = asyncio.create_task(session.finish())
    await asyncio.sleep(0)
    finishing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await finishing
    assert (await pocketsphinx.stats()).open_sessions == 0


async def test_pocketsphinx_a_dead_worker_fails_its_sessions_and_is_replaced(speech: dict[str, bytes]) -> None:
    recognizer = PocketsphinxRecognizer()
    try:
        interrupted = recognizer.open_session()
        for chunk in chunks(speech[TIMER][: len(speech[TIMER]) // 2], FRAME_BYTES):
            await interrupted.feed(chunk)
        first = await recognizer.stats()
        os.kill(first.pid, signal.SIGKILL)
        with pytest.raises(RecognitionError):
            for chunk in chunks(speech[TIMER][len(speech[TIMER]) // 2 :], FRAME_BYTES):
                await interrupted.feed(chunk)
            await interrupted.finish()
        # The next session starts a new worker, which knows nothing of the interrupted one.
        text = await recognize(recognizer.open_session(), speech[LIGHTS])
        assert word_error_rate([LIGHTS], [text]) <= 0.5, text
        second = await recognizer.stats()
        assert second.pid != first.pid and second.open_sessions == 0
    finally:
        await recognizer.aclose()


async def test_pocketsphinx_sessions_run_concurrently(pocketsphinx: PocketsphinxRecognizer, speech: dict[str, bytes]) -> None:
    alone = [await recognize(pocketsphinx.open_session(), speech[t]) for t in (LIGHTS, TIMER)]
    together = await asyncio.gather(*(recognize(pocketsphinx.open_session(), speech[t], pace=0) for t in (LIGHTS, TIMER)))
    assert together == alone
    assert word_error_rate([LIGHTS, TIMER], together) <= 0.5, together


async def test_pocketsphinx_ignores_audio_past_max_seconds(speech: dict[str, bytes]) -> None:
    first = speech[CALL]
    recognizer = PocketsphinxRecognizer(max_seconds=len(first) / 2 / RATE)
    try:
        bounded = await recognize(recognizer.open_session(), first + speech[TIMER])
        assert bounded == await recognize(recognizer.open_session(), first)
        assert "timer" not in bounded
    finally:
        await recognizer.aclose()


async def test_pocketsphinx_finish_only_ends_the_utterance(pocketsphinx: PocketsphinxRecognizer, speech: dict[str, bytes]) -> None:
    async def finish_seconds(pace: float | None) -> float:
        session = pocketsphinx.open_session()
        for chunk in chunks(speech[LIGHTS], FRAME_BYTES):
            await session.feed(chunk)
            if pace is not None:
                await asyncio.sleep(pace)
        started = time.perf_counter()
        await session.finish()
        return time.perf_counter() - started

    await pocketsphinx.warm_up()
    # Frames at three times a speaker's pace still leave decoding time to keep up, while audio
    # fed all at once leaves finish() the whole utterance to decode.
    assert await finish_seconds(pace=0.01) < await finish_seconds(pace=None) / 3


def test_pocketsphinx_worker_exits_when_its_parent_is_killed() -> None:
    program = (
        "import asyncio\n"
        "from voxflow.agent.asr_pocketsphinx import PocketsphinxRecognizer\n"
        "async def main():\n"
        "    recognizer = PocketsphinxRecognizer()\n"
        "    print((await recognizer.stats()).pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait(timeout=30)
    deadline = time.monotonic() + 30  # a bound on a hang: the worker exits within milliseconds
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the recognition worker outlived its killed parent")


# --- OpenAI-compatible server -------------------------------------------------------------


async def test_openai_transcribes_through_the_server(double: TranscriptionDouble, speech: dict[str, bytes]) -> None:
    transcriber = OpenAITranscriber(base_url=double.base_url, model="whisper-large-v3", api_key="test-key")
    try:
        text = await recognize(transcriber.open_session(), speech[LIGHTS])
    finally:
        await transcriber.aclose()
    assert word_error_rate([LIGHTS], [text]) <= 0.5, text
    [request] = double.requests
    assert request.model == "whisper-large-v3"
    assert request.authorization == "Bearer test-key"
    assert (request.rate, request.channels, request.sample_width) == (RATE, 1, 2)
    assert request.duration == pytest.approx(len(speech[LIGHTS]) / 2 / RATE)


async def test_openai_uploads_at_most_max_seconds(double: TranscriptionDouble, speech: dict[str, bytes]) -> None:
    transcriber = OpenAITranscriber(base_url=double.base_url, api_key="k", max_seconds=1.0)
    try:
        await recognize(transcriber.open_session(), speech[LIGHTS])
        assert await transcriber.open_session().finish() == ""  # nothing to upload
    finally:
        await transcriber.aclose()
    [request] = double.requests
    assert request.duration == pytest.approx(1.0)


async def test_openai_server_error_is_a_recognition_error(double: TranscriptionDouble, speech: dict[str, bytes]) -> None:
    double.answer_error(500, "model crashed")
    transcriber = OpenAITranscriber(base_url=double.base_url, api_key="k")
    try:
        with pytest.raises(RecognitionError, match="HTTP 500.*model crashed") as caught:
            await recognize(transcriber.open_session(), speech[LIGHTS])
    finally:
        await transcriber.aclose()
    assert caught.value.code == "asr_error"
    assert len(double.requests) == 1  # no retries


async def test_openai_unreachable_server_is_a_recognition_error(speech: dict[str, bytes]) -> None:
    transcriber = OpenAITranscriber(base_url=f"http://127.0.0.1:{free_port()}/v1", api_key="k")
    try:
        with pytest.raises(RecognitionError, match="cannot reach"):
            await recognize(transcriber.open_session(), speech[LIGHTS])
    finally:
        await transcriber.aclose()


async def test_openai_stalled_server_times_out(double: TranscriptionDouble, speech: dict[str, bytes]) -> None:
    double.stall()
    transcriber = OpenAITranscriber(base_url=double.base_url, api_key="k", timeout=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(RecognitionError, match="within 0.5 s"):
            await recognize(transcriber.open_session(), speech[LIGHTS])
    finally:
        await transcriber.aclose()
    assert time.monotonic() - started < 2.0
    assert len(double.requests) == 1


async def test_openai_abandoned_session_uploads_nothing(double: TranscriptionDouble, speech: dict[str, bytes]) -> None:
    transcriber = OpenAITranscriber(base_url=double.base_url, api_key="k")
    try:
        session = transcriber.open_session()
        await session.feed(speech[LIGHTS])
        await session.aclose()
        with pytest.raises(RecognitionError):
            await session.finish()
    finally:
        await transcriber.aclose()
    assert double.requests == []


# --- configuration ------------------------------------------------------------------------


async def test_from_config_picks_the_recognizer(monkeypatch: pytest.MonkeyPatch, double: TranscriptionDouble, speech: dict[str, bytes]) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    local = recognizer_from_config(AgentConfig(asr="openai", asr_base_url=double.base_url, asr_model="tiny"))
    assert isinstance(local, OpenAITranscriber)
    try:
        await recognize(local.open_session(), speech[LIGHTS])
    finally:
        await local.aclose()
    assert (double.requests[0].model, double.requests[0].authorization) == ("tiny", "Bearer not-needed")

    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    from_env = recognizer_from_config(AgentConfig(asr="openai", asr_base_url=double.base_url))
    try:
        await recognize(from_env.open_session(), speech[LIGHTS])
    finally:
        await from_env.aclose()
    assert double.requests[1].authorization == "Bearer from-env"

    assert isinstance(recognizer_from_config(AgentConfig()), PocketsphinxRecognizer)


def test_from_config_rejects_what_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidRequest, match="kaldi"):
        recognizer_from_config(AgentConfig(asr="kaldi"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(RecognitionError) as caught:
        recognizer_from_config(AgentConfig(asr="openai"))
    assert caught.value.code == "asr_not_configured"


def test_openai_choice_does_not_load_pocketsphinx() -> None:
    probe = (
        "import sys\n"
        "from voxflow.agent.recognizers import recognizer_from_config\n"
        "from voxflow.config import AgentConfig\n"
        "recognizer_from_config(AgentConfig(asr='openai', asr_base_url='http://127.0.0.1:9/v1'))\n"
        "assert 'pocketsphinx' not in sys.modules, 'pocketsphinx was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
