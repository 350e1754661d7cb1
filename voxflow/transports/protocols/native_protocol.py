"""The voxflow.v1 streaming protocol as plain data (docs/protocol.md), without any I/O.

Both directions are here, each one writable and readable: the server adapter parses client
messages and writes server ones, the client SDK does the opposite, and tests round-trip both.
Parsing checks types and ranges and raises ProtocolError with the code the spec names;
limits that depend on the server's configuration (message size, contexts) are the adapter's.
"""

from __future__ import annotations

import json
import math
import struct
import types
import typing
from dataclasses import MISSING, dataclass, fields, is_dataclass
from functools import cache
from typing import Any, ClassVar, Literal, Union

from ...agent.events import EVENT_TYPES, AgentEvent, event_from_dict, event_to_dict
from ...errors import VoxflowError
from ...voices.styles import Style, resolve_style
from .json_text import InvalidJson, check_text, loads_object

PROTOCOL = "voxflow.v1"
# The spec's own lists; the engine's framer accepts the same (a test keeps them equal).
SAMPLE_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
FRAME_MS = (10, 20, 40, 60, 100)
ENCODINGS = ("pcm_s16le",)
MAX_CONTEXT_BYTES = 64  # the audio header stores the context id's length in one byte, capped by the spec
MAX_SEED = 2**64 - 1  # what a torch generator accepts
# Conversation mode: the microphone rates the agent takes (a test keeps them equal), the most
# audio one binary frame may carry, and the size of the reply's audio frames.
LISTEN_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
MAX_MICROPHONE_CHUNK_SECONDS = 1.0
AGENT_FRAME_MS = 20

AUDIO_VERSION = 1
_HEADER = struct.Struct("<BBHIQ")  # version, context length, reserved, seq, pts (µs)
HEADER_SIZE = _HEADER.size
_MAX_SEQ = 2**32 - 1
_MAX_PTS_US = 2**64 - 1


class ProtocolError(VoxflowError):
    """A message that breaks the protocol; context is the message's context id when known."""

    def __init__(self, code: str, message: str, context: str | None = None) -> None:
        super().__init__(message, code=code)
        self.context = context


def _invalid(message: str, context: str | None = None) -> ProtocolError:
    return ProtocolError("invalid_request", message, context)


def _valid_context(value: object) -> bool:
    if not isinstance(value, str) or not value:
        return False
    try:
        return len(value.encode("utf-8")) <= MAX_CONTEXT_BYTES
    except UnicodeEncodeError:  # a lone surrogate, possible through a JSON \ud800 escape
        return False


def _check_context(value: object) -> None:
    if not _valid_context(value):
        raise _invalid(f"context must be a string of 1 to {MAX_CONTEXT_BYTES} UTF-8 bytes, got {value!r:.80}")


def _check_choice(name: str, value: object, allowed: tuple, context: str | None) -> None:
    if type(value) is not type(allowed[0]) or value not in allowed:
        raise _invalid(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r:.80}", context)


# -- client messages --------------------------------------------------------------------------


@dataclass(frozen=True)
class StyleSpec:
    """The object form of `style`: a preset with any knob overridden."""

    preset: str | None = None
    speed: float | None = None
    expressiveness: float | None = None
    volume: float | None = None


@dataclass(frozen=True)
class Start:
    type: ClassVar[str] = "start"
    context: str
    voice: str | None = None
    style: str | StyleSpec | None = None  # a preset name or a StyleSpec
    speaker: str | int | None = None
    seed: int | None = None
    sample_rate: int | None = None  # None: the voice's own rate
    encoding: str = "pcm_s16le"
    frame_ms: int = 20

    def __post_init__(self) -> None:
        _check_context(self.context)
        if self.sample_rate is not None:
            _check_choice("sample_rate", self.sample_rate, SAMPLE_RATES, self.context)
        _check_choice("encoding", self.encoding, ENCODINGS, self.context)
        _check_choice("frame_ms", self.frame_ms, FRAME_MS, self.context)
        if self.seed is not None and not (type(self.seed) is int and 0 <= self.seed <= MAX_SEED):
            raise _invalid(f"seed must be an integer in [0, 2^64), got {self.seed!r:.80}", self.context)
        if isinstance(self.speaker, int) and self.speaker < 0:
            raise _invalid(f"speaker index must not be negative, got {self.speaker}", self.context)

    def resolved_style(self) -> Style:
        """The Style this start asks for; raises ProtocolError for unknown presets or bad ranges."""
        spec = StyleSpec(preset=self.style) if isinstance(self.style, str) else self.style
        if spec is None:
            return Style()
        try:
            return resolve_style(spec.preset, speed=spec.speed, expressiveness=spec.expressiveness, volume=spec.volume)
        except VoxflowError as exc:
            raise _invalid(str(exc), self.context) from None


@dataclass(frozen=True)
class Text:
    type: ClassVar[str] = "text"
    context: str
    text: str
    flush: bool = False  # flush right after this text
    end: bool = False  # end the context right after this text (a whole utterance in one message)

    def __post_init__(self) -> None:
        _check_context(self.context)
        if not isinstance(self.text, str):
            raise _invalid(f"text must be a string, got {type(self.text).__name__}", self.context)
        try:
            self.text.encode("utf-8")
        except UnicodeEncodeError:
            raise _invalid("text contains a lone surrogate (not valid Unicode)", self.context) from None


@dataclass(frozen=True)
class Flush:
    type: ClassVar[str] = "flush"
    context: str

    def __post_init__(self) -> None:
        _check_context(self.context)


@dataclass(frozen=True)
class End:
    type: ClassVar[str] = "end"
    context: str

    def __post_init__(self) -> None:
        _check_context(self.context)


@dataclass(frozen=True)
class Cancel:
    type: ClassVar[str] = "cancel"
    context: str

    def __post_init__(self) -> None:
        _check_context(self.context)


@dataclass(frozen=True)
class Ping:
    type: ClassVar[str] = "ping"
    id: str | int | float | None = None


@dataclass(frozen=True)
class Listen:
    """Start a conversation with the agent on this connection (see "Conversation (agent) mode")."""

    type: ClassVar[str] = "listen"
    sample_rate: int = 16000  # of the microphone audio the client sends
    encoding: str = "pcm_s16le"
    output_sample_rate: int = 24000  # of the bot's reply audio
    voice: str | None = None  # None: the agent's configured voice
    style: str | None = None  # a style preset name; None: the agent's configured style

    def __post_init__(self) -> None:
        _check_choice("sample_rate", self.sample_rate, LISTEN_RATES, None)
        _check_choice("encoding", self.encoding, ENCODINGS, None)
        _check_choice("output_sample_rate", self.output_sample_rate, SAMPLE_RATES, None)
        if self.style is not None:
            try:
                resolve_style(self.style)
            except VoxflowError as exc:
                raise _invalid(str(exc)) from None


@dataclass(frozen=True)
class StopListening:
    type: ClassVar[str] = "stop_listening"


@dataclass(frozen=True)
class MicrophoneAudio:
    """A binary frame while listening: mono PCM16 LE at the listen rate, no header."""

    type: ClassVar[str] = "microphone_audio"  # not a JSON message: binary frames only
    pcm: bytes


ClientMessage = Start | Text | Flush | End | Cancel | Ping | Listen | StopListening | MicrophoneAudio


# -- server messages --------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    max_contexts: int
    max_message_chars: int
    max_context_chars: int


@dataclass(frozen=True)
class Ready:
    type: ClassVar[str] = "ready"
    voices: tuple[str, ...]
    default_voice: str
    limits: Limits
    protocol: str = PROTOCOL


@dataclass(frozen=True)
class Started:
    type: ClassVar[str] = "started"
    context: str
    voice: str
    sample_rate: int
    encoding: str
    frame_ms: int


@dataclass(frozen=True)
class Word:
    type: ClassVar[str] = "word"
    context: str
    word: str
    start: float
    end: float


@dataclass(frozen=True)
class Metrics:
    """first_audio_ms and rtf are None when the context produced no audio."""

    type: ClassVar[str] = "metrics"
    context: str
    first_audio_ms: float | None
    rtf: float | None
    audio_seconds: float


@dataclass(frozen=True)
class Done:
    type: ClassVar[str] = "done"
    context: str


@dataclass(frozen=True)
class Cancelled:
    type: ClassVar[str] = "cancelled"
    context: str


@dataclass(frozen=True)
class Error:
    type: ClassVar[str] = "error"
    context: str | None
    code: str
    message: str


@dataclass(frozen=True)
class Pong:
    type: ClassVar[str] = "pong"
    id: str | int | float | None = None


@dataclass(frozen=True)
class Listening:
    """The answer to `listen`: the formats the conversation actually uses."""

    type: ClassVar[str] = "listening"
    sample_rate: int
    output_sample_rate: int
    frame_ms: int
    voice: str


@dataclass(frozen=True)
class AgentMessage:
    """One of the agent's events (voxflow/agent/events.py), wrapped so that its types never
    collide with the protocol's own."""

    type: ClassVar[str] = "agent"
    event: AgentEvent


ServerMessage = Ready | Started | Word | Metrics | Done | Cancelled | Error | Pong | Listening | AgentMessage


@dataclass(frozen=True)
class AudioPacket:
    """A binary audio frame: PCM16 mono, pts in whole microseconds as on the wire."""

    context: str
    seq: int
    pts_us: int
    pcm: bytes

    @property
    def pts(self) -> float:
        return self.pts_us / 1_000_000


_CLIENT_TYPES: dict[str, type] = {cls.type: cls for cls in (Start, Text, Flush, End, Cancel, Ping, Listen, StopListening)}
_SERVER_TYPES: dict[str, type] = {
    cls.type: cls for cls in (Ready, Started, Word, Metrics, Done, Cancelled, Error, Pong, Listening, AgentMessage)
}
_EVENT_CLASSES = tuple(EVENT_TYPES.values())


# -- JSON -------------------------------------------------------------------------------------


def serialize_client(msg: ClientMessage) -> str | bytes:
    """A JSON text, or the raw bytes of microphone audio."""
    if isinstance(msg, MicrophoneAudio):
        return msg.pcm
    return _dumps(msg)


def serialize_server(msg: ServerMessage) -> str:
    return _dumps(msg)


def parse_client(data: str | bytes, *, audio_rate: int | None = None) -> ClientMessage:
    """One client frame -> its message.

    audio_rate: the microphone rate of the conversation the connection has open, when its
    audio comes in binary frames; without one, binary frames carry nothing a client may send.
    """
    if not isinstance(data, str):
        if audio_rate is None:
            raise ProtocolError("binary_not_expected", "binary frames are not expected from clients; send JSON in text frames (or `listen` first)")
        return _microphone_audio(data, audio_rate)
    msg = _parse(data, _CLIENT_TYPES)
    if isinstance(msg, Start):
        msg.resolved_style()
    return msg


def parse_server(data: str | bytes) -> ServerMessage | AudioPacket:
    """One server frame -> its message (text) or audio packet (binary).

    A malformed frame raises ProtocolError with the same codes as parse_client uses
    (invalid_json, unknown_type, invalid_request).
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        return unpack_audio(data)
    return _parse(data, _SERVER_TYPES)


def _microphone_audio(data: bytes | bytearray | memoryview, rate: int) -> MicrophoneAudio:
    size = len(data)
    if size % 2:
        raise ProtocolError("invalid_audio", f"microphone audio is 16-bit samples: {size} bytes is not a whole number of them")
    limit = int(MAX_MICROPHONE_CHUNK_SECONDS * rate) * 2
    if size > limit:
        raise ProtocolError("invalid_audio", f"{size} bytes of audio in one frame; at most {limit} ({MAX_MICROPHONE_CHUNK_SECONDS:g} s at {rate} Hz)")
    return MicrophoneAudio(bytes(data))


def _dumps(msg: Any) -> str:
    # Non-ASCII text stays as is: escaping it would count up to 6 characters per character
    # against the server's message size limit.
    return json.dumps({"type": msg.type, **_to_json(msg)}, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _to_json(obj: Any) -> Any:
    if isinstance(obj, _EVENT_CLASSES):
        return event_to_dict(obj)  # the events file's form: every field, times to 0.1 ms
    if is_dataclass(obj):
        # An optional field left at its default (None, or a flag left off) is omitted; a
        # required field that may be null is kept.
        return {
            f.name: _to_json(getattr(obj, f.name))
            for f in fields(obj)
            if not (f.default in (None, False) and getattr(obj, f.name) is f.default)
        }
    if isinstance(obj, tuple):
        return [_to_json(item) for item in obj]
    return obj


def _parse(data: str, types_by_name: dict[str, type]) -> Any:
    try:
        obj = loads_object(data, strict_text=False)
    except InvalidJson as exc:
        raise ProtocolError("invalid_json", f"not valid JSON: {exc}"[:200]) from None
    context = obj.get("context") if _valid_context(obj.get("context")) else None
    try:
        check_text(obj)
    except InvalidJson as exc:
        raise ProtocolError("invalid_request", str(exc), context) from None
    kind = obj.get("type")
    cls = types_by_name.get(kind) if isinstance(kind, str) else None
    if cls is None:
        known = ", ".join(types_by_name)
        raise ProtocolError("unknown_type", f"type must be one of {known}, got {kind!r:.80}", context)
    try:
        return _from_json(cls, obj, cls.type)
    except ProtocolError as exc:
        exc.context = exc.context or context
        raise


def _from_json(cls: type, obj: dict, where: str) -> Any:
    hints = _hints(cls)
    values = {}
    for f in fields(cls):
        value = obj.get(f.name)  # fields the class does not know are ignored
        if value is None:
            if f.default is not MISSING:
                continue
            if not _allows_none(hints[f.name]):
                raise _invalid(f"{where} needs {f.name}")
        values[f.name] = _convert(value, hints[f.name], f"{where}.{f.name}")
    return cls(**values)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _allows_none(hint: Any) -> bool:
    return hint is type(None) or type(None) in typing.get_args(hint)


def _convert(value: Any, hint: Any, where: str) -> Any:
    """A JSON value checked against (and shaped into) a field's annotated type."""
    if hint is AgentEvent:
        return _agent_event(value, where)
    if typing.get_origin(hint) in (Union, types.UnionType):
        for arm in typing.get_args(hint):
            try:
                return _convert(value, arm, where)
            except ProtocolError:
                pass
        raise _invalid(f"{where} has the wrong type: {value!r:.80}")
    if hint is type(None):
        if value is None:
            return None
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif typing.get_origin(hint) is Literal:
        if any(type(value) is type(choice) and value == choice for choice in typing.get_args(hint)):
            return value
    elif typing.get_origin(hint) is tuple:
        if isinstance(value, list):
            item = typing.get_args(hint)[0]
            return tuple(_convert(v, item, f"{where}[]") for v in value)
    elif is_dataclass(hint):
        if isinstance(value, dict):
            return _from_json(hint, value, where)
    else:
        raise TypeError(f"no JSON form for {hint!r}")
    raise _invalid(f"{where} has the wrong type: {value!r:.80}")


def _agent_event(value: Any, where: str) -> AgentEvent:
    kind = value.get("type") if isinstance(value, dict) else None
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise _invalid(f"{where} must be an agent event, with type one of {', '.join(EVENT_TYPES)}; got {value!r:.80}")
    # Rounded as event_to_dict rounds on the way out, so a parsed event serializes unchanged.
    return event_from_dict(event_to_dict(_from_json(cls, value, f"{where}.{kind}")))


# -- binary audio frames ----------------------------------------------------------------------


def pack_audio(context: str, seq: int, pts_seconds: float, pcm: bytes) -> bytes:
    _check_context(context)
    if not 0 <= seq <= _MAX_SEQ:
        raise _invalid(f"seq must fit in 32 bits, got {seq}", context)
    pts_us = round(pts_seconds * 1_000_000)
    if not 0 <= pts_us <= _MAX_PTS_US:
        raise _invalid(f"pts must be a non-negative time, got {pts_seconds}", context)
    if len(pcm) % 2:
        raise _invalid("PCM16 audio must have an even number of bytes", context)
    name = context.encode("utf-8")
    return _HEADER.pack(AUDIO_VERSION, len(name), 0, seq, pts_us) + name + pcm


def unpack_audio(data: bytes | bytearray | memoryview) -> AudioPacket:
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        raise _invalid(f"audio frame shorter than its {HEADER_SIZE}-byte header")
    version, length, _reserved, seq, pts_us = _HEADER.unpack_from(data)
    if version != AUDIO_VERSION:
        raise _invalid(f"audio frame version {version}; this is version {AUDIO_VERSION}")
    if not 1 <= length <= MAX_CONTEXT_BYTES or len(data) < HEADER_SIZE + length:
        raise _invalid(f"audio frame context length {length} does not fit the frame")
    try:
        context = data[HEADER_SIZE : HEADER_SIZE + length].decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid("audio frame context id is not UTF-8") from None
    pcm = data[HEADER_SIZE + length :]
    if len(pcm) % 2:
        raise _invalid("audio frame has an odd number of PCM16 bytes", context)
    return AudioPacket(context, seq, pts_us, pcm)
