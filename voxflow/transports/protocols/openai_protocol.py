"""OpenAI's speech API (`POST /v1/audio/speech`) as plain data and functions.

Request validation, the mapping of OpenAI's knobs onto voxflow's (voices, speed, instructions),
its response formats and SSE events live here; `openai_http` only moves bytes.

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
from collections.abc import Callable, Collection
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationError

from ...errors import InvalidRequest, VoxflowError
from ...voices.styles import PRESETS, SPEED_RANGE, Style
from ..core.http import error_body, error_status, validation_summary
from .audio_encoding import (
    AudioFormat,
    aac_format,
    flac_format,
    mp3_format,
    ogg_opus_format,
    pcm_format,
    wav_format,
)

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


# -- audio formats ---------------------------------------------------------------------------


FORMATS: dict[str, AudioFormat] = {
    f.name: f
    for f in (
        pcm_format("pcm"),
        wav_format("wav"),
        mp3_format("mp3"),
        ogg_opus_format("opus"),
        aac_format("aac"),
        flac_format("flac"),
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
        raise SpeechParamError(*validation_summary(exc.errors())) from None


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
