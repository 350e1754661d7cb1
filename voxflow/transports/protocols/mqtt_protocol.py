"""voxflow over MQTT: the topic schema, request parsing and reply payloads (no I/O).

docs/mqtt.md is the specification; `mqtt_bridge.py` moves these payloads over a broker.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Collection
from urllib.parse import unquote, urlsplit

from ...errors import VoxflowError
from ...voices.styles import Style, resolve_style
from .json_text import InvalidJson, loads_object
from .native_protocol import SAMPLE_RATES

DEFAULT_PREFIX = "voxflow"
MAX_ID_CHARS = 64
MAX_MESSAGE_MS = 200  # audio per MQTT message
AUDIO_VERSION = 1
FLAG_FIRST = 0x01
FLAG_LAST = 0x02
ENCODINGS = {1: "pcm_s16le"}
_ENCODING_IDS = {name: code for code, name in ENCODINGS.items()}
_HEADER = struct.Struct("<BBHI")  # version, flags, offset of the audio, message seq
_FORMAT = struct.Struct("<IBBH")  # sample rate, encoding, channels, reserved
AUDIO_CONTENT_TYPE = "application/vnd.voxflow.audio"
JSON_CONTENT_TYPE = "application/json"

# The levels under <prefix>/<device>/ that carry requests.
SAY, START, TEXT, END, CANCEL = "say", "stream/start", "stream/text", "stream/end", "cancel"
REQUEST_KINDS = (SAY, START, TEXT, END, CANCEL)


class MqttProtocolError(VoxflowError):
    """A request that cannot be served; `request_id` is its id when that was readable."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message, code=code)
        self.request_id = request_id


def _check_level(name: str, value: str) -> None:
    if not value or any(c in value for c in "/+#\0"):
        raise ValueError(f"{name} must be one non-empty MQTT topic level without / + #, got {value!r}")


@dataclass(frozen=True)
class Topics:
    """Every topic under one prefix (which may itself span levels, e.g. `home/tts`)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        for level in self.prefix.split("/"):
            _check_level("each prefix level", level)

    @property
    def status(self) -> str:
        return f"{self.prefix}/status"

    def request_filters(self, share_group: str = "") -> tuple[str, ...]:
        """Subscriptions for every request kind.

        With a share group the broker hands each *new* request (say, stream/start) to one
        worker of the group, so workers split the load. What follows a request (stream text
        and end, cancel) must reach the worker that took it, which the broker cannot know, so
        those go to every worker and only the one holding the request acts on them.
        """
        if not share_group:
            return tuple(f"{self.prefix}/+/{kind}" for kind in REQUEST_KINDS)
        shared = tuple(f"$share/{share_group}/{self.prefix}/+/{kind}" for kind in (SAY, START))
        return shared + tuple(f"{self.prefix}/+/{kind}" for kind in (TEXT, END, CANCEL))

    def check_response_topic(self, topic: str) -> None:
        """An MQTT 5 response topic the bridge may publish a request's replies to.

        The bridge publishes there with its own credentials, so a requester may only name a
        topic under the prefix, and not one the bridge itself reads (a request topic) or owns
        (the status). Raises MqttProtocolError (invalid_request) otherwise.
        """
        under = topic.startswith(self.prefix + "/")
        try:
            for level in topic.split("/"):
                _check_level("each response topic level", level)
        except ValueError as exc:
            raise _invalid(str(exc)) from None
        if not under or topic == self.status or self.parse(topic) is not None:
            raise _invalid(f"response topic {topic!r:.120} must be under {self.prefix}/ and not a request or status topic")

    def parse(self, topic: str) -> tuple[str, str] | None:
        """(device, request kind) of a request topic; None for any other topic."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        device, _, kind = topic[len(head):].partition("/")
        if not device or kind not in REQUEST_KINDS:
            return None
        return device, kind

    def audio(self, device: str, request_id: str) -> str:
        return f"{self.prefix}/{device}/audio/{request_id}"

    def event(self, device: str) -> str:
        return f"{self.prefix}/{device}/event"

    def error(self, device: str) -> str:
        return f"{self.prefix}/{device}/error"


# -- requests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Say:
    device: str
    id: str
    text: str
    voice: str | None = None
    style: Style = field(default_factory=Style)
    sample_rate: int | None = None


@dataclass(frozen=True)
class StartStream:
    device: str
    id: str
    voice: str | None = None
    style: Style = field(default_factory=Style)
    sample_rate: int | None = None


@dataclass(frozen=True)
class StreamText:
    device: str
    id: str
    text: str
    flush: bool = False
    end: bool = False


@dataclass(frozen=True)
class EndStream:
    device: str
    id: str


@dataclass(frozen=True)
class CancelRequest:
    device: str
    id: str


Request = Say | StartStream | StreamText | EndStream | CancelRequest


@dataclass(frozen=True)
class RequestLimits:
    max_text_chars: int = 10_000  # text in one message
    voices: Collection[str] = ()  # names a request may ask for (aliases included); empty: not checked here

    @property
    def max_payload_bytes(self) -> int:
        # UTF-8 text of max_text_chars, JSON-escaped, plus the envelope: anything larger is
        # refused before it is decoded.
        return 6 * self.max_text_chars + 4096


def _invalid(message: str, request_id: str | None = None) -> MqttProtocolError:
    return MqttProtocolError("invalid_request", message, request_id)


def decode_json_object(payload: bytes, max_bytes: int) -> dict[str, Any]:
    if len(payload) > max_bytes:
        raise MqttProtocolError("limit_exceeded", f"payload of {len(payload)} bytes; at most {max_bytes}")
    try:
        return loads_object(payload)
    except InvalidJson as exc:
        raise MqttProtocolError("invalid_json", f"the payload is not a UTF-8 JSON object: {exc}") from None


def _request_id(obj: dict[str, Any], new_id: Callable[[], str] | None) -> str:
    value = obj.get("id")
    if value is None and new_id is not None:
        return new_id()
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise _invalid(f"id must be a string of 1 to {MAX_ID_CHARS} characters, got {value!r:.80}")
    try:
        _check_level("id", value)  # it names the audio topic
    except ValueError as exc:
        raise _invalid(str(exc)) from None
    return value


def _text(obj: dict[str, Any], rid: str, limits: RequestLimits) -> str:
    text = obj.get("text")
    if not isinstance(text, str):
        raise _invalid(f"text must be a string, got {type(text).__name__}", rid)
    if len(text) > limits.max_text_chars:
        raise MqttProtocolError("limit_exceeded", f"text of {len(text)} characters; at most {limits.max_text_chars}", rid)
    return text


def _flag(obj: dict[str, Any], name: str, rid: str) -> bool:
    value = obj.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(f"{name} must be true or false, got {value!r:.80}", rid)
    return value


def _format(obj: dict[str, Any], rid: str, limits: RequestLimits) -> tuple[str | None, Style, int | None]:
    voice = obj.get("voice")
    if voice is not None:
        if not isinstance(voice, str):
            raise _invalid(f"voice must be a string, got {voice!r:.80}", rid)
        if limits.voices and voice not in limits.voices:
            raise MqttProtocolError("unknown_voice", f"unknown voice {voice!r:.80}; available: {', '.join(sorted(limits.voices))}", rid)
    raw_style = obj.get("style")
    try:
        if raw_style is None:
            style = Style()
        elif isinstance(raw_style, str):
            style = resolve_style(raw_style)
        elif isinstance(raw_style, dict):
            knobs = {k: raw_style.get(k) for k in ("speed", "expressiveness", "volume")}
            if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in knobs.values()):
                raise _invalid(f"style knobs must be numbers, got {raw_style!r:.80}", rid)
            preset = raw_style.get("preset")
            if preset is not None and not isinstance(preset, str):
                raise _invalid(f"style preset must be a string, got {preset!r:.80}", rid)
            style = resolve_style(preset, **knobs)
        else:
            raise _invalid(f"style must be a preset name or an object, got {raw_style!r:.80}", rid)
    except MqttProtocolError:
        raise
    except VoxflowError as exc:
        raise _invalid(str(exc), rid) from None
    rate = obj.get("sample_rate")
    if rate is not None and (type(rate) is not int or rate not in SAMPLE_RATES):
        raise _invalid(f"sample_rate must be one of {', '.join(map(str, SAMPLE_RATES))}, got {rate!r:.80}", rid)
    return voice, style, rate


def parse_request(
    device: str, kind: str, payload: bytes, limits: RequestLimits, new_id: Callable[[], str]
) -> Request:
    """One request message (its topic already split by Topics.parse); raises MqttProtocolError.

    new_id names a `say` that brings no id of its own.
    """
    obj = decode_json_object(payload, limits.max_payload_bytes)
    rid = _request_id(obj, new_id if kind == SAY else None)
    if kind == SAY:
        text = _text(obj, rid, limits)
        if not text.strip():
            raise _invalid("text must not be empty", rid)
        return Say(device, rid, text, *_format(obj, rid, limits))
    if kind == START:
        return StartStream(device, rid, *_format(obj, rid, limits))
    if kind == TEXT:
        return StreamText(device, rid, _text(obj, rid, limits), _flag(obj, "flush", rid), _flag(obj, "end", rid))
    if kind == END:
        return EndStream(device, rid)
    return CancelRequest(device, rid)


# -- replies ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioFormat:
    sample_rate: int
    encoding: str = "pcm_s16le"
    channels: int = 1


@dataclass(frozen=True)
class AudioMessage:
    seq: int
    first: bool
    last: bool
    format: AudioFormat | None  # present exactly when first
    pcm: bytes


def pack_audio(seq: int, pcm: bytes, *, format: AudioFormat | None = None, last: bool = False) -> bytes:
    """One audio message; giving `format` makes it the first of its request."""
    flags = (FLAG_FIRST if format else 0) | (FLAG_LAST if last else 0)
    size = _HEADER.size + (_FORMAT.size if format else 0)
    head = _HEADER.pack(AUDIO_VERSION, flags, size, seq)
    if format:
        head += _FORMAT.pack(format.sample_rate, _ENCODING_IDS[format.encoding], format.channels, 0)
    return head + pcm


def unpack_audio(data: bytes) -> AudioMessage:
    if len(data) < _HEADER.size:
        raise ValueError(f"audio message of {len(data)} bytes is shorter than its header")
    version, flags, offset, seq = _HEADER.unpack_from(data)
    if version != AUDIO_VERSION:
        raise ValueError(f"audio message version {version}; this reader knows {AUDIO_VERSION}")
    audio_format = None
    if flags & FLAG_FIRST:
        rate, encoding, channels, _ = _FORMAT.unpack_from(data, _HEADER.size)
        audio_format = AudioFormat(rate, ENCODINGS.get(encoding, f"unknown-{encoding}"), channels)
    return AudioMessage(seq, bool(flags & FLAG_FIRST), bool(flags & FLAG_LAST), audio_format, bytes(data[offset:]))


class AudioBatcher:
    """Groups one request's PCM frames into audio messages of at most `max_ms`.

    The first frame goes out alone at once (time to first audio matters most); later frames
    are grouped, so a broker carries ~5 messages a second rather than 50.
    """

    def __init__(self, max_ms: int = MAX_MESSAGE_MS) -> None:
        self.max_ms = max_ms
        self._seq = 0
        self._format: AudioFormat | None = None
        self._buffer = bytearray()
        self.samples = 0  # audio taken in so far

    def add(self, pcm: bytes, sample_rate: int) -> list[bytes]:
        self.samples += len(pcm) // 2
        if self._format is None:
            self._format = AudioFormat(sample_rate)
            return [self._emit(pcm, self._format)]
        limit = sample_rate * self.max_ms // 1000 * 2
        out = []
        if self._buffer and len(self._buffer) + len(pcm) > limit:
            out.append(self._take())
        self._buffer += pcm
        if len(self._buffer) >= limit:
            out.append(self._take())
        return out

    def finish(self, sample_rate: int, *, keep_audio: bool = True) -> bytes:
        """The last message: what is still buffered (unless the request was cancelled), or
        nothing; the first message too when no audio was sent before (it carries the format)."""
        first = None if self._format else AudioFormat(sample_rate)
        pcm = bytes(self._buffer) if keep_audio else b""
        self._buffer.clear()
        return self._emit(pcm, first, last=True)

    def _take(self) -> bytes:
        pcm = bytes(self._buffer)
        self._buffer.clear()
        return self._emit(pcm, None)

    def _emit(self, pcm: bytes, first: AudioFormat | None, last: bool = False) -> bytes:
        message = pack_audio(self._seq, pcm, format=first, last=last)
        self._seq += 1
        return message


@dataclass(frozen=True)
class Started:
    type: ClassVar[str] = "started"
    id: str
    voice: str
    sample_rate: int
    encoding: str = "pcm_s16le"
    channels: int = 1


@dataclass(frozen=True)
class Word:
    type: ClassVar[str] = "word"
    id: str
    word: str
    start: float
    end: float


@dataclass(frozen=True)
class Done:
    type: ClassVar[str] = "done"
    id: str
    audio_seconds: float


@dataclass(frozen=True)
class Cancelled:
    type: ClassVar[str] = "cancelled"
    id: str


@dataclass(frozen=True)
class Error:
    type: ClassVar[str] = "error"
    code: str
    message: str
    id: str | None = None


Event = Started | Word | Done | Cancelled | Error


def encode_event(event: Event) -> bytes:
    body = {"type": event.type, **asdict(event)}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> "BrokerAddress":
        """mqtt://[user:password@]host[:port] (1883), or mqtts:// for TLS (8883)."""
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise ValueError(f"broker URL must look like mqtt://HOST:PORT, got {url!r}")
        tls = parts.scheme in ("mqtts", "ssl")
        return cls(
            parts.hostname, parts.port or (8883 if tls else 1883), tls,
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
        )
