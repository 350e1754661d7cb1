"""Wyoming (Home Assistant's voice protocol) as plain data and functions; no sockets here.

Event framing and the event classes are the `wyoming` package's own; this module maps them
onto voxflow: which voice a request means, what a connection's next step is, and how engine
frames become audio events. `wyoming_server` only moves events.

Mapping rules (see docs/wyoming.md):
- voice: a name from `info` (unknown names are an error, as asking for a voice that is not
  there would be in any other protocol here); else a language, matched exactly and then by
  its language part (`en` finds `en_US`); else, or when no voice speaks it, the default voice.
- `synthesize` outside a stream is one whole request. Inside a stream (between
  `synthesize-start` and `synthesize-stop`) it is ignored: Home Assistant sends the full text
  that way as well, for servers that do not stream, and speaking it would say everything twice.
- A request's audio is one `audio-start` .. `audio-stop` run, however many sentences it holds;
  a stream then ends with `synthesize-stopped`. Servers that render sentence by sentence send
  one run per sentence instead; clients (Home Assistant included) read chunks until
  `synthesize-stopped` either way, and voxflow's audio is one continuous timeline.
- Each 20 ms engine frame goes out as its own `audio-chunk` the moment it exists: the engine
  hands frames over a decoded block at a time, so grouping would only hold back the tail of
  a block, while the framing costs ~100 bytes per 882 bytes of audio.

Reading events (`parse_header`, `parse_event`): an event is a JSON header line, then
`data_length` bytes of JSON data and `payload_length` bytes of payload. Each part is bounded
by the server's `max_message_bytes`. Input that leaves the framing intact (bad data JSON, a
lone surrogate, a missing type) is an `invalid_request` for that event alone; a header that
is not JSON or lengths that are not byte counts raise `FramingLost`, since where the next event
starts is then unknown, and lengths over the bound raise `LimitExceeded` before their bytes
are read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice, TtsVoiceSpeaker
from wyoming.ping import Ping, Pong
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped, SynthesizeVoice

from ...errors import InvalidRequest, LimitExceeded, UnknownVoice, VoxflowError
from ...streaming.events import AudioFrame
from ...voices.voice import VoiceInfo
from .json_text import InvalidJson, check_text, loads_object

WIDTH = 2  # bytes per sample: the engine's PCM16
CHANNELS = 1
PROGRAM = "voxflow"
PROGRAM_ATTRIBUTION = Attribution(name="voxflow", url="https://github.com/voxflow/voxflow")
VOICE_ATTRIBUTION = Attribution(name="Piper voices (rhasspy)", url="https://huggingface.co/rhasspy/piper-voices")


@dataclass(frozen=True)
class VoiceChoice:
    voice: str  # a registry name
    speaker: str | None = None


@dataclass(frozen=True)
class Reply:
    """Answer at once with these events."""

    events: tuple[Event, ...]


@dataclass(frozen=True)
class Speak:
    """A whole text: speak it, then audio-stop."""

    text: str
    choice: VoiceChoice


@dataclass(frozen=True)
class OpenStream:
    choice: VoiceChoice


@dataclass(frozen=True)
class PushText:
    text: str


@dataclass(frozen=True)
class EndStream:
    """Speak what is left, then audio-stop (if audio started) and synthesize-stopped."""


Action = Reply | Speak | OpenStream | PushText | EndStream


class FramingLost(InvalidRequest):
    """Where the next event starts is unknown, so the connection cannot go on."""


@dataclass(frozen=True)
class Header:
    """An event's first line: the bytes of data and payload that follow it, and its fields."""

    fields: dict[str, Any]
    data_length: int
    payload_length: int


def _length(fields: dict[str, Any], name: str, max_bytes: int) -> int:
    value = fields.get(name)
    if value is None:
        return 0
    # bool is an int to Python, never a byte count on the wire.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FramingLost(f"{name} must be a byte count, got {value!r:.40}")
    if value > max_bytes:
        raise LimitExceeded(f"{name} {value} is over the {max_bytes}-byte limit")
    return value


def parse_header(line: bytes, max_bytes: int) -> Header:
    """The header line of an event (its length already bounded by the reader)."""
    try:
        # The text is checked in parse_event: a lone surrogate spoils the event, not the framing.
        fields = loads_object(line, strict_text=False)
    except InvalidJson as exc:
        raise FramingLost(f"event header is not a JSON object: {exc}") from None
    return Header(fields, _length(fields, "data_length", max_bytes), _length(fields, "payload_length", max_bytes))


def parse_event(header: Header, data: bytes, payload: bytes | None) -> Event:
    """The event of a header and the data and payload read after it; InvalidRequest for bad content."""
    try:
        check_text(header.fields)
        merged = header.fields.get("data") or {}
        if not isinstance(merged, dict):
            raise InvalidJson("the header's data must be a JSON object")
        if data:
            merged = {**merged, **loads_object(data)}
    except InvalidJson as exc:
        raise InvalidRequest(f"malformed event: {exc}") from None
    kind = header.fields.get("type")
    if not isinstance(kind, str) or not kind:
        raise InvalidRequest("an event needs a type (a non-empty string)")
    return Event(type=kind, data=merged, payload=payload or None)


def _language_part(language: str) -> str:
    return language.replace("-", "_").split("_", 1)[0].lower()


def choose_voice(requested: SynthesizeVoice | None, infos: Sequence[VoiceInfo], default: str) -> VoiceChoice:
    """The registry voice (and speaker) a Wyoming voice request means; see the module rules."""
    if requested is None:
        return VoiceChoice(default)
    if requested.name:
        if requested.name not in {i.name for i in infos}:
            raise UnknownVoice(f"unknown voice {requested.name!r}; available: {', '.join(i.name for i in infos)}")
        return VoiceChoice(requested.name, requested.speaker or None)
    if requested.language:
        wanted = requested.language.replace("-", "_").lower()
        exact = [i for i in infos if i.language.replace("-", "_").lower() == wanted]
        family = [i for i in infos if _language_part(i.language) == _language_part(wanted)]
        # Prefer the default voice among equals, so a matching language does not change the voice.
        for candidates in (exact, family):
            names = [i.name for i in candidates]
            if names:
                return VoiceChoice(default if default in names else names[0])
    return VoiceChoice(default)


def build_info(infos: Sequence[VoiceInfo], version: str) -> Info:
    voices = [
        TtsVoice(
            name=i.name,
            attribution=VOICE_ATTRIBUTION,
            installed=True,
            description=f"{i.name} ({i.quality})",
            version=None,
            languages=[i.language],
            speakers=[TtsVoiceSpeaker(name=s) for s in i.speakers] or None,
        )
        for i in infos
    ]
    program = TtsProgram(
        name=PROGRAM,
        attribution=PROGRAM_ATTRIBUTION,
        installed=True,
        description="Streaming neural text-to-speech",
        version=version,
        voices=voices,
        supports_synthesize_streaming=True,
    )
    return Info(tts=[program])


class Session:
    """One connection's protocol state: turns each incoming event into the next action.

    Raises VoxflowError for input it cannot take; the connection goes on serving after it.
    """

    def __init__(self, voices: Callable[[], Sequence[VoiceInfo]], default_voice: str, version: str) -> None:
        # Asked at each event: voices added or removed at run time count at once.
        self._voices = voices
        self._default = default_voice
        self._version = version
        self.streaming = False

    def handle(self, event: Event) -> Action | None:
        """None: nothing to do (a compatibility `synthesize` inside a stream, `select-program`)."""
        try:
            return self._handle(event)
        except (KeyError, TypeError, AttributeError) as exc:
            raise InvalidRequest(f"malformed {event.type!r} event: {exc!r}") from None

    def _handle(self, event: Event) -> Action | None:
        if Describe.is_type(event.type):
            return Reply((build_info(self._voices(), self._version).event(),))
        if Ping.is_type(event.type):
            return Reply((Pong(text=Ping.from_event(event).text).event(),))
        if event.type == "select-program":
            # There is a single program; the protocol has clients send this unconditionally.
            return None
        if Synthesize.is_type(event.type):
            if self.streaming:
                return None
            request = Synthesize.from_event(event)
            if not isinstance(request.text, str) or not request.text.strip():
                raise InvalidRequest("synthesize needs non-empty text")
            return Speak(request.text, choose_voice(request.voice, self._voices(), self._default))
        if SynthesizeStart.is_type(event.type):
            if self.streaming:
                raise InvalidRequest("a synthesize stream is already open; send synthesize-stop first")
            self.streaming = True
            return OpenStream(choose_voice(SynthesizeStart.from_event(event).voice, self._voices(), self._default))
        if SynthesizeChunk.is_type(event.type):
            if not self.streaming:
                raise InvalidRequest("synthesize-chunk outside a stream; send synthesize-start first")
            text = SynthesizeChunk.from_event(event).text
            if not isinstance(text, str):
                raise InvalidRequest("synthesize-chunk text must be a string")
            return PushText(text)
        if SynthesizeStop.is_type(event.type):
            if not self.streaming:
                raise InvalidRequest("synthesize-stop outside a stream")
            self.streaming = False
            return EndStream()
        raise InvalidRequest(f"unsupported event type {event.type!r}", code="unknown_event")

    def after_error(self, event: Event) -> tuple[Event, ...]:
        """What follows the error event for a rejected `event`: the end its sender waits for.

        A client of a whole request reads until audio-stop and one of a stream until
        synthesize-stopped; without them it would hang until its own timeout.
        """
        if Synthesize.is_type(event.type) and not self.streaming:
            return (audio_stop(0.0),)
        if SynthesizeStop.is_type(event.type):
            return (synthesize_stopped(),)
        return ()


def error_event(code: str, message: str) -> Event:
    return Error(text=message, code=code).event()


def voxflow_error_event(exc: VoxflowError) -> Event:
    return error_event(exc.code, exc.message)


def audio_start(frame: AudioFrame) -> Event:
    return AudioStart(rate=frame.sample_rate, width=WIDTH, channels=CHANNELS, timestamp=round(frame.pts * 1000)).event()


def audio_chunk(frame: AudioFrame) -> Event:
    return AudioChunk(
        rate=frame.sample_rate, width=WIDTH, channels=CHANNELS, audio=frame.pcm, timestamp=round(frame.pts * 1000)
    ).event()


def audio_stop(end_seconds: float) -> Event:
    return AudioStop(timestamp=round(end_seconds * 1000)).event()


def synthesize_stopped() -> Event:
    return SynthesizeStopped().event()
