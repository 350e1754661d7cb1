"""A matched-voice profile: one JSON file, NAME.voice-match.json, in a voice directory.

It holds everything a matched voice is: the base voice it transforms, the transform's
parameters, the reference speaker's embedding (computed once when the profile is made, never
per request), the consent record, and the similarities measured when it was tuned. The registry
reads every profile in the voice directories at start, as it reads Piper voices.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import VoiceFileError
from .matching import MARGIN_S, MatchParams, VoiceTransform

if TYPE_CHECKING:
    from .consent import ConsentRecord

SUFFIX = ".voice-match.json"
FORMAT = 1


@dataclass(frozen=True)
class MatchProfile:
    name: str
    base_voice: str
    params: MatchParams
    consent: ConsentRecord
    encoder: str  # the speaker encoder the embedding and similarities come from
    base_similarity: float  # base voice vs held-out reference sentences, when it was tuned
    similarity: float  # matched voice vs the same sentences
    reference_seconds: float  # speech analysed

    @cached_property
    def digest(self) -> str:
        """Identifies the transform: part of every cached rendering's key (VoiceInfo.version)."""
        return hashlib.sha256(json.dumps(self.params.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def embedding(self) -> list[float]:
        return self.consent.reference_embedding

    def effect(self, rate: int) -> Callable[[np.ndarray, int, int], np.ndarray]:
        """The decoder-window effect (decoder_blocks.WindowEffect): the transform, then the
        watermark, over the span and a margin of context each side; only the span is kept."""
        from .watermark import Watermarker

        transform, mark = VoiceTransform(self.params, rate), Watermarker.shared()
        margin = int(MARGIN_S * rate)

        def apply(audio: np.ndarray, start: int, end: int) -> np.ndarray:
            lo, hi = max(0, start - margin), min(len(audio), end + margin)
            changed = mark.embed(transform(audio[lo:hi]), rate)
            out = audio.copy()
            out[start:end] = changed[start - lo : end - lo]
            return out

        return apply

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "name": self.name,
            "base_voice": self.base_voice,
            "params": self.params.to_json(),
            "consent": self.consent.to_json(),
            "encoder": self.encoder,
            "base_similarity": self.base_similarity,
            "similarity": self.similarity,
            "reference_seconds": self.reference_seconds,
        }

    @classmethod
    def from_json(cls, data: dict) -> "MatchProfile":
        from .consent import ConsentRecord

        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r} is not {FORMAT}")
        return cls(
            name=str(data["name"]),
            base_voice=str(data["base_voice"]),
            params=MatchParams.from_json(data["params"]),
            consent=ConsentRecord.from_json(data["consent"]),
            encoder=str(data["encoder"]),
            base_similarity=float(data["base_similarity"]),
            similarity=float(data["similarity"]),
            reference_seconds=float(data["reference_seconds"]),
        )

    @classmethod
    def read(cls, path: Path) -> "MatchProfile":
        try:
            profile = cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VoiceFileError(f"cannot read voice profile {path}: {exc}") from exc
        if path.name != profile.name + SUFFIX:
            raise VoiceFileError(f"{path}: names the voice {profile.name!r}; the file must be {profile.name}{SUFFIX}")
        return profile

    def write(self, directory: Path) -> Path:
        """Written aside and renamed, so a directory scan never sees half a profile."""
        path = directory / (self.name + SUFFIX)
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".voxflow-profile-", suffix=".tmp", delete=False, encoding="utf-8") as out:
            json.dump(self.to_json(), out, indent=1)
        try:
            os.chmod(out.name, 0o644)
            os.replace(out.name, path)
        except BaseException:
            Path(out.name).unlink(missing_ok=True)
            raise
        return path


def profile_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("*" + SUFFIX))
