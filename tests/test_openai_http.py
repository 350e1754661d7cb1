"""`POST /v1/audio/speech` on a live server, driven by the real `openai` SDK as clients use it."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import wave

import av
import httpx
import numpy as np
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from server_harness import run_server
from voxflow.streaming.stream import SynthesisStream

RATE = 24_000
SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs back home."
PARAGRAPH = (
    "Sure, I can help with that. The weather tomorrow looks mild, with a light breeze in the morning "
    "and some sun in the afternoon. If you are heading out, a thin jacket should be enough. "
    "In the evening the clouds return, and there may be a little rain after midnight. "
    "The weekend looks brighter, so it could be a good time for a walk in the park."
)


def client_for(server, api_key: str = "x", **options) -> OpenAI:
    return OpenAI(base_url=server.http + "/v1", api_key=api_key, timeout=120, **options)


def seconds(pcm: bytes) -> float:
    return len(pcm) / 2 / RATE


async def voxflow_tasks() -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("voxflow-"))


def metric(server, name: str, **labels: str) -> float:
    return server.state.metrics.registry.get_sample_value(name, labels) or 0.0


def wait_until_idle(server, timeout: float = 15.0) -> list[str]:
    """Polls until no voxflow task is left and no stream is open; returns the tasks left at the deadline.

    A response is counted as ended (metrics) just after its last byte is sent, so a client can
    see the end of the body slightly before the server's books are closed.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = server.call(voxflow_tasks)
        if (not left and metric(server, "voxflow_active_streams") == 0) or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def test_pcm_streams_as_it_is_synthesized(server):
    done_before = metric(server, "voxflow_streams_total", reason="done")
    arrivals: list[float] = []
    chunks: list[bytes] = []
    synthesizing_at_first_chunk = None
    with client_for(server).audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=PARAGRAPH, response_format="pcm"
    ) as response:
        assert response.headers["content-type"] == "audio/pcm"
        for chunk in response.iter_bytes():
            arrivals.append(time.perf_counter())
            chunks.append(chunk)
            if synthesizing_at_first_chunk is None:
                synthesizing_at_first_chunk = any(n.startswith("voxflow-stream-") for n in server.call(voxflow_tasks))
    pcm = b"".join(chunks)
    # The first audio left while the server was still synthesizing, and much more followed.
    assert synthesizing_at_first_chunk
    assert len(chunks) > 20
    assert arrivals[0] < arrivals[-1]
    assert len(b"".join(chunks[1:])) > 0.9 * len(pcm)
    # About 14 characters a second of speech.
    assert 0.03 < seconds(pcm) / len(PARAGRAPH) < 0.12
    assert len(pcm) % 2 == 0
    samples = np.frombuffer(pcm, "<i2")
    assert np.abs(samples).max() > 3000  # speech, not silence
    assert wait_until_idle(server) == []
    assert metric(server, "voxflow_streams_total", reason="done") == done_before + 1
    assert metric(server, "voxflow_active_streams") == 0


def test_streams_are_counted_in_the_metrics(server):
    frames_before = metric(server, "voxflow_frames_sent_total")
    first_sent_before = metric(server, "voxflow_first_frame_sent_seconds_count")
    audio = client_for(server).audio.speech.create(model="tts-1", voice="echo", input=SENTENCE, response_format="pcm").content
    assert wait_until_idle(server) == []
    # One 20 ms frame per 480 samples at 24 kHz (the last one may be short).
    assert metric(server, "voxflow_frames_sent_total") - frames_before == pytest.approx(seconds(audio) / 0.02, abs=1)
    assert metric(server, "voxflow_first_frame_sent_seconds_count") == first_sent_before + 1


def test_wav_is_a_valid_file(server):
    data = client_for(server).audio.speech.create(
        model="gpt-4o-mini-tts", voice="nova", input=SENTENCE, response_format="wav"
    ).content
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, RATE)
        pcm = w.readframes(10**7)
    assert len(pcm) == len(data) - 44
    assert 2.0 < seconds(pcm) < 8.0


@pytest.mark.parametrize(("response_format", "media_type"), [("mp3", "audio/mpeg"), ("opus", "audio/ogg"), ("aac", "audio/aac"), ("flac", "audio/flac")])
def test_compressed_formats_decode(server, response_format, media_type):
    response = client_for(server).audio.speech.with_raw_response.create(
        model="tts-1", voice="alloy", input=SENTENCE, response_format=response_format
    )
    assert response.headers["content-type"] == media_type
    with av.open(io.BytesIO(response.content)) as container:
        stream = container.streams.audio[0]
        duration = sum(frame.samples for frame in container.decode(stream)) / stream.rate
    assert 2.0 < duration < 8.0


def test_mp3_is_the_default_format(server):
    response = client_for(server).audio.speech.with_raw_response.create(model="tts-1", voice="alloy", input="Hello.")
    assert response.headers["content-type"] == "audio/mpeg"


def test_sse_events_carry_the_audio_and_end_with_done(server):
    events = []
    with client_for(server).audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="coral", input=SENTENCE, response_format="pcm", stream_format="sse"
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line:
                assert line.startswith("data: ")
                events.append(json.loads(line[6:]))
    *deltas, done = events
    assert len(deltas) > 5
    assert {e["type"] for e in deltas} == {"speech.audio.delta"}
    assert done == {"type": "speech.audio.done", "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}}
    pcm = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    plain = client_for(server).audio.speech.create(model="tts-1", voice="coral", input=SENTENCE, response_format="pcm").content
    assert pcm == plain  # same seed, same audio: SSE only changes the wrapping


def test_speed_changes_duration(server):
    client = client_for(server)

    def duration(speed: float) -> float:
        return seconds(client.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCE, response_format="pcm", speed=speed).content)

    normal, fast, slow = duration(1.0), duration(2.0), duration(0.25)
    assert fast < 0.7 * normal
    assert slow > 1.5 * normal


def test_instructions_naming_a_preset_apply_it(server):
    client = client_for(server)

    def speak(**extra) -> bytes:
        return client.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input=SENTENCE, response_format="pcm", **extra).content

    neutral, sad, other = speak(), speak(instructions="Sound sad and tired."), speak(instructions="Talk like a pirate.")
    assert seconds(sad) > 1.08 * seconds(neutral)  # the sad preset speaks at 0.85
    assert other == neutral


def test_voice_objects_and_own_voice_names_are_accepted(server):
    client = client_for(server)
    by_object = client.audio.speech.create(model="tts-1", voice={"id": "alloy"}, input="Hello.", response_format="pcm").content
    by_name = client.audio.speech.create(model="tts-1", voice="en_US-joe-medium", input="Hello.", response_format="pcm").content
    assert len(by_object) > 0
    assert by_object == by_name


@pytest.mark.parametrize(
    ("arguments", "message", "param"),
    [
        ({"input": ""}, "input must not be empty", "input"),
        ({"input": "a" * 5000}, "input is 5000 characters; the maximum is 4096", "input"),
        ({"voice": "bob"}, "unknown voice 'bob'", "voice"),
        ({"response_format": "aiff"}, "unsupported response_format 'aiff'; supported: pcm, wav, mp3, opus, aac, flac", "response_format"),
        ({"speed": 10}, "speed must be between 0.25 and 4.0", "speed"),
        ({"stream_format": "chunks"}, "unsupported stream_format 'chunks'", "stream_format"),
    ],
)
def test_bad_requests_raise_the_sdks_bad_request_error(server, arguments, message, param):
    errors_before = metric(server, "voxflow_errors_total", code="invalid_request")
    request = {"model": "tts-1", "voice": "alloy", "input": "Hello.", **arguments}
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(server).audio.speech.create(**request)
    assert message in caught.value.message
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"
    assert caught.value.code == "invalid_request"
    assert metric(server, "voxflow_errors_total", code="invalid_request") == errors_before + 1


def test_an_oversized_body_is_refused(server):
    r = httpx.post(f"{server.http}/v1/audio/speech", json={"input": "a" * 300_000, "voice": "alloy"}, timeout=60)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "limit_exceeded"


def test_api_keys_are_required_when_configured(engine):
    with run_server(engine, api_keys=("k",)) as keyed:
        r = httpx.post(f"{keyed.http}/v1/audio/speech", json={"input": "Hello.", "voice": "alloy"}, timeout=60)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized"
        # The right key left out of the request, then a wrong one sent.
        for api_key, headers in (("k", {"Authorization": openai.omit}), ("wrong", {})):
            with pytest.raises(openai.AuthenticationError, match="missing or invalid API key"):
                client_for(keyed, api_key=api_key).audio.speech.create(
                    model="tts-1", voice="alloy", input="Hello.", extra_headers=headers
                )
        audio = client_for(keyed, api_key="k").audio.speech.create(model="tts-1", voice="alloy", input="Hello.", response_format="pcm")
        assert len(audio.content) > RATE // 2


def test_rate_limits_answer_429(engine):
    with run_server(engine, requests_per_second=0.01) as limited:
        client = client_for(limited, max_retries=0)
        assert client.audio.speech.create(model="tts-1", voice="alloy", input="Hi.", response_format="pcm").content
        with pytest.raises(openai.RateLimitError):
            client.audio.speech.create(model="tts-1", voice="alloy", input="Hi.", response_format="pcm")


def test_a_draining_server_answers_503(engine):
    with run_server(engine) as draining:
        draining.state.admission.draining = True
        with pytest.raises(openai.InternalServerError) as caught:
            client_for(draining, max_retries=0).audio.speech.create(model="tts-1", voice="alloy", input="Hi.")
        assert caught.value.status_code == 503


def test_a_failure_mid_response_cuts_the_body_off(engine, monkeypatch):
    """After the headers, a broken synthesis must not end the body as if the audio were complete."""
    plan_step = SynthesisStream._plan_step
    steps = 0

    def fail_after_the_first_chunk(self, *args):
        nonlocal steps
        if steps:
            raise RuntimeError("decoder broke")
        planned = plan_step(self, *args)
        steps += not isinstance(planned, tuple)  # a tuple: it waits for more words, no step yet
        return planned

    with run_server(engine) as failing:
        monkeypatch.setattr(SynthesisStream, "_plan_step", fail_after_the_first_chunk)
        received = bytearray()
        with pytest.raises(httpx.RemoteProtocolError):
            with httpx.stream("POST", f"{failing.http}/v1/audio/speech", json={"input": PARAGRAPH, "response_format": "pcm"}, timeout=60) as r:
                assert r.status_code == 200
                for chunk in r.iter_bytes():
                    received += chunk
        assert received  # the first chunk's audio had been sent
        assert wait_until_idle(failing) == []
        assert metric(failing, "voxflow_streams_total", reason="error") == 1
        assert metric(failing, "voxflow_errors_total", code="internal_error") == 1


async def test_the_async_sdk_streams(server):
    client = AsyncOpenAI(base_url=server.http + "/v1", api_key="x", timeout=120)
    chunks = []
    async with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=SENTENCE, response_format="pcm"
    ) as response:
        async for chunk in response.iter_bytes():
            chunks.append(chunk)
    await client.close()
    assert len(chunks) > 5
    assert 2.0 < seconds(b"".join(chunks)) < 8.0


def test_a_client_hanging_up_cancels_the_stream(server):
    cancelled_before = metric(server, "voxflow_streams_total", reason="cancelled")
    with httpx.Client(timeout=60) as http:
        with http.stream(
            "POST", f"{server.http}/v1/audio/speech",
            json={"model": "tts-1", "voice": "alloy", "input": PARAGRAPH * 5, "response_format": "pcm"},
        ) as response:
            assert response.status_code == 200
            chunks = response.iter_raw()  # held: dropping the iterator would already close the connection
            assert next(chunks)
            assert any(n.startswith("voxflow-stream-") for n in server.call(voxflow_tasks))
            assert metric(server, "voxflow_active_streams") == 1
    assert wait_until_idle(server) == []
    assert metric(server, "voxflow_active_streams") == 0
    assert metric(server, "voxflow_streams_total", reason="cancelled") == cancelled_before + 1
