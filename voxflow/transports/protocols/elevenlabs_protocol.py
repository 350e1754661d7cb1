"""ElevenLabs' WebSocket input-streaming protocol as plain data, without any I/O.

Covers `/v1/text-to-speech/{voice_id}/stream-input` and `.../multi-stream-input`: the query
string, the client messages, the server messages, and the character alignment that goes with
each audio message. The wire format follows ElevenLabs' AsyncAPI spec (elevenlabs-docs,
fern/apis/api/asyncapi.yml) and its Python SDK's types, and was checked field by field against
the client that matters most, Pipecat's ElevenLabsTTSService (pipecat-ai/pipecat main at commit
acead05, v1.7.0+771: src/pipecat/services/elevenlabs/tts.py and tts_base.py).

Where ElevenLabs' sources disagree, what its server and Pipecat actually use wins: durations
are `charDurationsMs` (the spec's examples say `charsDurationsMs`), the final flag is `isFinal`
(not `is_final`), the context is `context_id` from the client and `contextId` from the server.
"""

from __future__ import annotations

import base64
import json
import math
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Mapping

from ...errors import InvalidRequest
from ...streaming.framing import OUTPUT_RATES
from ...voices.styles import EXPRESSIVENESS_RANGE, SPEED_RANGE, Style
from .audio_encoding import AudioFormat, Encoder, PcmEncoder, g711_format, mp3_format, ogg_opus_format, pcm_format, wav_format
from .json_text import InvalidJson, loads_object

# ElevenLabs puts the WebSocket close code it uses (1008, policy violation) in `code`.
POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011

INACTIVITY_TIMEOUT_DEFAULT = 20
INACTIVITY_TIMEOUT_MAX = 180
MAX_SEED = 4_294_967_295
MAX_CONTEXT_ID_CHARS = 256
# A multi-stream message without context_id addresses ElevenLabs' "default context".
DEFAULT_CONTEXT = "default"

# Audio messages: the first one goes out with whatever audio exists (latency); after that a
# burst is cut into messages of MIN..MAX ms where a word starts, stretched up to twice MAX to
# reach one (see AudioPacker). MAX is at least twice MIN, so no cut leaves a sliver behind.
MIN_MESSAGE_MS = 100
MAX_MESSAGE_MS = 200

_SENTENCE_END = frozenset(".!?…。！？")
_CLOSERS = "\"')]}»”’*_`"


class ElevenLabsError(InvalidRequest):
    """A client mistake, reported as {"message", "error", "code"} with ElevenLabs' error names."""

    def __init__(self, message: str, *, error: str = "invalid_input_message") -> None:
        super().__init__(message, code=error)


# -- connection options (the query string) ----------------------------------------------------


@dataclass(frozen=True)
class OutputFormat:
    """One of ElevenLabs' `output_format` names: the rate voxflow synthesizes at and its encoding."""

    name: str
    sample_rate: int
    audio: AudioFormat


def _output_formats() -> dict[str, OutputFormat]:
    # ElevenLabs' list (its API's output_format enum). Opus is Ogg Opus, as ElevenLabs sends it
    # and as LiveKit's plugin parses it (it reads the Ogg pages' granule positions).
    formats = [OutputFormat(f"pcm_{rate}", rate, pcm_format(f"pcm_{rate}")) for rate in OUTPUT_RATES]
    for rate, kbps in ((22050, 32), (24000, 48), (44100, 32), (44100, 64), (44100, 96), (44100, 128), (44100, 192)):
        name = f"mp3_{rate}_{kbps}"
        formats.append(OutputFormat(name, rate, mp3_format(name, kbps * 1000)))
    for kbps in (32, 64, 96, 128, 192):
        name = f"opus_48000_{kbps}"
        formats.append(OutputFormat(name, 48000, ogg_opus_format(name, kbps * 1000)))
    formats += [OutputFormat(f"{law}_8000", 8000, g711_format(f"{law}_8000", law)) for law in ("ulaw", "alaw")]
    # ElevenLabs offers WAV on its whole-file endpoints only; here it is the streamed WAV of the
    # OpenAI endpoint (sizes unknown, read to the end), on every endpoint.
    formats += [OutputFormat(f"wav_{rate}", rate, wav_format(f"wav_{rate}")) for rate in OUTPUT_RATES]
    return {f.name: f for f in formats}


OUTPUT_FORMATS = _output_formats()
DEFAULT_OUTPUT_FORMAT = "mp3_44100_128"  # ElevenLabs' own default


def parse_output_format(value: str | None) -> OutputFormat:
    """An `output_format` name (ElevenLabs' default when absent) -> its rate and encoder."""
    found = OUTPUT_FORMATS.get(DEFAULT_OUTPUT_FORMAT if value is None else value)
    if found is None:
        raise ElevenLabsError(
            f"unsupported output_format {value!r:.40}; supported: {', '.join(OUTPUT_FORMATS)}",
            error="unsupported_output_format",
        )
    return found


@dataclass(frozen=True)
class ConnectionOptions:
    output_format: OutputFormat
    inactivity_timeout: int = INACTIVITY_TIMEOUT_DEFAULT  # seconds without input before a close
    sync_alignment: bool = False  # an alignment object (maybe empty) on every audio message
    auto_mode: bool = False  # text that ends a sentence is spoken at once (an implicit flush)
    seed: int | None = None
    api_key: str | None = None  # ?authorization=

    @property
    def sample_rate(self) -> int:
        return self.output_format.sample_rate


def resolve_voice(voice_id: str, own_voices: Collection[str], voice_for: Callable[[str | None], str]) -> str:
    """ElevenLabs voice ids are opaque ("21m00Tcm4TlvDq8ikWCM"), so a client's default id must
    work: an alias or one of the server's voice names is honoured, anything else speaks with
    the default voice (voice_for(None))."""
    name = voice_for(voice_id)
    return name if name in own_voices else voice_for(None)


def _query_bool(params: Mapping[str, str], name: str, default: bool) -> bool:
    value = params.get(name)
    if value is None:
        return default
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise ElevenLabsError(f"{name} must be true or false, got {value!r:.40}", error="invalid_request")


def _query_int(params: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
        raise ElevenLabsError(f"{name} must be an integer from {low} to {high}, got {value!r:.40}", error="invalid_request")
    return int(value)


def parse_query(params: Mapping[str, str]) -> ConnectionOptions:
    """The query parameters voxflow acts on. The rest (model_id, language_code, enable_logging,
    enable_ssml_parsing, apply_text_normalization...) are accepted and have no effect."""
    timeout = _query_int(params, "inactivity_timeout", 1, INACTIVITY_TIMEOUT_MAX)
    return ConnectionOptions(
        output_format=parse_output_format(params.get("output_format")),
        inactivity_timeout=INACTIVITY_TIMEOUT_DEFAULT if timeout is None else timeout,
        sync_alignment=_query_bool(params, "sync_alignment", False),
        auto_mode=_query_bool(params, "auto_mode", False),
        seed=_query_int(params, "seed", 0, MAX_SEED),
        api_key=_bearer(params.get("authorization")),
    )


def _bearer(value: str | None) -> str | None:
    """ElevenLabs' `authorization` carries a bearer token, with or without the scheme."""
    if value is None:
        return None
    return value[7:].strip() if value[:7].lower() == "bearer " else value.strip()


# -- client messages --------------------------------------------------------------------------


@dataclass(frozen=True)
class VoiceSettings:
    """The voice_settings voxflow can act on; similarity_boost and use_speaker_boost have no
    counterpart in a VITS voice and are ignored."""

    stability: float | None = None  # ElevenLabs 0..1, default 0.5: higher is steadier
    style: float | None = None  # ElevenLabs 0..1, default 0: higher is more exaggerated
    speed: float | None = None  # ElevenLabs 0.7..1.2, default 1

    def to_style(self) -> Style:
        """speed carries over (clamped to voxflow's range). Expressiveness, which scales the
        model's pitch and timing noise, is 1 at ElevenLabs' defaults, falls with stability
        (stability 1 -> 0.5, 0 -> 1.5) and rises with style (style 1 adds 1), clamped to 0..2."""
        stability = _clamp(0.5 if self.stability is None else self.stability, 0.0, 1.0)
        exaggeration = _clamp(0.0 if self.style is None else self.style, 0.0, 1.0)
        return Style(
            speed=_clamp(1.0 if self.speed is None else self.speed, *SPEED_RANGE),
            expressiveness=_clamp(1.0 + (0.5 - stability) + exaggeration, *EXPRESSIVENESS_RANGE),
        )


@dataclass(frozen=True)
class ClientMessage:
    """One client message of either endpoint; every field is optional on the wire.

    text None means absent or null; "" is ElevenLabs' end of input on stream-input and a
    keep-alive on multi-stream-input, so the two must stay apart.
    """

    text: str | None = None
    context_id: str | None = None
    flush: bool = False
    close_context: bool = False
    close_socket: bool = False
    voice_settings: VoiceSettings | None = None
    api_key: str | None = None


def _clamp(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))


def _optional(body: Mapping[str, Any], name: str, kind: type, what: str) -> Any:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise ElevenLabsError(f"{name} must be {what}, got {json.dumps(value)[:40]}")
    return value


def _setting(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ElevenLabsError(f"voice_settings.{name} must be a finite number, got {json.dumps(value)[:40]}")
    return float(value)


def _voice_settings(value: object) -> VoiceSettings | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ElevenLabsError("voice_settings must be an object")
    return VoiceSettings(stability=_setting(value, "stability"), style=_setting(value, "style"), speed=_setting(value, "speed"))


def parse_message(raw: str | bytes) -> ClientMessage:
    """Parse one client frame; ElevenLabsError (invalid_input_message) says what is wrong."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ElevenLabsError("message is not valid UTF-8 JSON") from None
    try:
        body = loads_object(raw)
    except InvalidJson as exc:
        raise ElevenLabsError(f"could not parse the message: it must be a JSON object ({exc})") from None
    context_id = _optional(body, "context_id", str, "a string")
    if context_id is None:
        context_id = _optional(body, "contextId", str, "a string")
    if context_id is not None and not 1 <= len(context_id) <= MAX_CONTEXT_ID_CHARS:
        raise ElevenLabsError(f"context_id must have 1 to {MAX_CONTEXT_ID_CHARS} characters")
    api_key = _optional(body, "xi_api_key", str, "a string") or _optional(body, "xi-api-key", str, "a string")
    return ClientMessage(
        text=_optional(body, "text", str, "a string"),
        context_id=context_id,
        flush=bool(_optional(body, "flush", bool, "true or false")),
        close_context=bool(_optional(body, "close_context", bool, "true or false")),
        close_socket=bool(_optional(body, "close_socket", bool, "true or false")),
        voice_settings=_voice_settings(body.get("voice_settings")),
        api_key=api_key or _bearer(_optional(body, "authorization", str, "a string")),
    )


def ends_sentence(text: str) -> bool:
    """Does this text end a sentence (closing quotes and brackets aside)? auto_mode speaks it then."""
    stripped = text.rstrip().rstrip(_CLOSERS)
    return bool(stripped) and stripped[-1] in _SENTENCE_END


# -- alignment and audio messages -------------------------------------------------------------


@dataclass(frozen=True)
class Alignment:
    """Characters of one audio message and their times in ms (AudioPacker says from when)."""

    chars: tuple[str, ...] = ()
    start_ms: tuple[int, ...] = ()
    duration_ms: tuple[int, ...] = ()

    def to_json(self) -> dict[str, list]:
        return {"charStartTimesMs": list(self.start_ms), "charDurationsMs": list(self.duration_ms), "chars": list(self.chars)}


@dataclass(frozen=True)
class AudioChunk:
    audio: bytes  # in the connection's output format
    samples: int  # PCM samples that went into it (an encoder may hold some back for the next)
    alignment: Alignment  # the words as the client wrote them
    normalized: Alignment  # the words as spoken, after voxflow's text cleanup


@dataclass
class _Char:
    char: str
    start: float  # seconds on the stream's timeline
    end: float | None  # None: a space whose end is the next word's start, not known yet
    starts_word: bool = False


class _CharTrack:
    """One alignment's characters still to send: the words as spoken, or as the client wrote
    them. Both tracks get the same words at the same times, so they are cut alike."""

    def __init__(self) -> None:
        self.chars: deque[_Char] = deque()
        self.sent = False  # some character has gone out
        self.in_word = False  # the characters sent so far end inside a word

    def add(self, word: str, start: float, end: float) -> None:
        if self.chars and self.chars[-1].end is None:
            self.chars[-1].end = start
        step = (end - start) / len(word)
        self.chars.extend(_Char(ch, start + i * step, start + (i + 1) * step, i == 0) for i, ch in enumerate(word))
        self.chars.append(_Char(" ", end, None))

    def take(self, t0: float, t1: float, starts_before: Callable[[float], bool], origin_ms: int | None, final: bool) -> Alignment:
        """The characters starting in [t0, t1) (all that are left when final). origin_ms None:
        times per message, the message's characters made to reach its end (AudioPacker)."""
        own = bool(self.chars) and (final or starts_before(self.chars[0].start))
        if not own and origin_ms is None:
            following = self.chars[0] if self.chars else None
            if following is not None and not following.starts_word:
                following.start = t0
            elif self.sent and not self.in_word:
                self.chars.appendleft(_Char(" ", t0, None if following is None else following.start))
        origin = round(t0 * 1000) if origin_ms is None else origin_ms
        chars, starts, durations = [], [], []
        while self.chars and (final or starts_before(self.chars[0].start)):
            c = self.chars.popleft()
            start = min(max(c.start, t0), t1)
            # The message's last character runs to its end: the next one starts in a later
            # message, maybe a fraction of a sample before this cut (cuts fall on samples).
            last = not final and not (self.chars and starts_before(self.chars[0].start))
            stop = t1 if c.end is None or last else min(max(c.end, start), t1)
            start_ms, stop_ms = round(start * 1000), round(stop * 1000)
            chars.append(c.char)
            starts.append(start_ms - origin)
            durations.append(stop_ms - start_ms)
            self.in_word = c.char != " "
            self.sent = True
        return Alignment(tuple(chars), tuple(starts), tuple(durations))


class AudioPacker:
    """Turns one context's frames and word timestamps into audio messages with alignment.

    Every word is followed by a space that lasts until the next word starts (pauses included),
    and a word's duration is spread evenly over its characters. A character goes out with the
    message its start falls in, its duration cut at that message's end.

    Clients disagree on what the times count from, so there are two clocks:

    - Per message (the default, ElevenLabs' documented reading: "relative to the returned
      chunk"). Pipecat 1.14 rebuilds word times with a clock that advances, on each message
      with alignment, by the end of its last character. So every message's characters span
      its whole audio: a message that would have no character of its own repeats the space
      of the pause it lies in, or takes the next letter of the word it lies in a little early
      (only a word's first letter carries its time). Audio before the first word, with no
      character to carry it, waits for the message that reaches that word: Pipecat drops the
      leading spaces of a context's first alignment, so a space there would not move its clock.
    - From the context's first audio (`context_times`). LiveKit's plugin reads the times that
      way, and asks for sync_alignment, which Pipecat never does; docs/compatibility.md says
      why the two are told apart by it.
    """

    def __init__(self, sample_rate: int, encoder: Encoder | None = None, *, context_times: bool = False) -> None:
        self.sample_rate = sample_rate
        self._encoder = encoder or PcmEncoder(sample_rate)
        self._context_times = context_times
        self._min = sample_rate * MIN_MESSAGE_MS // 1000
        self._max = sample_rate * MAX_MESSAGE_MS // 1000
        self._stretch = 2 * self._max
        self._pcm = bytearray()
        self._start: int | None = None  # stream sample index of _pcm[0]
        self._origin_ms: int | None = None  # the context's first audio, for context_times
        self._spoken, self._written = _CharTrack(), _CharTrack()
        self._word_starts: deque[int] = deque()  # stream sample index of each word start not yet sent
        self._last_end = 0.0

    @property
    def buffered_seconds(self) -> float:
        return len(self._pcm) / 2 / self.sample_rate

    def add_word(self, word: str, start: float, end: float, written: str | None = None) -> None:
        """`word` as spoken (normalizedAlignment); `written`, the client's own text for it
        (alignment), where that differs."""
        if not word:
            return
        start = max(start, self._last_end)
        end = max(end, start)
        self._spoken.add(word, start, end)
        self._written.add(written or word, start, end)
        self._word_starts.append(self._sample(start))
        self._last_end = end

    def add_audio(self, pts: float, pcm: bytes) -> None:
        """Frames of a context are contiguous, so only the first one's position is needed."""
        if self._start is None:
            self._start = round(pts * self.sample_rate)
            self._origin_ms = round(pts * 1000)
        self._pcm += pcm

    def _sample(self, seconds: float) -> int:
        return round(seconds * self.sample_rate)

    def take(self, final: bool = False) -> list[AudioChunk]:
        """The buffered audio as messages (some may be held back, see the class). final: the
        context has ended, so everything goes, with the encoder's tail and any characters left."""
        samples = len(self._pcm) // 2
        if samples == 0 and not (final and self._spoken.chars):
            tail = self._encoder.finish() if final else b""
            return [AudioChunk(tail, 0, Alignment(), Alignment())] if tail else []
        start = self._start or 0
        cuts = self._cuts(start, samples)
        if not self._context_times:
            cuts = self._carried(start, cuts, final)
        chunks, begin = [], 0
        for end in cuts:
            last = final and end == samples
            audio = self._encoder.encode(bytes(self._pcm[2 * begin : 2 * end]))
            if last:
                audio += self._encoder.finish()
            written, spoken = self._align(start + begin, start + end, last)
            chunks.append(AudioChunk(audio, end - begin, written, spoken))
            begin = end
        del self._pcm[: 2 * begin]
        self._start = start + begin
        while self._word_starts and self._word_starts[0] < self._start:
            self._word_starts.popleft()
        return chunks

    def _cuts(self, start: int, samples: int) -> list[int]:
        """Where to cut `samples` buffered samples: at the last word start within MAX, else at
        the first within the stretch, else (inside a long word or pause) at MAX. No cut leaves
        less than MIN after it."""
        cuts, begin = [], 0
        while samples - begin > self._max:
            low, high = begin + self._min, samples - self._min
            at_words = [w - start for w in self._word_starts if low < w - start <= min(begin + self._stretch, high)]
            within = [w for w in at_words if w <= begin + self._max]
            if within or at_words:
                begin = max(within) if within else min(at_words)
            elif samples - begin <= self._stretch:
                break
            else:
                begin += self._max
            cuts.append(begin)
        cuts.append(samples)
        return cuts

    def _carried(self, start: int, cuts: list[int], final: bool) -> list[int]:
        """The cuts whose messages can carry a character (per-message times): a message before
        the first word's start merges into the next one, or waits when it is the last."""
        if self._spoken.sent:
            return cuts  # from the first word on, every message has a character to carry
        first = next((c for c in self._spoken.chars if c.starts_word), None)
        reach = None if first is None else self._sample(first.start) - start
        kept = [end for end in cuts if reach is not None and end > reach]
        if final:
            return kept if kept and kept[-1] == cuts[-1] else [*kept, cuts[-1]]
        return kept

    def _align(self, begin: int, end: int, final: bool) -> tuple[Alignment, Alignment]:
        """(written, spoken) alignment of the message [begin, end) in stream samples."""
        t0, t1 = begin / self.sample_rate, end / self.sample_rate
        origin_ms = (self._origin_ms or 0) if self._context_times else None

        # Compared in samples, rounded as the word starts are, so a cut at a word start
        # leaves that word wholly in the next message.
        def starts_before(seconds: float) -> bool:
            return self._sample(seconds) < end

        return tuple(track.take(t0, t1, starts_before, origin_ms, final) for track in (self._written, self._spoken))


class WrittenWords:
    """The client's own text for each spoken word, for `alignment` (`normalizedAlignment` has
    the words as spoken). Text cleanup drops markup and shortens links but keeps the words, so
    a spoken word is found in what the client sent and stands for the whole whitespace-separated
    token around it: "**Hello**" for Hello. A word not found (an emoji dropped, a symbol spoken)
    stands for itself."""

    # How far ahead a spoken word is looked for: past it, a match is more likely another
    # occurrence of the word than this one.
    _REACH = 200

    def __init__(self) -> None:
        self._text = ""

    def feed(self, text: str) -> None:
        self._text += text

    def match(self, word: str) -> str:
        at = self._text.find(word, 0, self._REACH + len(word))
        if at < 0:
            return word
        begin = max(self._text.rfind(ch, 0, at) for ch in " \t\n") + 1
        end = at + len(word)
        while end < len(self._text) and not self._text[end].isspace():
            end += 1
        written, self._text = self._text[begin:end], self._text[end:]
        return written


# -- server messages --------------------------------------------------------------------------


def _with_context(body: dict[str, Any], context_id: str | None) -> dict[str, Any]:
    if context_id is not None:
        body["contextId"] = context_id
    return body


def audio_message(chunk: AudioChunk, context_id: str | None = None, *, sync_alignment: bool = False) -> dict[str, Any]:
    """A message without characters carries null alignments, or empty ones with sync_alignment."""

    def alignment(a: Alignment) -> dict[str, list] | None:
        # Each on its own: "**Hello**" has more characters than Hello, so a message can hold
        # some of one and none of the other.
        return a.to_json() if a.chars or sync_alignment else None

    body = {
        "audio": base64.b64encode(chunk.audio).decode("ascii"),
        "isFinal": False,
        "normalizedAlignment": alignment(chunk.normalized),
        "alignment": alignment(chunk.alignment),
    }
    return _with_context(body, context_id)


def final_message(context_id: str | None = None) -> dict[str, Any]:
    return _with_context({"isFinal": True}, context_id)


def error_message(error: str, message: str, *, code: int = POLICY_VIOLATION, context_id: str | None = None) -> dict[str, Any]:
    """ElevenLabs' error shape, e.g. {"message": "...", "error": "input_timeout_exceeded", "code": 1008}."""
    return _with_context({"message": message, "error": error, "code": code}, context_id)
