"""Rhasspy Hermes text to speech (no I/O): `hermes/tts/say` in, one WAV on the site's audio
server and `hermes/tts/sayFinished` out, failures on `hermes/error/tts`. See docs/mqtt.md."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ...voices.styles import VOLUME_RANGE
from .mqtt_protocol import MqttProtocolError, decode_json_object

SAY_TOPIC = "hermes/tts/say"
SAY_FINISHED_TOPIC = "hermes/tts/sayFinished"
ERROR_TOPIC = "hermes/error/tts"
DEFAULT_SITE = "default"


def play_bytes_topic(site_id: str, request_id: str) -> str:
    return f"hermes/audioServer/{site_id}/playBytes/{request_id}"


@dataclass(frozen=True)
class HermesSay:
    text: str
    site_id: str = DEFAULT_SITE
    id: str | None = None  # echoed in sayFinished; names the playBytes request when given
    lang: str | None = None
    session_id: str | None = None
    volume: float | None = None  # linear gain, 1 = unchanged


class HermesError(MqttProtocolError):
    """A say that cannot be served, with what the error message must echo."""

    def __init__(self, code: str, message: str, site_id: str = DEFAULT_SITE, session_id: str | None = None) -> None:
        super().__init__(code, message)
        self.site_id = site_id
        self.session_id = session_id


def _optional_str(obj: dict[str, Any], key: str, site: str, session: str | None = None) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise HermesError("invalid_request", f"{key} must be a string, got {value!r:.80}", site, session)
    return value


def _is_level(value: object) -> bool:
    return isinstance(value, str) and bool(value) and not any(c in value for c in "/+#\0")


def parse_say(payload: bytes, max_text_chars: int) -> HermesSay:
    try:
        obj = decode_json_object(payload, 6 * max_text_chars + 4096)
    except MqttProtocolError as exc:
        raise HermesError(exc.code, str(exc)) from None
    raw_site = obj.get("siteId")
    raw_site = DEFAULT_SITE if raw_site is None else raw_site
    # The site names a topic level; an error about it goes to the default site instead.
    site = raw_site if _is_level(raw_site) else DEFAULT_SITE
    session = _optional_str(obj, "sessionId", site)
    if site != raw_site:
        raise HermesError("invalid_request", f"siteId must be a topic level, got {raw_site!r:.80}", site, session)
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise HermesError("invalid_request", "text must be a non-empty string", site, session)
    if len(text) > max_text_chars:
        raise HermesError("limit_exceeded", f"text of {len(text)} characters; at most {max_text_chars}", site, session)
    request_id = obj.get("id")
    if request_id is not None and not _is_level(request_id):
        raise HermesError("invalid_request", f"id must be a topic level, got {request_id!r:.80}", site, session)
    volume = obj.get("volume")
    if volume is not None and (isinstance(volume, bool) or not isinstance(volume, (int, float))
                               or not VOLUME_RANGE[0] <= volume <= VOLUME_RANGE[1]):
        raise HermesError("invalid_request", f"volume must be a number in {list(VOLUME_RANGE)}, got {volume!r:.80}", site, session)
    return HermesSay(text, site, request_id, _optional_str(obj, "lang", site, session), session, volume)


def say_finished(say: HermesSay) -> bytes:
    return json.dumps({"id": say.id, "siteId": say.site_id, "sessionId": say.session_id}).encode()


def error_payload(message: str, site_id: str, session_id: str | None, context: str | None = None) -> bytes:
    return json.dumps({"error": message, "context": context, "siteId": site_id, "sessionId": session_id}).encode()

