"""ElevenLabs' HTTP text-to-speech API as plain data and functions, without any I/O.

Covers `POST /v1/text-to-speech/{voice_id}` and its `/stream`, `/with-timestamps` and
`/stream/with-timestamps` variants: the request (JSON body and query), the bodies of the four
responses, and ElevenLabs' error shape. Field names and shapes follow ElevenLabs' API reference
and its Python SDK (elevenlabs 2.78: text_to_speech/raw_client.py, types/
audio_with_timestamps_response.py, streaming_audio_chunk_with_timestamps_response.py,
character_alignment_response_model.py), and were checked against the clients that read them:
Pipecat 1.14's ElevenLabsHttpTTSService and LiveKit's elevenlabs plugin 1.8.9 (ChunkedStream).

Times in an alignment count from the start of the response's audio, in every chunk of a
streamed response too (not from the chunk, as on the WebSocket): ElevenLabs' own example for
`/stream/with-timestamps` appends every chunk's times into one list, and Pipecat adds a
response's times to a clock it advances only between responses, by the largest end time the
response carried. docs/compatibility.md has the details.
"""

from __future__ import annotations

import base64
import json
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, StrictStr, ValidationError

from ...errors import AtCapacity, InvalidRequest, VoxflowError
from ...voices.styles import Style
from ..core.http import error_status, validation_summary
from .audio_encoding import Encoder
from .elevenlabs_protocol import MAX_SEED, ElevenLabsError, OutputFormat, VoiceSettings, parse_output_format, resolve_voice

OPTIMIZE_STREAMING_LATENCY = range(5)  # ElevenLabs' levels 0-4; voxflow always streams its fastest
TIMESTAMPS_MEDIA_TYPE = "application/json"
# ElevenLabs' API reference names text/event-stream, but the body is JSON objects one per line,
# not server-sent events; an SSE reader would find no `data:` fields in it.
TIMESTAMPED_LINES_MEDIA_TYPE = "application/x-ndjson"


class ElevenLabsHttpError(InvalidRequest):
    """A refused request, with the HTTP status, ElevenLabs' error code and the field at fault."""

    def __init__(self, message: str, *, status: int = 422, code: str = "invalid_parameters", param: str | None = None) -> None:
        super().__init__(message, code=code)
        self.http_status = status
        self.param = param


# -- the request --------------------------------------------------------------------------------


class VoiceSettingsBody(BaseModel):
    """`voice_settings` as sent; similarity_boost, use_speaker_boost and the rest have no
    counterpart in a VITS voice and are ignored."""

    model_config = ConfigDict(extra="ignore")

    stability: FiniteFloat | None = None
    style: FiniteFloat | None = None
    speed: FiniteFloat | None = None


class SpeechBody(BaseModel):
    """The JSON body as sent. Fields voxflow has no use for (language_code, previous_text,
    next_text, previous_request_ids, next_request_ids, pronunciation_dictionary_locators,
    apply_text_normalization, apply_language_text_normalization, use_pvc_as_ivc,
    audio_effects) are accepted whatever they hold and have no effect."""

    model_config = ConfigDict(extra="ignore")

    text: StrictStr
    model_id: StrictStr | None = None  # any model name is accepted; there is one engine
    voice_settings: VoiceSettingsBody | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)


@dataclass(frozen=True)
class SpeechRequest:
    text: str
    voice: str  # a registry voice name
    style: Style
    seed: int | None  # None: the engine's default seed
    output_format: OutputFormat


def parse_body(raw: bytes) -> SpeechBody:
    try:
        return SpeechBody.model_validate_json(raw)
    except ValidationError as exc:
        message, param = validation_summary(exc.errors())
        raise ElevenLabsHttpError(message, param=param) from None


def check_text(text: str, max_chars: int) -> str:
    if not text.strip():
        raise ElevenLabsHttpError("text must not be empty", param="text")
    if len(text) > max_chars:
        raise ElevenLabsHttpError(
            f"this request's text has {len(text)} characters and exceeds the limit of {max_chars} characters",
            status=400, code="max_character_limit_exceeded", param="text",
        )
    return text


def output_format(query: Mapping[str, str]) -> OutputFormat:
    """The `output_format` query parameter (ElevenLabs' default, mp3_44100_128, when absent)."""
    try:
        return parse_output_format(query.get("output_format"))
    except ElevenLabsError as exc:
        raise ElevenLabsHttpError(str(exc), code=exc.code, param="output_format") from None


def check_latency(query: Mapping[str, str]) -> None:
    """`optimize_streaming_latency` is accepted (voxflow streams at its lowest latency anyway),
    but must be one of ElevenLabs' levels."""
    value = query.get("optimize_streaming_latency")
    if value is not None and not (value.isascii() and value.isdigit() and int(value) in OPTIMIZE_STREAMING_LATENCY):
        raise ElevenLabsHttpError(
            f"optimize_streaming_latency must be an integer from 0 to 4, got {value!r:.40}", param="optimize_streaming_latency"
        )


def style_for(settings: VoiceSettingsBody | None) -> Style:
    if settings is None:
        return VoiceSettings().to_style()
    return VoiceSettings(stability=settings.stability, style=settings.style, speed=settings.speed).to_style()


def speech_request(
    raw_body: bytes,
    query: Mapping[str, str],
    voice_id: str,
    *,
    own_voices: Collection[str],
    voice_for: Callable[[str | None], str],
    max_text_chars: int,
) -> SpeechRequest:
    """A request -> what to speak and how; ElevenLabsHttpError says what is wrong."""
    fmt = output_format(query)
    check_latency(query)
    body = parse_body(raw_body)
    return SpeechRequest(
        text=check_text(body.text, max_text_chars),
        voice=resolve_voice(voice_id, own_voices, voice_for),
        style=style_for(body.voice_settings),
        seed=body.seed,
        output_format=fmt,
    )


def max_body_bytes(max_text_chars: int) -> int:
    """Room for the longest text JSON-escaped (\\uXXXX, 6 bytes a character) and 64 KiB for the
    other fields; a larger body is refused as it arrives, never buffered whole."""
    return 6 * max_text_chars + 64 * 1024


# -- alignment ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CharacterAlignment:
    """Characters and their start and end times in seconds from the start of the response's audio."""

    characters: tuple[str, ...] = ()
    starts: tuple[float, ...] = ()
    ends: tuple[float, ...] = ()

    def to_json(self) -> dict[str, list]:
        # Milliseconds are the precision ElevenLabs sends, and keep the JSON short.
        return {
            "characters": list(self.characters),
            "character_start_times_seconds": [round(t, 3) for t in self.starts],
            "character_end_times_seconds": [round(t, 3) for t in self.ends],
        }


@dataclass
class _Char:
    char: str
    start: float
    end: float


class Aligner:
    """The engine's word timestamps as ElevenLabs' character alignment.

    The characters are the spoken words (after voxflow's text cleanup) separated by single
    spaces: for plain text, the characters of the request's text. A word's time is spread
    evenly over its characters; a space lasts from the end of the word before it to the start
    of the word after it, so it exists once that word is known.

    The last character lasts until the end of the audio, so the characters span all of it:
    Pipecat advances its clock between the responses of one turn by the largest end time a
    response carried, and its words in the next response would otherwise be early by this
    one's trailing silence. Until the next word or the end of the audio, the last character
    added is therefore held back.
    """

    def __init__(self) -> None:
        self._chars: deque[_Char] = deque()
        self._last_end: float | None = None

    def add_word(self, word: str, start: float, end: float) -> None:
        if not word:
            return
        if self._last_end is not None:
            start = max(start, self._last_end)
            self._chars.append(_Char(" ", self._last_end, start))
        end = max(end, start)
        step = (end - start) / len(word)
        self._chars.extend(_Char(c, start + i * step, start + (i + 1) * step) for i, c in enumerate(word))
        self._last_end = end

    def take(self, until: float) -> CharacterAlignment:
        """The characters that start before `until` (seconds) and are not held back."""
        taken = []
        while len(self._chars) > 1 and self._chars[0].start < until:
            taken.append(self._chars.popleft())
        return _alignment(taken)

    def finish(self, audio_end: float) -> CharacterAlignment:
        """Every character left, the last one lasting until `audio_end` (seconds)."""
        if self._chars:
            self._chars[-1].end = max(self._chars[-1].end, audio_end)
        taken = list(self._chars)
        self._chars.clear()
        return _alignment(taken)


def _alignment(chars: list[_Char]) -> CharacterAlignment:
    return CharacterAlignment(tuple(c.char for c in chars), tuple(c.start for c in chars), tuple(c.end for c in chars))


# -- response bodies ----------------------------------------------------------------------------


class BodyWriter(Protocol):
    """A response body from one synthesis: its words and audio in, bytes to send out as soon as
    they exist. Word times are on the stream's timeline, which starts with the response's first
    audio; the audio comes in order and unbroken, so its length so far says where it is."""

    media_type: str

    def add_word(self, word: str, start: float, end: float, written: str | None = None) -> None: ...

    def add_audio(self, pcm: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class AudioWriter:
    """`/v1/text-to-speech/{voice_id}` and `/stream`: the audio in the output format, nothing else."""

    def __init__(self, fmt: OutputFormat) -> None:
        self.media_type = fmt.audio.media_type
        self._encoder = fmt.audio.encoder(fmt.sample_rate)

    def add_word(self, word: str, start: float, end: float, written: str | None = None) -> None:
        pass  # these responses carry no timing

    def add_audio(self, pcm: bytes) -> bytes:
        return self._encoder.encode(pcm)

    def finish(self) -> bytes:
        return self._encoder.finish()


class _Base64:
    """Base64 written piece by piece: bytes that do not fill a 3-byte group wait for the next
    piece, so the pieces join into one valid string."""

    def __init__(self) -> None:
        self._carry = b""

    def encode(self, data: bytes) -> bytes:
        data = self._carry + data
        whole = len(data) - len(data) % 3
        self._carry = data[whole:]
        return base64.b64encode(data[:whole])

    def finish(self) -> bytes:
        data, self._carry = self._carry, b""
        return base64.b64encode(data)


class _Timed:
    """What both timestamped bodies share: the encoder, the aligners and the audio's length.

    `alignment` carries the words as the client wrote them (elevenlabs_protocol.WrittenWords),
    `normalized_alignment` as they were spoken; both at the same times.
    """

    def __init__(self, fmt: OutputFormat) -> None:
        self._rate = fmt.sample_rate
        self._encoder: Encoder = fmt.audio.encoder(fmt.sample_rate)
        self._written, self._spoken = Aligner(), Aligner()
        self._samples = 0

    @property
    def _seconds(self) -> float:
        return self._samples / self._rate

    def add_word(self, word: str, start: float, end: float, written: str | None = None) -> None:
        self._written.add_word(written or word, start, end)
        self._spoken.add_word(word, start, end)

    def _encode(self, pcm: bytes) -> bytes:
        self._samples += len(pcm) // 2
        return self._encoder.encode(pcm)


class TimestampedDocument(_Timed):
    """`/with-timestamps`: one JSON object, {"audio_base64", "alignment", "normalized_alignment"}.

    Written as the audio is made (the base64 string grows with it, the alignments close the
    object), so the server never holds the whole audio; a client reads it as one document.
    """

    media_type = TIMESTAMPS_MEDIA_TYPE

    def __init__(self, fmt: OutputFormat) -> None:
        super().__init__(fmt)
        self._base64 = _Base64()
        self._head = b'{"audio_base64":"'

    def _take_head(self) -> bytes:
        # The object's opening goes out with its first audio, not ahead of it.
        head, self._head = self._head, b""
        return head

    def add_audio(self, pcm: bytes) -> bytes:
        audio = self._base64.encode(self._encode(pcm))
        return self._take_head() + audio if audio else b""

    def finish(self) -> bytes:
        audio = self._base64.encode(self._encoder.finish()) + self._base64.finish()
        written = _json(self._written.finish(self._seconds).to_json())
        spoken = _json(self._spoken.finish(self._seconds).to_json())
        tail = b'","alignment":' + written + b',"normalized_alignment":' + spoken + b"}"
        return self._take_head() + audio + tail


class TimestampedLines(_Timed):
    """`/stream/with-timestamps`: one JSON object a line, {"audio_base64", "alignment",
    "normalized_alignment"}, each with the audio encoded since the line before.

    A character goes out with the first line whose audio reaches its start (the aligner may
    hold the last one back); a line with no character carries null alignments, which Pipecat
    skips. The last line carries what is left, with no audio when the encoder has none left.
    """

    media_type = TIMESTAMPED_LINES_MEDIA_TYPE

    def add_audio(self, pcm: bytes) -> bytes:
        audio = self._encode(pcm)
        if not audio:
            return b""
        return chunk_line(audio, self._written.take(self._seconds), self._spoken.take(self._seconds))

    def finish(self) -> bytes:
        audio = self._encoder.finish()
        written, spoken = self._written.finish(self._seconds), self._spoken.finish(self._seconds)
        return chunk_line(audio, written, spoken) if audio or written.characters or spoken.characters else b""


def _json(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def chunk_line(audio: bytes, written: CharacterAlignment, spoken: CharacterAlignment) -> bytes:
    """One line of `/stream/with-timestamps`; an alignment is null when none of its characters
    starts in the line (the two may differ: "**Hello**" has more characters than Hello)."""

    def aligned(alignment: CharacterAlignment) -> dict[str, list] | None:
        return alignment.to_json() if alignment.characters else None

    body = {"audio_base64": base64.b64encode(audio).decode("ascii"), "alignment": aligned(written), "normalized_alignment": aligned(spoken)}
    return _json(body) + b"\n"


# -- errors -------------------------------------------------------------------------------------


# voxflow's refusals -> (HTTP status, ElevenLabs' code). ElevenLabs answers too many requests
# (rate_limit_exceeded) and too many at once (concurrent_limit_exceeded) with 429, so clients
# back off from both.
_REFUSALS = {
    "unauthorized": (401, "invalid_api_key"),
    "rate_limited": (429, "rate_limit_exceeded"),
    "draining": (503, "service_unavailable"),
    "request_timeout": (408, "request_timeout"),
    "limit_exceeded": (413, "request_too_large"),
}
_TYPES = {401: "authentication_error", 408: "timeout_error", 429: "rate_limit_error"}


def error_payload(exc: VoxflowError) -> tuple[int, dict[str, Any]]:
    """Status and body in ElevenLabs' shape: {"detail": {"type", "code", "status", "message",
    "param"}}, `status` repeating `code` for clients that still read ElevenLabs' older field."""
    param = getattr(exc, "param", None)
    if isinstance(exc, ElevenLabsHttpError):
        status, code = exc.http_status, exc.code
    elif isinstance(exc, AtCapacity):
        status, code = 429, "concurrent_limit_exceeded"
    else:
        status, code = _REFUSALS.get(exc.code, (error_status(exc), exc.code))
    kind = _TYPES.get(status, "service_error" if status >= 500 else "validation_error")
    return status, {"detail": {"type": kind, "code": code, "status": code, "message": str(exc), "param": param}}
