"""The voice management API's bodies (`/v1/voices`): pure, no I/O.

`GET /v1/voices` lists every voice with what a client needs to pick one and to manage it.
`POST /v1/voices` takes `{"path": "..."}` (a voice already in a voice directory of the server)
or a multipart upload with the parts `model` (the .onnx file), `config` (the .onnx.json file)
and optionally `name`. docs/voices.md is the user's description.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ...errors import InvalidRequest
from ...voices.profile import MatchProfile
from ...voices.registry import VoiceStatus
from .json_text import InvalidJson, loads_object

UPLOAD_PARTS = ("model", "config")  # the multipart file parts, in the order they are named here


def voice_json(status: VoiceStatus) -> dict[str, Any]:
    info = status.info
    return {
        "name": info.name,
        "language": info.language,
        "sample_rate": info.sample_rate,
        "quality": info.quality,
        "speakers": list(info.speakers),  # names, in speaker id order
        "espeak_voice": info.espeak_voice,
        "source": status.source,  # embedded, directory (found at start), added (at run time) or matched
        "num_speakers": info.num_speakers,
        "speaker_ids": dict(info.speaker_ids),  # name -> the index a request may give instead
        "loaded": status.loaded,
        "in_use": status.in_use,  # streams holding it now; a voice in use cannot be removed
        "match": None if info.match is None else match_json(info.match),
    }


def match_json(profile: MatchProfile) -> dict[str, Any]:
    """A matched voice: what it was matched from, how well, and its consent record."""
    params = profile.params
    return {
        "base_voice": profile.base_voice,
        "encoder": profile.encoder,
        "similarity": {"base": profile.base_similarity, "matched": profile.similarity},
        "reference_seconds": profile.reference_seconds,
        "formant_ratio": params.formant_ratio,
        "pitch_hz": {"base": round(params.base_pitch.median_hz, 1), "matched": round(params.target_pitch.median_hz, 1)},
        "consent": profile.consent.to_json(),
    }


def listing(statuses: Iterable[VoiceStatus], default: str) -> dict[str, Any]:
    return {"default": default, "voices": [voice_json(status) for status in statuses]}


def removed(name: str) -> dict[str, Any]:
    return {"name": name, "deleted": True}


def parse_add_body(body: bytes) -> str:
    """The voice file path of a JSON `POST /v1/voices` body."""
    try:
        fields = loads_object(body)
    except InvalidJson as exc:
        raise InvalidRequest(f"the body must be a JSON object: {exc}", code="invalid_json") from None
    path = fields.get("path")
    if not isinstance(path, str) or not path:
        raise InvalidRequest('the body needs "path": the .onnx file, in a voice directory of the server')
    unknown = set(fields) - {"path"}
    if unknown:
        raise InvalidRequest(f"unknown fields: {', '.join(sorted(unknown))}")
    return path


def upload_name(name: str | None, model_filename: str | None) -> str:
    """The name an uploaded voice gets: the `name` part, else the model file's name less .onnx
    (the registry checks that it is a safe file name)."""
    if name:
        return name
    if model_filename and model_filename.endswith(".onnx"):
        return model_filename.removesuffix(".onnx")
    raise InvalidRequest('name the voice: a "name" part, or a model file named NAME.onnx')
