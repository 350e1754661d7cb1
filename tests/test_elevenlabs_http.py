"""ElevenLabs' HTTP text-to-speech endpoints on a live server, driven by the clients our users
run, unmodified but for their base URL: ElevenLabs' Python SDK (2.78), Pipecat's
ElevenLabsHttpTTSService (1.14) in a real pipeline, and LiveKit's elevenlabs.TTS (1.8.9)
synthesize().

Audio must decode to the length of the same text spoken as PCM (codecs pad it by a few tens of
ms), and every word a client rebuilds from the alignment must land within one 20 ms frame of
the time the server's engine spoke it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import time
from dataclasses import dataclass, field

import aiohttp
import av
import httpx
import pytest
from elevenlabs import ElevenLabs
from elevenlabs.core.api_error import ApiError
from elevenlabs.errors.unprocessable_entity_error import UnprocessableEntityError
from livekit.agents import APIConnectOptions
from livekit.plugins import elevenlabs as livekit_elevenlabs
from pipecat.frames.frames import LLMFullResponseEndFrame, LLMFullResponseStartFrame, LLMTextFrame
from pipecat.services.elevenlabs.tts import ElevenLabsHttpTTSService

from pipecat_runner import RecordsWordTimes, assert_words_match, run_pipeline
from server_harness import RunningServer, run_server, shrink_server_send_buffers, small_buffer_socket
from voxflow.transports.protocols import elevenlabs_http_protocol
from voxflow.transports.protocols.elevenlabs_protocol import OUTPUT_FORMATS

VOICE_ID = "21m00Tcm4TlvDq8ikWCM"  # ElevenLabs' "Rachel": not a voice here, so the default voice speaks
SENTENCE = "Hello there, how are you today?"
REPLY = (
    "Sure, I can help with that. The weather tomorrow looks mild, with a light breeze in the "
    "morning and some sun in the afternoon. If you are heading out, a thin jacket should be enough."
)
FRAME_S = 0.020
CODEC_PADDING_S = 0.1
TIMEOUT = 180  # generous: the suite shares two cores


def client_for(server: RunningServer, api_key: str = "unused-without-keys") -> ElevenLabs:
    return ElevenLabs(base_url=server.http, api_key=api_key, timeout=TIMEOUT)


def metric(server: RunningServer, name: str, **labels: str) -> float:
    return server.state.metrics.registry.get_sample_value(name, labels) or 0.0


async def _voxflow_tasks() -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("voxflow-"))


def wait_until_idle(server: RunningServer, timeout: float = 30.0) -> list[str]:
    """Polls until no voxflow task is left and no response streams; the tasks left at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        left = server.call(_voxflow_tasks)
        if (not left and metric(server, "voxflow_active_streams") == 0) or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def decoded_seconds(data: bytes, output_format: str) -> float:
    fmt = OUTPUT_FORMATS[output_format]
    if output_format.startswith("pcm_"):
        return len(data) / 2 / fmt.sample_rate
    raw = {"ulaw_8000": "mulaw", "alaw_8000": "alaw"}.get(output_format)
    with av.open(io.BytesIO(data), format=raw, options={"sample_rate": "8000"} if raw else {}) as container:
        stream = container.streams.audio[0]
        assert stream.rate == fmt.sample_rate
        return sum(frame.samples for frame in container.decode(stream)) / stream.rate


def assert_same_length(seconds: float, pcm_seconds: float) -> None:
    assert pcm_seconds - FRAME_S <= seconds <= pcm_seconds + CODEC_PADDING_S, (seconds, pcm_seconds)


def pcm_seconds_of(server: RunningServer, text: str, **body) -> float:
    audio = b"".join(client_for(server).text_to_speech.convert(VOICE_ID, text=text, output_format="pcm_24000", **body))
    return len(audio) / 2 / 24000


@dataclass
class Spoken:
    """What one timestamped response's body writer was handed: the truth the clients must rebuild."""

    writer: object
    words: list[tuple[str, float]] = field(default_factory=list)

    @property
    def audio_end(self) -> float:
        return self.writer._seconds  # the audio it wrote, in seconds


@pytest.fixture
def spoken(monkeypatch) -> dict[int, Spoken]:
    """The engine's word timestamps (in the client's own text) and audio length per timestamped
    response, in order."""
    responses: dict[int, Spoken] = {}
    add_word = elevenlabs_http_protocol._Timed.add_word

    def spy_word(self, word, start, end, written=None):
        responses.setdefault(id(self), Spoken(self)).words.append((written or word, start))
        add_word(self, word, start, end, written)

    monkeypatch.setattr(elevenlabs_http_protocol._Timed, "add_word", spy_word)
    return responses


def words_of(characters: list[str], starts: list[float]) -> list[tuple[str, float]]:
    """Words and their start times from a character alignment, cut at spaces."""
    words, current, start = [], "", 0.0
    for char, at in zip([*characters, " "], [*starts, 0.0]):
        if char == " ":
            if current:
                words.append((current, start))
            current = ""
        else:
            start = at if not current else start
            current += char
    return words


# -- ElevenLabs' SDK ----------------------------------------------------------------------------


def test_convert_gives_mp3_by_default_of_the_pcm_length(server):
    audio = b"".join(client_for(server).text_to_speech.convert(VOICE_ID, text=SENTENCE, model_id="eleven_multilingual_v2"))
    assert_same_length(decoded_seconds(audio, "mp3_44100_128"), pcm_seconds_of(server, SENTENCE))
    assert wait_until_idle(server) == []


def test_stream_sends_audio_while_it_is_synthesized(server):
    with client_for(server).text_to_speech.with_raw_response.stream(
        VOICE_ID, text=REPLY, output_format="pcm_24000", optimize_streaming_latency=3
    ) as response:
        assert response.headers["content-type"] == "audio/pcm"
        chunks, synthesizing_at_first = [], None
        for chunk in response.data:
            chunks.append(chunk)
            if synthesizing_at_first is None:
                synthesizing_at_first = any(n.startswith("voxflow-stream-") for n in server.call(_voxflow_tasks))
    assert synthesizing_at_first
    assert len(chunks) > 20
    assert len(b"".join(chunks)) / 2 / 24000 > 5
    assert wait_until_idle(server) == []


@pytest.mark.parametrize("output_format", list(OUTPUT_FORMATS))
def test_every_output_format_decodes_to_the_pcm_length(server, output_format):
    response = httpx.post(
        f"{server.http}/v1/text-to-speech/{VOICE_ID}/stream", params={"output_format": output_format},
        json={"text": "Hello there."}, timeout=TIMEOUT,
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == OUTPUT_FORMATS[output_format].audio.media_type
    assert_same_length(decoded_seconds(response.content, output_format), pcm_seconds_of(server, "Hello there."))


def test_convert_with_timestamps_aligns_the_text_with_the_audio(server, spoken):
    result = client_for(server).text_to_speech.convert_with_timestamps(
        VOICE_ID, text=SENTENCE, output_format="pcm_24000", seed=7, voice_settings={"stability": 0.5, "speed": 1.0}
    )
    pcm_seconds = len(base64.b64decode(result.audio_base_64)) / 2 / 24000
    assert result.normalized_alignment == result.alignment
    alignment = result.alignment
    assert "".join(alignment.characters) == SENTENCE
    [truth] = spoken.values()
    assert_words_match(words_of(alignment.characters, alignment.character_start_times_seconds), truth.words)
    assert alignment.character_end_times_seconds[-1] == pytest.approx(pcm_seconds, abs=0.001)


def test_alignment_has_the_written_text_and_normalized_alignment_the_spoken(server):
    written = "Sure, **this** is [the link](https://example.com/a) you asked for."
    result = client_for(server).text_to_speech.convert_with_timestamps(VOICE_ID, text=written, output_format="pcm_24000")
    assert "".join(result.alignment.characters) == written
    spoken = "".join(result.normalized_alignment.characters)
    assert spoken == "Sure, this is the link you asked for."
    # Word for word, the two start together.
    written_words = words_of(result.alignment.characters, result.alignment.character_start_times_seconds)
    spoken_words = words_of(result.normalized_alignment.characters, result.normalized_alignment.character_start_times_seconds)
    assert [t for _, t in written_words] == [t for _, t in spoken_words]


def test_stream_with_timestamps_chunks_share_the_responses_clock(server, spoken):
    # Joined as ElevenLabs' own example for this endpoint joins them: times appended as they are.
    characters, starts, audio, chunks = [], [], b"", 0
    for chunk in client_for(server).text_to_speech.stream_with_timestamps(VOICE_ID, text=REPLY, output_format="mp3_44100_128"):
        chunks += 1
        audio += base64.b64decode(chunk.audio_base_64)
        if chunk.alignment is not None:
            assert chunk.normalized_alignment == chunk.alignment
            characters += chunk.alignment.characters
            starts += chunk.alignment.character_start_times_seconds
    assert chunks > 20
    assert "".join(characters) == REPLY
    [truth] = spoken.values()
    assert_words_match(words_of(characters, starts), truth.words)
    assert_same_length(decoded_seconds(audio, "mp3_44100_128"), truth.audio_end)


def test_the_same_seed_gives_the_same_speech_and_voice_settings_apply(server):
    tts = client_for(server).text_to_speech

    def speak(**body) -> tuple[bytes, list[float]]:
        result = tts.convert_with_timestamps(VOICE_ID, text=SENTENCE, output_format="pcm_16000", **body)
        return base64.b64decode(result.audio_base_64), result.alignment.character_start_times_seconds

    first, again, other = speak(seed=11), speak(seed=11), speak(seed=12)
    assert first == again
    assert other[0] != first[0]
    # ElevenLabs' speed range, 0.7 to 1.2, is spoken as it is.
    slow, fast = speak(voice_settings={"speed": 0.7}), speak(voice_settings={"speed": 1.2})
    assert len(fast[0]) < 0.75 * len(slow[0])
    assert fast[1][-1] < 0.75 * slow[1][-1]


# -- errors -------------------------------------------------------------------------------------


def detail(error: ApiError) -> dict:
    return error.body["detail"]


def test_unknown_formats_and_bad_bodies_are_422_in_elevenlabs_shape(server):
    tts = client_for(server).text_to_speech
    with pytest.raises(UnprocessableEntityError) as caught:
        tts.convert_with_timestamps(VOICE_ID, text="Hi.", output_format="flac_44100")
    assert detail(caught.value)["code"] == detail(caught.value)["status"] == "unsupported_output_format"
    assert detail(caught.value)["param"] == "output_format"
    assert detail(caught.value)["message"].startswith("unsupported output_format 'flac_44100'; supported: pcm_8000")
    with pytest.raises(UnprocessableEntityError) as caught:
        list(tts.stream(VOICE_ID, text=" "))
    assert detail(caught.value) == {
        "type": "validation_error", "code": "invalid_parameters", "status": "invalid_parameters",
        "message": "text must not be empty", "param": "text",
    }
    r = httpx.post(f"{server.http}/v1/text-to-speech/{VOICE_ID}/stream/with-timestamps", json={"text": "Hi", "seed": -3}, timeout=60)
    assert r.status_code == 422 and r.json()["detail"]["param"] == "seed"
    r = httpx.post(f"{server.http}/v1/text-to-speech/{VOICE_ID}?optimize_streaming_latency=9", json={"text": "Hi"}, timeout=60)
    assert r.status_code == 422 and r.json()["detail"]["param"] == "optimize_streaming_latency"


def test_text_and_body_limits(server):
    limit = server.state.engine.config.max_text_chars
    with pytest.raises(ApiError) as caught:
        list(client_for(server).text_to_speech.convert(VOICE_ID, text="a" * (limit + 1)))
    assert caught.value.status_code == 400
    assert detail(caught.value)["code"] == "max_character_limit_exceeded"
    r = httpx.post(f"{server.http}/v1/text-to-speech/{VOICE_ID}", content=b'{"text": "' + b"a" * 8 * limit + b'"}', timeout=60)
    assert r.status_code == 413 and r.json()["detail"]["code"] == "request_too_large"
    assert wait_until_idle(server) == []


def test_keys_are_checked_as_on_the_websocket(engine):
    with run_server(engine, api_keys=("k",)) as keyed:
        for key in ("wrong", None):
            headers = {"xi-api-key": key} if key else {}
            r = httpx.post(f"{keyed.http}/v1/text-to-speech/{VOICE_ID}/stream", json={"text": "Hi."}, headers=headers, timeout=60)
            assert r.status_code == 401
            assert r.json()["detail"]["code"] == "invalid_api_key"
            assert "missing or invalid API key" in r.json()["detail"]["message"]
        with pytest.raises(ApiError) as caught:
            list(client_for(keyed, "wrong").text_to_speech.convert(VOICE_ID, text="Hi."))
        assert caught.value.status_code == 401
        assert b"".join(client_for(keyed, "k").text_to_speech.convert(VOICE_ID, text="Hi.", output_format="pcm_16000"))
        r = httpx.post(
            f"{keyed.http}/v1/text-to-speech/{VOICE_ID}", params={"output_format": "pcm_16000"}, json={"text": "Hi."},
            headers={"Authorization": "Bearer k"}, timeout=60,
        )
        assert r.status_code == 200 and len(r.content) > 16000 // 2


def test_rate_limits_answer_429(engine):
    with run_server(engine, requests_per_second=0.01) as limited:
        tts = client_for(limited).text_to_speech
        assert b"".join(tts.convert(VOICE_ID, text="Hi.", output_format="pcm_16000"))
        with pytest.raises(ApiError) as caught:
            list(tts.convert(VOICE_ID, text="Hi.", output_format="pcm_16000"))
        assert caught.value.status_code == 429 and detail(caught.value)["code"] == "rate_limit_exceeded"


def test_places_in_use_answer_429_and_a_draining_server_503(engine):
    with run_server(engine, max_http_streams=1) as busy:
        url = f"{busy.http}/v1/text-to-speech/{VOICE_ID}/stream"
        with httpx.stream("POST", url, json={"text": REPLY}, params={"output_format": "pcm_16000"}, timeout=60) as held:
            assert held.status_code == 200
            r = httpx.post(url, json={"text": "Hi."}, timeout=60)
            assert r.status_code == 429
            assert r.json()["detail"]["code"] == "concurrent_limit_exceeded"
        assert wait_until_idle(busy) == []
        busy.state.admission.draining = True
        r = httpx.post(url, json={"text": "Hi."}, timeout=60)
        assert r.status_code == 503 and r.json()["detail"]["code"] == "service_unavailable"


# -- hanging up, and clients that stop reading --------------------------------------------------


def test_a_client_hanging_up_cancels_the_synthesis(server):
    cancelled_before = metric(server, "voxflow_streams_total", reason="cancelled")
    with httpx.Client(timeout=60) as http:
        with http.stream(
            "POST", f"{server.http}/v1/text-to-speech/{VOICE_ID}/stream/with-timestamps", json={"text": REPLY * 5}
        ) as response:
            assert response.status_code == 200
            lines = response.iter_lines()  # held: dropping the iterator would already close the connection
            assert json.loads(next(lines))["audio_base64"]
            assert any(n.startswith("voxflow-stream-") for n in server.call(_voxflow_tasks))
    assert wait_until_idle(server) == []
    assert metric(server, "voxflow_streams_total", reason="cancelled") == cancelled_before + 1


def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout(engine):
    with run_server(engine, send_timeout_seconds=1.0) as srv:
        body = json.dumps({"text": REPLY * 5}).encode()
        head = (
            f"POST /v1/text-to-speech/{VOICE_ID}/stream?output_format=pcm_48000 HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock = small_buffer_socket(srv)
        try:
            sock.setblocking(True)
            sock.sendall(head + body)
            deadline = time.monotonic() + 30
            while metric(srv, "voxflow_active_streams") == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            asyncio.run(shrink_server_send_buffers(srv))
            assert wait_until_idle(srv) == []  # never read: dropped, its stream closed
            assert metric(srv, "voxflow_errors_total", code="slow_consumer") == 1
            assert metric(srv, "voxflow_streams_total", reason="error") == 1
            assert srv.state.admission.counts()["http_stream"] == 0
        finally:
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()


# -- Pipecat ------------------------------------------------------------------------------------


class _TimedElevenLabsHttp(RecordsWordTimes, ElevenLabsHttpTTSService):
    pass


async def test_pipecat_http_service_speaks_a_reply_sentence_by_sentence(server, spoken):
    async with aiohttp.ClientSession() as session:
        tts = _TimedElevenLabsHttp(
            api_key="unused-without-keys", aiohttp_session=session, base_url=server.http,
            settings=ElevenLabsHttpTTSService.Settings(voice=VOICE_ID, model="eleven_flash_v2_5"),
            # A slow machine must not end the turn's audio between two sentences' requests.
            stop_frame_timeout_s=30,
        )
        # As an LLM replies: the service cuts the reply into sentences, one request each.
        reply = [LLMFullResponseStartFrame(), *(LLMTextFrame(t + " ") for t in REPLY.split(" ")), LLMFullResponseEndFrame()]
        collector = await run_pipeline(tts, reply, 24000, TIMEOUT, until=LLMFullResponseEndFrame)

    responses = list(spoken.values())
    assert len(responses) == 3  # one request a sentence
    truth, offset = [], 0.0
    for response in responses:
        truth += [(w, start + offset) for w, start in response.words]
        offset += response.audio_end
    assert len(collector.audio) / 2 / 24000 == pytest.approx(offset, abs=0.001)
    assert_words_match(tts.word_times, truth)
    assert collector.words == REPLY.split()


# -- LiveKit ------------------------------------------------------------------------------------


async def test_livekit_synthesize_decodes_its_default_mp3(server):
    async with aiohttp.ClientSession() as session:
        tts = livekit_elevenlabs.TTS(api_key="unused-without-keys", base_url=f"{server.http}/v1", voice_id=VOICE_ID, http_session=session)
        chunks = []
        async with asyncio.timeout(TIMEOUT):
            async with tts.synthesize(REPLY, conn_options=APIConnectOptions(max_retry=0, timeout=60)) as stream:
                async for event in stream:
                    chunks.append(event.frame.data.tobytes())
        await tts.aclose()
    assert tts.sample_rate == 22050  # mp3_22050_32, the plugin's default encoding
    seconds = len(b"".join(chunks)) / 2 / 22050
    assert_same_length(seconds, await asyncio.to_thread(pcm_seconds_of, server, REPLY))
