"""Speaking styles: speed, expressiveness and volume, with named presets.

VITS exposes no emotion control, so a preset is a documented point in these three knobs:
speed scales the predicted durations, expressiveness scales both noise terms (more noise =
livelier pitch and timing, less = flatter and steadier), volume is a linear gain.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import InvalidRequest
from .scales import Scales

SPEED_RANGE = (0.5, 2.0)
EXPRESSIVENESS_RANGE = (0.0, 2.0)
VOLUME_RANGE = (0.0, 2.0)


@dataclass(frozen=True)
class Style:
    speed: float = 1.0
    expressiveness: float = 1.0
    volume: float = 1.0

    def __post_init__(self) -> None:
        for name, (low, high) in (
            ("speed", SPEED_RANGE),
            ("expressiveness", EXPRESSIVENESS_RANGE),
            ("volume", VOLUME_RANGE),
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not low <= value <= high:
                raise InvalidRequest(f"style {name} must be a number in [{low}, {high}], got {value!r}")

    def scales(self, voice_defaults: Scales) -> Scales:
        return Scales(
            noise=voice_defaults.noise * self.expressiveness,
            length=voice_defaults.length / self.speed,
            noise_w=voice_defaults.noise_w * self.expressiveness,
        )


PRESETS: dict[str, Style] = {
    "neutral": Style(),
    "happy": Style(speed=1.08, expressiveness=1.3, volume=1.0),
    "sad": Style(speed=0.85, expressiveness=0.6, volume=0.8),
    "serious": Style(speed=0.95, expressiveness=0.5, volume=1.0),
    "calm": Style(speed=0.9, expressiveness=0.75, volume=0.85),
}


def resolve_style(preset: str | None = None, **overrides: float | None) -> Style:
    """A preset (default neutral) with any explicitly given knobs replaced."""
    name = preset or "neutral"
    if name not in PRESETS:
        raise InvalidRequest(f"unknown style {name!r}; known: {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(PRESETS[name], **given) if given else PRESETS[name]
