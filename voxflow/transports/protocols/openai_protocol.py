"""OpenAI's speech API (`POST /v1/audio/speech`) as plain data and functions.

Request validation, the mapping of OpenAI's knobs onto voxflow's (voices, speed, instructions),
audio encoders and SSE events live here; `openai_http` only moves bytes.

Mapping rules (see docs/compatibility.md):
- voice: an alias from `ServerConfig.voice_aliases`, else one of this server's voices, else an
  OpenAI voice name, which speaks with the default voice. `{"id": NAME}` works like NAME.
- speed: OpenAI's 0.25-4.0 is accepted; voxflow renders 0.5-2.0, so the value is clamped.
- instructions: if they name a style preset (happy, sad, serious, calm, neutral) that preset is
  used, and the requested speed multiplies the preset's own; any other text is ignored.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

import av
import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from ...errors import InvalidRequest, VoxflowError
from ...voices.styles import PRESETS, SPEED_RANGE, Style
from ..core.http import error_body, error_status

SAMPLE_RATE = 24_000  # OpenAI's rate for every format; pcm clients assume it without a header
MAX_INPUT_CHARS = 4096
OPENAI_SPEED_RANGE = (0.25, 4.0)
OPENAI_VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse", "marin", "cedar"}
)
STREAM_FORMATS = ("audio", "sse")


class SpeechParamError(InvalidRequest):
    """A 400 that names the offending body field, as OpenAI's errors do."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class SpeechBody(BaseModel):
    """The JSON body as sent; values are checked and mapped by `speech_request`."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # any model name is accepted; there is one engine
    input: str
    voice: str | dict[str, str] | None = None
    instructions: str | None = None
    response_format: str = "mp3"
    speed: float = 1.0
    stream_format: str = "audio"


# -- audio encoders -------------------------------------------------------------------------


class Encoder(Protocol):
    """Mono s16le PCM in, bytes of the response format out, as soon as they exist."""

    def encode(self, pcm: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class PcmEncoder:
    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate

    def encode(self, pcm: bytes) -> bytes:
        return pcm

    def finish(self) -> bytes:
        return b""


_UNKNOWN_SIZE = 0xFFFFFFFF


def streaming_wav_header(sample_rate: int, channels: int = 1, sample_bytes: int = 2) -> bytes:
    """A PCM WAV header for audio of unknown length.

    The RIFF and data sizes are the largest values the fields hold, which readers take as
    "until the end of the stream", the usual convention of servers that stream WAV.
    """
    block_align = channels * sample_bytes
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, sample_rate * block_align, block_align, 8 * sample_bytes)
    return (
        b"RIFF" + struct.pack("<I", _UNKNOWN_SIZE) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"data" + struct.pack("<I", _UNKNOWN_SIZE)
    )


class WavEncoder:
    def __init__(self, sample_rate: int) -> None:
        self._header: bytes | None = streaming_wav_header(sample_rate)

    def _take_header(self) -> bytes:
        header, self._header = self._header or b"", None
        return header

    def encode(self, pcm: bytes) -> bytes:
        return self._take_header() + pcm

    def finish(self) -> bytes:
        # Text with nothing to speak still yields a readable (empty) file.
        return self._take_header()


class _Collector:
    """A write-only file for the muxer; what it wrote is taken after each packet."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


class AvEncoder:
    """A codec in a container through FFmpeg (PyAV), written to a non-seekable sink.

    Output that is not seekable makes the muxers write each packet (or page) as it is ready
    instead of holding the file back for a seek-and-patch at the end.
    """

    def __init__(self, sample_rate: int, *, container: str, codec: str, options: dict[str, str]) -> None:
        self.sample_rate = sample_rate
        self._sink = _Collector()
        self._container = av.open(self._sink, "w", format=container, container_options=options)
        self._stream = self._container.add_stream(codec, rate=sample_rate, layout="mono")

    def _mux(self, frame: av.AudioFrame | None) -> bytes:
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        return self._sink.take()

    def encode(self, pcm: bytes) -> bytes:
        samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        return self._mux(frame)

    def finish(self) -> bytes:
        data = self._mux(None)
        self._container.close()
        return data + self._sink.take()


@dataclass(frozen=True)
class AudioFormat:
    name: str
    media_type: str
    encoder: Callable[[int], Encoder]  # sample rate -> a fresh encoder


def _av_format(name: str, media_type: str, container: str, codec: str, **options: str) -> AudioFormat:
    return AudioFormat(name, media_type, lambda rate: AvEncoder(rate, container=container, codec=codec, options=options))


FORMATS: dict[str, AudioFormat] = {
    f.name: f
    for f in (
        AudioFormat("pcm", "audio/pcm", PcmEncoder),
        AudioFormat("wav", "audio/wav", WavEncoder),
        # No ID3 tag or Xing frame: their lengths would be wrong in a stream written front to back.
        _av_format("mp3", "audio/mpeg", "mp3", "libmp3lame", id3v2_version="0", write_xing="0"),
        # Ogg pages of 100 ms instead of the muxer's 1 s, so audio leaves as it is made.
        _av_format("opus", "audio/ogg", "ogg", "libopus", page_duration="100000"),
        _av_format("aac", "audio/aac", "adts", "aac"),
        _av_format("flac", "audio/flac", "flac", "flac"),
    )
}


# -- request mapping ------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeechRequest:
    text: str
    voice: str  # a registry voice name
    style: Style
    audio_format: AudioFormat
    sse: bool


def parse_body(raw: bytes) -> SpeechBody:
    try:
        return SpeechBody.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors()
        message = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors
        )
        first = errors[0]["loc"] if errors else ()
        raise SpeechParamError(message, str(first[0]) if first else None) from None


def check_input(text: str) -> str:
    if not text.strip():
        raise SpeechParamError("input must not be empty", "input")
    if len(text) > MAX_INPUT_CHARS:
        raise SpeechParamError(f"input is {len(text)} characters; the maximum is {MAX_INPUT_CHARS}", "input")
    return text


def voice_name(voice: str | dict[str, str] | None) -> str | None:
    if isinstance(voice, dict):
        if "id" not in voice:
            raise SpeechParamError('a voice object needs an "id"', "voice")
        return voice["id"]
    return voice


def resolve_voice(requested: str | None, own_voices: Collection[str], voice_for: Callable[[str | None], str]) -> str:
    """A requested voice -> a registry name. voice_for applies aliases and the default."""
    name = voice_for(requested)
    if name in own_voices:
        return name
    if name != requested:
        raise SpeechParamError(f"voice {requested!r} is an alias of {name!r}, which this server does not have", "voice")
    if requested in OPENAI_VOICES:
        return voice_for(None)
    raise SpeechParamError(
        f"unknown voice {requested!r}; use one of OpenAI's ({', '.join(sorted(OPENAI_VOICES))}) "
        f"or of this server's ({', '.join(sorted(own_voices))})",
        "voice",
    )


def check_speed(speed: float) -> float:
    low, high = OPENAI_SPEED_RANGE
    if not low <= speed <= high:
        raise SpeechParamError(f"speed must be between {low} and {high}, got {speed}", "speed")
    return speed


_PRESET_WORDS = re.compile(r"\b(" + "|".join(map(re.escape, PRESETS)) + r")\b", re.IGNORECASE)


def preset_in(instructions: str | None) -> str:
    """The first style preset the instructions name ("Sound calm and slow" -> calm), else neutral."""
    found = _PRESET_WORDS.search(instructions or "")
    return found.group(1).lower() if found else "neutral"


def style_for(instructions: str | None, speed: float) -> Style:
    """The preset the instructions name, sped up by `speed` and clamped into voxflow's range.

    Clamped rather than refused, because OpenAI clients send anything in 0.25-4.0.
    """
    preset = PRESETS[preset_in(instructions)]
    low, high = SPEED_RANGE
    return Style(
        speed=min(max(preset.speed * check_speed(speed), low), high),
        expressiveness=preset.expressiveness,
        volume=preset.volume,
    )


def audio_format(name: str) -> AudioFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise SpeechParamError(
            f"unsupported response_format {name!r}; supported: {', '.join(FORMATS)}", "response_format"
        ) from None


def wants_sse(stream_format: str) -> bool:
    if stream_format not in STREAM_FORMATS:
        raise SpeechParamError(
            f"unsupported stream_format {stream_format!r}; supported: {', '.join(STREAM_FORMATS)}", "stream_format"
        )
    return stream_format == "sse"


def speech_request(body: SpeechBody, own_voices: Collection[str], voice_for: Callable[[str | None], str]) -> SpeechRequest:
    return SpeechRequest(
        text=check_input(body.input),
        voice=resolve_voice(voice_name(body.voice), own_voices, voice_for),
        style=style_for(body.instructions, body.speed),
        audio_format=audio_format(body.response_format),
        sse=wants_sse(body.stream_format),
    )


# -- responses ------------------------------------------------------------------------------


def sse_event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def audio_delta(audio: bytes) -> bytes:
    return sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(audio).decode("ascii")})


def audio_done() -> bytes:
    # The fields OpenAI sends; voxflow has no tokens to count, so they are zero.
    return sse_event({"type": "speech.audio.done", "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}})


def error_payload(exc: VoxflowError) -> tuple[int, dict]:
    """Status and body: voxflow's {"code", "message"} plus OpenAI's "type" and "param"."""
    status = error_status(exc)
    body = error_body(exc.code, str(exc))
    body["error"]["type"] = "server_error" if status >= 500 else "invalid_request_error"
    body["error"]["param"] = getattr(exc, "param", None)
    return status, body
